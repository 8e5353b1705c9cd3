"""A peer on the same device: the toy MLP pair's joint RK4 step written in JAX, for bench/step.py.

The same step as bench/step.py's ``ours`` row, from the same parameters and data: the non-saturating loss, a
fresh real batch and z per stage, D's gradient with G's samples held fixed, ODE-GAN's regulariser
||dl_G/dphi||^2 differentiated w.r.t. D and folded into stage 1's gradient with weight lambda / b1 = 6 lambda,
then theta <- theta0 - h/6 (k1 + 2 k2 + 2 k3 + k4). Two ways to run it, both compiled by XLA:

  jax_jit    one ``jax.jit``-compiled step per call (what a training loop calling a jitted step pays)
  jax_scan   ``lax.scan`` of 100 steps in one compiled call, per step (JAX's best case: no dispatch at all)

Optional: it runs where ``jax`` is importable (``pip install "jax[cpu]"``; the GPU image has it) and is never a
dependency of the package. ``check_against_ours`` measures how far one JAX step lands from ODEStepper's.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

TOY_STAGES = 4  # RK4: the stage points x0 + c_i h k_{i-1} with c = (0, 1/2, 1/2, 1) and weights (1, 2, 2, 1) / 6


def available() -> bool:
    """Whether jax is installed here (it is an optional benchmark dependency); does not import it, so the
    environment ``_import_jax`` sets up still applies."""
    import importlib.util

    return importlib.util.find_spec("jax") is not None


def _import_jax(device: str):
    """jax, set up before its first import: on a machine without a GPU, the CPU platform only and one Eigen
    thread (the torch toy runs on one); with a GPU, no preallocation of 75% of its memory, which torch in this
    process needs too. Computations go to the device their inputs were put on (``setup``), so a CPU check and a
    GPU timing can share one process. Matrix products at full fp32 (``HIGHEST``), as torch's default: on a GPU
    JAX would otherwise use TF32."""
    if "jax" not in sys.modules:
        if device == "cpu" and not torch.cuda.is_available():
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_cpu_multi_thread_eigen" not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    return jax


def jax_device(device: str):
    """The JAX device for torch's device type ``device`` (cpu or cuda)."""
    jax = _import_jax(device)
    return jax.devices("cpu" if device == "cpu" else "gpu")[0]


def linear_layers(module: torch.nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W^T, b) of each Linear of a plain ReLU MLP (Linear, ReLU, ..., Linear, optionally Squeeze), in order."""
    layers, kinds = [], []
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            if m.bias is None:
                raise ValueError("the JAX peer takes Linear layers with a bias")
            layers.append((m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy()))
        kinds.append(type(m).__name__)
    leaves = [k for k in kinds if k not in ("Sequential", "MLP")]
    if not layers or any(k not in ("Linear", "ReLU", "Squeeze") for k in leaves):
        raise ValueError(f"the JAX peer takes plain ReLU MLPs; this module has {sorted(set(leaves))}")
    return layers


def make_step(h: float, lam: float, device: str = "cpu"):
    """step(params, real, z) -> params: one joint RK4 step of the toy pair; params = (D's layers, G's layers),
    real [4, B, 2] and z [4, B, z_dim] (stage i reads real[i], z[i])."""
    jax = _import_jax(device)
    jnp = jax.numpy

    def mlp(layers, x):
        for i, (w, b) in enumerate(layers):
            x = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST) + b
            if i < len(layers) - 1:
                x = jax.nn.relu(x)
        return x

    def d_logits(d, x):
        return mlp(d, x)[..., 0]

    def loss_d(d, g, real, z):
        fake = jax.lax.stop_gradient(mlp(g, z))
        return jnp.mean(jax.nn.softplus(-d_logits(d, real))) + jnp.mean(jax.nn.softplus(d_logits(d, fake)))

    def loss_g(g, d, z):
        return jnp.mean(jax.nn.softplus(-d_logits(d, mlp(g, z))))

    def penalty(d, g, z):  # ||dl_G/dphi||^2, a function of D's parameters
        return sum(jnp.sum(t * t) for t in jax.tree_util.tree_leaves(jax.grad(loss_g)(g, d, z)))

    def field(params, real, z, regularise: bool):
        d, g = params
        kd = jax.grad(loss_d)(d, g, real, z)
        if regularise:
            kd = jax.tree_util.tree_map(lambda a, r: a + 6.0 * lam * r, kd, jax.grad(penalty)(d, g, z))
        return kd, jax.grad(loss_g)(g, d, z)

    def axpy(x, a, k):  # x + a k over the parameter tree
        return jax.tree_util.tree_map(lambda p, q: p + a * q, x, k)

    def step(params, real, z):
        k1 = field(params, real[0], z[0], True)
        k2 = field(axpy(params, -h / 2, k1), real[1], z[1], False)
        k3 = field(axpy(params, -h / 2, k2), real[2], z[2], False)
        k4 = field(axpy(params, -h, k3), real[3], z[3], False)
        total = jax.tree_util.tree_map(lambda a, b, c, e: a + 2 * b + 2 * c + e, k1, k2, k3, k4)
        return axpy(params, -h / 6, total)

    return step


def setup(D, G, real: torch.Tensor, z: torch.Tensor, h: float, lam: float, device: str = "cpu", scan_steps: int = 100):
    """(step once, run scan_steps steps in one call, the parameters): compiled functions on JAX's device for
    ``device``, starting from D's and G's parameters and reading the same per-stage data."""
    jax = _import_jax(device)
    jnp = jax.numpy
    dev = jax_device(device)
    params = jax.device_put(
        ([(jnp.asarray(w), jnp.asarray(b)) for w, b in linear_layers(D)],
         [(jnp.asarray(w), jnp.asarray(b)) for w, b in linear_layers(G)]),
        dev,
    )  # fmt: skip
    r = jax.device_put(jnp.asarray(real.detach().cpu().numpy()), dev)
    zz = jax.device_put(jnp.asarray(z.detach().cpu().numpy()), dev)
    step = make_step(h, lam, device)
    jit_step = jax.jit(step)

    @jax.jit
    def scan(p, real, z):
        return jax.lax.scan(lambda q, _: (step(q, real, z), None), p, None, length=scan_steps)[0]

    state = {"params": params}

    def once():
        state["params"] = jax.block_until_ready(jit_step(state["params"], r, zz))

    def many():
        state["params"] = jax.block_until_ready(scan(state["params"], r, zz))

    return once, many, state


def flat_params(params) -> np.ndarray:
    """Every parameter in one vector, D's then G's, each Linear's weight ([out, in], as torch) then its bias."""
    out = []
    for player in params:
        for w, b in player:
            out += [np.asarray(w).T.ravel(), np.asarray(b).ravel()]
    return np.concatenate(out)


def check_against_ours(
    h: float, lam: float, batch: int = 512, steps: int = 3, peer_lam: float | None = None, device: str = "cpu"
) -> float:
    """max |JAX - ours| / max |ours| of the parameters after ``steps`` joint RK4 steps of the toy pair from the
    same start and data, JAX against ODEStepper (autograd engine), both in float32 on ``device`` (cpu or cuda:
    check on the device that is timed). ``peer_lam``: the JAX step's lambda (default ``lam``; another value
    shows that the check can fail)."""
    from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
    from odegan_kernels.models import mog_pair

    gen = torch.Generator().manual_seed(0)
    D, G = (m.to(device) for m in mog_pair())
    real = torch.randn(4, batch, 2, generator=gen).to(device)
    z = torch.randn(4, batch, 32, generator=gen).to(device)
    once, _, state = setup(D, G, real, z, h, lam if peer_lam is None else peer_lam, device)
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=h, reg=lam, reg_at="first_stage", coupling="joint")

    def closure(stage):
        i = stage.index
        return game_gradients(D, G, Batch(real[i], z[i]), "ns", stage.players, stage.penalties, engine="autograd")

    for _ in range(steps):
        st.step(closure)
        once()
    ours = torch.cat([p.detach().reshape(-1) for p in [*D.parameters(), *G.parameters()]]).cpu().numpy()
    return float(np.abs(flat_params(state["params"]) - ours).max() / np.abs(ours).max())


def finite(state) -> bool:
    """Whether every parameter of a ``setup`` state is finite (a timing of non-finite arithmetic is void)."""
    return bool(np.isfinite(flat_params(state["params"])).all())
