"""A peer on the same device: the toy MLP pair's joint RK4 step written in JAX, for bench/step.py.

The same step as bench/step.py's ``ours`` row, from the same parameters and data: the non-saturating loss, a
fresh real batch and z per stage, D's gradient with G's samples held fixed, ODE-GAN's regulariser
||dl_G/dphi||^2 differentiated w.r.t. D and folded into stage 1's gradient with weight lambda / b1 = 6 lambda,
then theta <- theta0 - h/6 (k1 + 2 k2 + 2 k3 + k4). Two ways to run it, both compiled by XLA:

  jax_jit    one ``jax.jit``-compiled step per call (what a training loop calling a jitted step pays)
  jax_scan   ``lax.scan`` of 100 steps in one compiled call, per step (JAX's best case: no dispatch at all)

The colab variant (``make_colab_step``, ``setup(variant="colab")``) is the main job's step: decoupled players, one
batch for all stages, g_reg after the step (bench/colab_step.py times it; bench/jax_mog.py trains with it);
``setup_population`` vmaps it over K members (bench/population.py's jax_vmap rows).

Optional: it runs where ``jax`` is importable (``pip install "jax[cpu]"``; the GPU image has it) and is never a
dependency of the package. ``check_against_ours`` measures how far one JAX step lands from ODEStepper's.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

TOY_STAGES = 4  # RK4: the stage points x0 + c_i h k_{i-1} with c = (0, 1/2, 1/2, 1) and weights (1, 2, 2, 1) / 6


def available() -> bool:
    """Whether jax is installed here (it is an optional benchmark dependency); does not import it, so the
    environment ``import_jax`` sets up still applies."""
    import importlib.util

    return importlib.util.find_spec("jax") is not None


def import_jax(device: str):
    """jax, set up before its first import: on a machine without a GPU, the CPU platform only and one Eigen
    thread (the torch toy runs on one); with a GPU, no preallocation of 75% of its memory, which torch in this
    process needs too. Computations go to the device their inputs were put on (``setup``), so a CPU check and a
    GPU timing can share one process. Matrix products at full fp32 (``HIGHEST``), as torch's default: on a GPU
    JAX would otherwise use TF32."""
    if "jax" not in sys.modules:
        torch = sys.modules.get("torch")  # a process without torch (bench/jax_mog.py) has no GPU to share
        if device == "cpu" and not (torch is not None and torch.cuda.is_available()):
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_cpu_multi_thread_eigen" not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    return jax


def jax_device(device: str):
    """The JAX device for torch's device type ``device`` (cpu or cuda)."""
    jax = import_jax(device)
    return jax.devices("cpu" if device == "cpu" else "gpu")[0]


def linear_layers(module: torch.nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W^T, b) of each Linear of a plain ReLU MLP (Linear, ReLU, ..., Linear, optionally Squeeze), in order."""
    import torch

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


def toy_game(device: str):
    """The toy pair's losses as JAX functions: (mlp, loss_d, loss_g, penalty), the non-saturating loss with D's
    gradient taken with G's samples held fixed and penalty(d, g, z) = ||dl_G/dphi||^2 (a function of D's params)."""
    jax = import_jax(device)
    jnp = jax.numpy

    def mlp(layers, x):
        for i, (w, b) in enumerate(layers):
            x = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST) + b
            if i < len(layers) - 1:
                x = jax.nn.relu(x)
        return x

    def d_logits(d, x):
        return mlp(d, x)[..., 0]

    def loss_d(d, real, fake):  # fake: G's samples, a constant here
        return jnp.mean(jax.nn.softplus(-d_logits(d, real))) + jnp.mean(jax.nn.softplus(d_logits(d, fake)))

    def loss_g(g, d, z):
        return jnp.mean(jax.nn.softplus(-d_logits(d, mlp(g, z))))

    def penalty(d, g, z):
        return sum(jnp.sum(t * t) for t in jax.tree_util.tree_leaves(jax.grad(loss_g)(g, d, z)))

    return mlp, loss_d, loss_g, penalty


def _axpy(jax, x, a, k):  # x + a k over a parameter tree
    return jax.tree_util.tree_map(lambda p, q: p + a * q, x, k)


def make_step(h: float, lam: float, device: str = "cpu"):
    """step(params, real, z) -> params: one joint RK4 step of the toy pair; params = (D's layers, G's layers),
    real [4, B, 2] and z [4, B, z_dim] (stage i reads real[i], z[i])."""
    jax = import_jax(device)
    mlp, loss_d, loss_g, penalty = toy_game(device)

    def field(params, real, z, regularise: bool):
        d, g = params
        kd = jax.grad(loss_d)(d, real, jax.lax.stop_gradient(mlp(g, z)))
        if regularise:
            kd = jax.tree_util.tree_map(lambda a, r: a + 6.0 * lam * r, kd, jax.grad(penalty)(d, g, z))
        return kd, jax.grad(loss_g)(g, d, z)

    def step(params, real, z):
        k1 = field(params, real[0], z[0], True)
        k2 = field(_axpy(jax, params, -h / 2, k1), real[1], z[1], False)
        k3 = field(_axpy(jax, params, -h / 2, k2), real[2], z[2], False)
        k4 = field(_axpy(jax, params, -h, k3), real[3], z[3], False)
        total = jax.tree_util.tree_map(lambda a, b, c, e: a + 2 * b + 2 * c + e, k1, k2, k3, k4)
        return _axpy(jax, params, -h / 6, total)

    return step


def colab_step_fn(device: str = "cpu"):
    """step(params, real, z, h, lam) -> params: the colab's RK4 step of the toy pair, the main job's (``odegan
    train mog``): each player integrated with the other frozen at the step's start (decoupled), one real batch
    [B, 2] and one z [B, z_dim] for all four stages, and theta <- theta - h lambda g_reg after the step, with
    g_reg = grad_theta ||dl_G/dphi||^2 at the step's start. h and lam are traced (a vmap may give each member
    its own)."""
    jax = import_jax(device)
    mlp, loss_d, loss_g, penalty = toy_game(device)
    tmap = jax.tree_util.tree_map

    def step(params, real, z, h, lam):
        d0, g0 = params
        fake = jax.lax.stop_gradient(mlp(g0, z))  # G frozen at the step's start: the same samples at every stage

        def kd(d):
            return jax.grad(loss_d)(d, real, fake)

        def kg(g):
            return jax.grad(loss_g)(g, d0, z)  # D frozen at the step's start

        ks_d, ks_g = [kd(d0)], [kg(g0)]
        for c in (0.5, 0.5, 1.0):
            ks_d.append(kd(_axpy(jax, d0, -h * c, ks_d[-1])))
            ks_g.append(kg(_axpy(jax, g0, -h * c, ks_g[-1])))
        reg = jax.grad(penalty)(d0, g0, z)
        rk4 = lambda a, b, c, e: a + 2 * b + 2 * c + e  # noqa: E731
        d = tmap(lambda p, s, r: p - h / 6 * s - h * lam * r, d0, tmap(rk4, *ks_d), reg)
        g = _axpy(jax, g0, -h / 6, tmap(rk4, *ks_g))
        return d, g

    return step


def make_colab_step(h: float, lam: float, device: str = "cpu"):
    """step(params, real, z) -> params: colab_step_fn's step with h and lambda fixed."""
    step = colab_step_fn(device)
    return lambda params, real, z: step(params, real, z, h, lam)


VARIANTS = {"joint": make_step, "colab": make_colab_step}


MOG_GRID, MOG_STD = (-1.5, -0.5, 0.5, 1.5), 0.02  # the main job's 16 Gaussians (odegan_kernels/data.py)


def mog_draw(key, batch: int, device: str = "cpu"):
    """(real [B, 2], z [B, 32]): one batch of the 16-Gaussian mixture and one z drawn in JAX from ``key``, each mode
    equally often as the main job draws it (B a multiple of 16: mode i % 16 for sample i)."""
    jax = import_jax(device)
    jnp = jax.numpy
    centres = jnp.array([[x, y] for x in MOG_GRID for y in MOG_GRID], jnp.float32)
    kx, kz = jax.random.split(key)
    real = centres[jnp.arange(batch) % 16] + MOG_STD * jax.random.normal(kx, (batch, 2), jnp.float32)
    return real, jax.random.normal(kz, (batch, 32), jnp.float32)


def setup_population(
    pairs, h, lam, batch: int = 512, device: str = "cpu", seed: int = 0, scan_steps: int = 10
):  # fmt: skip
    """(step once, run scan_steps steps in one call, state) for K members trained as one ``jax.vmap`` of the colab
    step: member k starts from ``pairs[k]`` = (D, G), has its own step size h[k] and lambda lam[k] (numbers or one
    per member) and draws its own batch and z inside JAX at every step. state["params"]: the stacked parameters."""
    jax = import_jax(device)
    jnp = jax.numpy
    k = len(pairs)
    hs = jnp.asarray(np.broadcast_to(np.asarray(h, np.float32), (k,)).copy())
    lams = jnp.asarray(np.broadcast_to(np.asarray(lam, np.float32), (k,)).copy())
    each = [jax_params(D, G, device) for D, G in pairs]
    params = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *each)
    step = jax.vmap(colab_step_fn(device))
    draw = jax.vmap(lambda key: mog_draw(key, batch, device))

    def advance(p, key):
        real, z = draw(jax.random.split(key, k))
        return step(p, real, z, hs, lams)

    jit_step = jax.jit(advance)

    @jax.jit
    def scan(p, key):
        return jax.lax.scan(lambda q, kk: (advance(q, kk), None), p, jax.random.split(key, scan_steps))[0]

    state = {"params": jax.device_put(params, jax_device(device)), "key": jax.random.PRNGKey(seed)}

    def once():
        state["key"], sub = jax.random.split(state["key"])
        state["params"] = jax.block_until_ready(jit_step(state["params"], sub))

    def many():
        state["key"], sub = jax.random.split(state["key"])
        state["params"] = jax.block_until_ready(scan(state["params"], sub))

    return once, many, state


def jax_params(D, G, device: str = "cpu"):
    """(D's layers, G's layers) as JAX arrays on JAX's device for ``device``."""
    jax = import_jax(device)
    jnp = jax.numpy
    return jax.device_put(
        ([(jnp.asarray(w), jnp.asarray(b)) for w, b in linear_layers(D)],
         [(jnp.asarray(w), jnp.asarray(b)) for w, b in linear_layers(G)]),
        jax_device(device),
    )  # fmt: skip


def setup(
    D, G, real: torch.Tensor, z: torch.Tensor, h: float, lam: float, device: str = "cpu", scan_steps: int = 100,
    variant: str = "joint",
):  # fmt: skip
    """(step once, run scan_steps steps in one call, the parameters): compiled functions on JAX's device for
    ``device``, starting from D's and G's parameters and reading the same data: per stage (real [4, B, 2], z [4, B,
    z_dim]) for the ``joint`` step, one batch (real [B, 2], z [B, z_dim]) for the ``colab`` step."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    jax = import_jax(device)
    jnp = jax.numpy
    dev = jax_device(device)
    params = jax_params(D, G, device)
    r = jax.device_put(jnp.asarray(real.detach().cpu().numpy()), dev)
    zz = jax.device_put(jnp.asarray(z.detach().cpu().numpy()), dev)
    step = VARIANTS[variant](h, lam, device)
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
    h: float,
    lam: float,
    batch: int = 512,
    steps: int = 3,
    peer_lam: float | None = None,
    device: str = "cpu",
    variant: str = "joint",
) -> float:
    """max |JAX - ours| / max |ours| of the parameters after ``steps`` RK4 steps of the toy pair from the same start
    and data, JAX against ODEStepper (autograd engine), both in float32 on ``device`` (cpu or cuda: check on the
    device that is timed). ``variant``: ``joint`` (coupling joint, g_reg in stage 1, a batch per stage) or
    ``colab`` (coupling decoupled, g_reg after the step, one batch for every stage: the main job's step).
    ``peer_lam``: the JAX step's lambda (default ``lam``; another value shows that the check can fail)."""
    import torch

    from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
    from odegan_kernels.models import mog_pair

    colab = variant == "colab"
    gen = torch.Generator().manual_seed(0)
    D, G = (m.to(device) for m in mog_pair())
    real = torch.randn(4, batch, 2, generator=gen).to(device)
    z = torch.randn(4, batch, 32, generator=gen).to(device)
    if colab:
        real, z = real[0], z[0]
    once, _, state = setup(D, G, real, z, h, lam if peer_lam is None else peer_lam, device, variant=variant)
    flat = FlatParams(D=D, G=G)
    kind = dict(reg_at="after_step", coupling="decoupled") if colab else dict(reg_at="first_stage", coupling="joint")
    st = ODEStepper(flat, "rk4", h=h, reg=lam, **kind)

    def closure(stage):
        data = Batch(real, z) if colab else Batch(real[stage.index], z[stage.index])
        return game_gradients(D, G, data, "ns", stage.players, stage.penalties, engine="autograd")

    for _ in range(steps):
        st.step(closure)
        once()
    ours = torch.cat([p.detach().reshape(-1) for p in [*D.parameters(), *G.parameters()]]).cpu().numpy()
    return float(np.abs(flat_params(state["params"]) - ours).max() / np.abs(ours).max())


def finite(state) -> bool:
    """Whether every parameter of a ``setup`` state is finite (a timing of non-finite arithmetic is void)."""
    return bool(np.isfinite(flat_params(state["params"])).all())
