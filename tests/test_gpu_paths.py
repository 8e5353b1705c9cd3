"""One check per compiled kernel path that has never run on a GPU, at sizes chosen for coverage: what
`bash bench/gpu_check.sh quick` runs first (tests/test_ops.py, test_ema.py and test_custom_ops.py are the full sweep).

Each Triton and csrc kernel against the reference on fresh random inputs: fp32 and fp64 (bf16 is supported by no
backend: its refusal is checked), odd sizes, every block-size class of the Triton launches (n < 2**16, < 2**22 and
above), buffers off a 16-byte boundary (the scalar paths), more than 8 segments (several launches), the
regulariser's prefix ending mid-block, stage 1's unread acc, sqnorm over more tensors than csrc's small table and
more chunks than one wave of blocks, and every write checked against a poisoned guard around the buffers. On a CPU
the same checks run at small sizes (Triton under its interpreter, csrc's CPU kernels); ODEGAN_GPU_SIZES=1 forces
the GPU sizes there (bench/triton_keys.py counts the Triton variants the GPU run compiles that way).
"""

import os

import pytest
import torch

from odegan_kernels import ops
from odegan_kernels.ops import reference

from .bounds import assert_within, gamma, stage_bound
from .conftest import DEVICE, poison

COMPILED = [b for b in ("triton", "csrc") if ops.why_unavailable(b) is None and ops.supports(b, DEVICE)]
GPU_SIZES = os.environ.get("ODEGAN_GPU_SIZES") == "1" or DEVICE.type == "cuda"
# one n per block-size class of the Triton launches (utils.launch_settings: 1024 / 2048 / 4096), all odd
STAGE_SIZES = [13, 4099, 2**20 + 7, 2**22 + 13] if GPU_SIZES else [13, 4099]
LARGE = STAGE_SIZES[-2]  # the largest size every case runs at
GUARD = 16  # poisoned elements on each side of every buffer: a write outside it is caught


def guarded(n: int, offset: int, dtype, fill: torch.Tensor | None = None):
    """A length-n view ``offset`` elements into a NaN-poisoned allocation (offset 1: not 16-byte aligned), holding
    ``fill`` (or NaN); returns (the allocation, the view)."""
    base = poison(torch.empty(n + offset + 2 * GUARD, dtype=dtype, device=DEVICE))
    view = base[GUARD + offset : GUARD + offset + n]
    if fill is not None:
        view.copy_(fill)
    return base, view


def untouched(base: torch.Tensor, n: int, offset: int) -> bool:
    lo, hi = GUARD + offset, GUARD + offset + n
    return bool(base[:lo].isnan().all() and base[hi:].isnan().all())


def segments_of(n: int, nseg: int, gen) -> list[tuple[int, int]]:
    """Two players cut at a 16-byte boundary (as FlatParams lays them out), or nseg random cuts."""
    if nseg == 2:
        cut = n // 2 // 4 * 4
        return [(0, cut), (cut, n)]
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: nseg - 1].add(1).tolist())
    bounds = [0, *cuts, n]
    return list(zip(bounds[:-1], bounds[1:]))


def stage_case(backend, n, nseg, gen, dtype=torch.float32, reg_len=None, write_x0=True, offset=0, a_zero=False):
    segs = segments_of(n, nseg, gen)
    g, x0, acc = (torch.randn(n, generator=gen, dtype=dtype).to(DEVICE) for _ in range(3))
    reg = None if reg_len is None else torch.randn(reg_len, generator=gen, dtype=dtype).to(DEVICE)
    coeffs = torch.randn(len(segs), 5, generator=gen, dtype=dtype)
    if a_zero:
        coeffs[:, 0] = 0.0  # stage 1: acc must not be read
    coeffs = coeffs.to(DEVICE)
    want_p, want_x0, want_acc = torch.empty_like(g), x0.clone(), acc.clone()
    reference.stage(want_p, g, want_x0, want_acc, coeffs, segs, reg_grad=reg, write_x0=write_x0)
    bases = {}
    bases["p"], p = guarded(n, offset, dtype)
    bases["x0"], gx0 = guarded(n, offset, dtype, x0)
    bases["acc"], gacc = guarded(n, offset, dtype, None if a_zero else acc)  # a == 0: acc stays NaN, unread
    bases["g"], gg = guarded(n, offset, dtype, g)
    ops.rk_stage(p, gg, gx0, gacc, coeffs, segs, reg_grad=reg, write_x0=write_x0, backend=backend)
    bound = stage_bound(g, x0, acc, coeffs, segs, reg)
    what = f"{backend} n={n} nseg={len(segs)} {dtype} reg={reg_len} offset={offset} a0={a_zero}"
    assert_within(p, want_p, bound["p"], f"{what}: params")
    assert_within(gacc, want_acc, bound["acc"], f"{what}: acc")
    if write_x0:
        assert_within(gx0, want_p, bound["p"], f"{what}: x0")
    else:
        assert torch.equal(gx0, x0), f"{what}: x0 written although write_x0=False"
    assert torch.equal(gg, g), f"{what}: grads written"
    for name, base in bases.items():
        assert untouched(base, n, offset), f"{what}: wrote outside {name}"


@pytest.mark.parametrize("backend", COMPILED)
def test_stage_two_players(backend):
    """The usual call: two segments at a 16-byte boundary, aligned buffers (the vector paths), the regulariser over
    most of D's segment, and the last stage's x0 write, at every size class."""
    gen = torch.Generator().manual_seed(10)
    for n in STAGE_SIZES:
        stage_case(backend, n, 2, gen, reg_len=max(1, n // 2 - 5), write_x0=True)
        stage_case(backend, n, 2, gen, reg_len=None, write_x0=False)


@pytest.mark.parametrize("backend", COMPILED)
def test_stage_more_than_8_segments_unaligned_and_stage_one(backend):
    gen = torch.Generator().manual_seed(11)
    for n in (4099, LARGE):
        stage_case(backend, n, 11, gen, reg_len=n // 3)  # two launches, the second's buffers unaligned
        stage_case(backend, n, 2, gen, reg_len=n // 2, offset=1)  # every buffer off a 16-byte boundary
        stage_case(backend, n, 2, gen, reg_len=n // 2, a_zero=True)  # acc poisoned and unread
        stage_case(backend, n, 3, gen, dtype=torch.float64, reg_len=n // 2)


@pytest.mark.parametrize("backend", COMPILED)
def test_bfloat16_is_refused_by_every_op(backend):
    """No backend computes in bf16 (the reference defines fp32 and fp64 only): a bf16 call is an error, never a
    silently wrong kernel."""
    p, g, x0, acc = (torch.zeros(64, dtype=torch.bfloat16, device=DEVICE) for _ in range(4))
    with pytest.raises(TypeError, match="bfloat16"):
        ops.rk_stage(p, g, x0, acc, torch.zeros(1, 5, dtype=torch.bfloat16, device=DEVICE), [(0, 64)], backend=backend)
    with pytest.raises(TypeError, match="bfloat16"):
        ops.sqnorm([p], backend=backend)
    with pytest.raises(TypeError, match="bfloat16"):
        ops.ema_update(p, g, 0.9, backend=backend)


# -- sqnorm ----------------------------------------------------------------------------------------------------
# All terms are non-negative, so the relative error is at most gamma_L, L the most roundings any term meets: the
# square, the serial adds of one lane (Triton: 4 per chunk; csrc: 32 per chunk, per chunk a block takes, plus 3 per
# 16-byte pack), the tree sums (10 + 10 in Triton, 5 + 5 per block and again in the final sum in csrc) and the final
# sum's serial part. At these sizes (at most 2**23 elements) L < 160 for both, so 2 gamma_160 bounds the difference
# from the float64 sum (about 1.9e-5 in float32).
SQ_RTOL = {torch.float32: 2 * gamma(160, torch.float32), torch.float64: 2 * gamma(160, torch.float64)}


def sqnorm_case(backend, sizes, dtype, gen, offset=0):
    tensors = []
    for n in sizes:
        _, t = guarded(n, offset, dtype, torch.randn(n, generator=gen, dtype=dtype))
        tensors.append(t)
    want = sum(t.detach().to("cpu", torch.float64).square().sum() for t in tensors)
    got = ops.sqnorm(tensors, backend=backend)
    what = f"{backend} sqnorm {len(sizes)} tensors, {sum(sizes)} elements, {dtype}, offset {offset}"
    assert got.dtype == dtype and got.device.type == DEVICE.type and not torch.isnan(got), what
    err = abs(got.item() - want.item())
    assert err <= SQ_RTOL[dtype] * want.item(), f"{what}: relative error {err / want.item():.2e}"
    assert torch.equal(ops.sqnorm(tensors, backend=backend), got), f"{what}: not deterministic"


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqnorm_paths(backend, dtype):
    gen = torch.Generator().manual_seed(12)
    big = 6_000_001 if GPU_SIZES else 20_001  # GPU: 367 csrc chunks, past the old 320-per-launch limit
    sqnorm_case(backend, [big], dtype, gen)  # one tensor: Triton's real-pointer kernel
    sqnorm_case(backend, [big], dtype, gen, offset=1)  # unaligned: the scalar loads
    mixed = [1, 3, 4096, 4097, 16384, 16385, 3 * 16384 + 5] + [257 * (i + 1) for i in range(33)]  # 40 tensors
    sqnorm_case(backend, mixed, dtype, gen)  # csrc's large table; Triton's table path, aligned
    sqnorm_case(backend, mixed, dtype, gen, offset=1)  # the table path unaligned
    sqnorm_case(backend, [5, big, 17], dtype, gen)  # csrc's small table, several chunks a block on a GPU


@pytest.mark.parametrize("backend", COMPILED)
def test_sqnorm_double_backward(backend):
    """The penalty's path: sqnorm's gradient is itself differentiable (gradgradcheck in float64)."""
    gen = torch.Generator().manual_seed(13)
    ts = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_() for s in ((3, 2), (5,))]
    fn = lambda *xs: ops.sqnorm(list(xs), backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, ts) and torch.autograd.gradgradcheck(fn, ts)


# -- ema_update ------------------------------------------------------------------------------------------------
def ema_case(backend, n, dtype, decay_kind, offset, gen):
    d = torch.rand((), generator=gen, dtype=torch.float64).item()
    decay = d if decay_kind == "float" else torch.tensor(d, dtype=dtype, device=DEVICE)
    avg0, params = (torch.randn(n, generator=gen, dtype=dtype).to(DEVICE) for _ in range(2))
    want = avg0.clone()
    reference.ema_update(want, params, decay)
    base_a, avg = guarded(n, offset, dtype, avg0)
    base_p, gp = guarded(n, offset, dtype, params)
    ops.ema_update(avg, gp, decay, backend=backend)
    # avg' = d*avg + (1-d)*p: each of the two terms rounded at most twice, fused or not
    dd = torch.tensor(d, dtype=dtype).item()
    mag = dd * avg0.detach().double().cpu().abs() + (1 - dd) * params.detach().double().cpu().abs()
    what = f"{backend} ema n={n} {dtype} {decay_kind} offset {offset}"
    assert_within(avg, want, 2 * gamma(2, dtype) * mag + torch.finfo(dtype).tiny, what)
    assert untouched(base_a, n, offset) and untouched(base_p, n, offset), f"{what}: wrote outside the buffers"
    assert torch.equal(gp, params), f"{what}: params written"


@pytest.mark.parametrize("backend", COMPILED)
def test_ema_paths(backend):
    gen = torch.Generator().manual_seed(14)
    for n in (7, 4099, LARGE):
        for kind in ("float", "tensor"):
            ema_case(backend, n, torch.float32, kind, 0, gen)
    for kind in ("float", "tensor"):
        ema_case(backend, 4099, torch.float32, kind, 1, gen)  # the scalar path
        ema_case(backend, 4099, torch.float64, kind, 0, gen)


# -- the registrations, on this device ----------------------------------------------------------------------
def test_opcheck_on_device():
    """torch.library.opcheck (schema, fake tensors, autograd registration) of every compiled op on DEVICE's tensors:
    tests/test_custom_ops.py checks csrc's on CPU tensors only."""
    gen = torch.Generator().manual_seed(15)
    bufs = [torch.randn(300, generator=gen).to(DEVICE) for _ in range(4)]
    coeffs = torch.randn(2, 5, generator=gen).to(DEVICE)
    reg = torch.randn(120, generator=gen).to(DEVICE)
    ts = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_() for s in ((3, 4), (5000,))]
    checked = []
    for prefix, backend in (("triton_", "triton"), ("", "csrc")):
        if backend not in COMPILED:
            continue
        lib = torch.ops.odegan_kernels
        for r, write in ((None, False), (reg, True)):
            torch.library.opcheck(
                getattr(lib, f"{prefix}stage"), (*[b.clone() for b in bufs], coeffs, [0, 100], r, write)
            )
        torch.library.opcheck(getattr(lib, f"{prefix}sqnorm"), (ts,))
        decay = torch.tensor(0.9, device=DEVICE)
        torch.library.opcheck(getattr(lib, f"{prefix}ema_update"), (bufs[0].clone(), bufs[1], decay, 0.0))
        torch.library.opcheck(getattr(lib, f"{prefix}ema_update"), (bufs[0].clone(), bufs[1], None, 0.9))
        checked.append(backend)
    assert checked == COMPILED and checked, f"no compiled backend runs on {DEVICE}"


# -- the weight average in a training run --------------------------------------------------------------------
def test_trainer_weight_average_on_the_device(tmp_path):
    """The trainer's average of G (ops.ema_update after each step, outside the captured graph on a GPU) follows the
    reference formula step by step over G's actual parameters: a copy up to ema_start, then the update."""
    from odegan_kernels.train import Trainer, make_config

    cfg = make_config(
        "mog", device=DEVICE.type, cuda_graph=DEVICE.type == "cuda", ema=0.9, ema_start=3, out=str(tmp_path),
        eval_every=10**9, log_every=10**9, plot_every=10**9, ckpt_every=10**9, progress=False,
    )  # fmt: skip
    tr = Trainer(cfg)
    lo, hi = tr.flat.segment("G")
    want = None
    for step in range(1, 11):
        tr.train_step()
        g = tr.flat.params[lo:hi].detach().clone()
        if step <= 3:
            want = g
        else:
            reference.ema_update(want, g, 0.9)
        mag = 0.9 * want.abs() + 0.1 * g.abs()  # loose: the bound of one update, times the steps so far
        assert_within(tr.ema.avg, want, step * 2 * gamma(2, torch.float32) * mag.cpu().double() + 1e-30, f"step {step}")
    assert torch.isfinite(tr.ema.avg).all() and not torch.equal(tr.ema.avg, tr.flat.params[lo:hi])


# -- h changed between replays by a torch lr scheduler -------------------------------------------------------
def _scheduled_run(cuda_graph: bool, manual: bool, steps: int = 6) -> list[torch.Tensor]:
    from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
    from odegan_kernels.models import mog_pair

    D, G = mog_pair(seed=0)
    D, G = D.to(DEVICE), G.to(DEVICE)
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=0.1, reg=0.07, cuda_graph=cuda_graph, graph_warmup=1)
    factor = lambda step: 1.0 / (1 + step % 3)  # noqa: E731
    sched = None if manual else torch.optim.lr_scheduler.LambdaLR(st, factor)
    gen = torch.Generator().manual_seed(3)
    x, z = torch.empty(4, 128, 2, device=DEVICE), torch.empty(4, 128, 32, device=DEVICE)  # static inputs
    out = []
    for s in range(steps):
        x.copy_(torch.randn(4, 128, 2, generator=gen))
        z.copy_(torch.randn(4, 128, 32, generator=gen))
        if manual:
            for group in st.param_groups:
                group["lr"] = 0.1 * factor(s)
        st.step(lambda stage: game_gradients(D, G, Batch(x[stage.index], z[stage.index]), "ns", stage.players,
                                             stage.penalties))  # fmt: skip
        if sched is not None:
            sched.step()
        out.append(flat.params.detach().clone())
    if cuda_graph:
        assert st.graph.captured
    return out


def test_an_lr_scheduler_moves_h_between_replays():
    """A torch.optim.lr_scheduler changing h every step (as the trainer's warm-up schedule does) gives exactly the
    steps of setting each group's lr by hand, and, captured on a GPU, the eager steps (1e-6): a replay reads the
    new h from the coefficient tensor."""
    eager = _scheduled_run(cuda_graph=False, manual=False)
    manual = _scheduled_run(cuda_graph=False, manual=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, manual))
    assert not torch.equal(manual[1], _fixed_h_run(2)[1]), "the schedule (h 0.1, then 0.05) must change the run"
    if DEVICE.type == "cuda":
        for e, g in zip(eager, _scheduled_run(cuda_graph=True, manual=False)):
            assert torch.isfinite(g).all() and ((g - e).norm() / e.norm()).item() <= 1e-6


def _fixed_h_run(steps: int) -> list[torch.Tensor]:
    """The same run with h left at 0.1."""
    from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
    from odegan_kernels.models import mog_pair

    D, G = mog_pair(seed=0)
    D, G = D.to(DEVICE), G.to(DEVICE)
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=0.1, reg=0.07)
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        x = torch.randn(4, 128, 2, generator=gen).to(DEVICE)
        z = torch.randn(4, 128, 32, generator=gen).to(DEVICE)
        st.step(lambda stage: game_gradients(D, G, Batch(x[stage.index], z[stage.index]), "ns", stage.players,
                                             stage.penalties))  # fmt: skip
        out.append(flat.params.detach().clone())
    return out


# -- a population on the device ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("grads", ["mlp", "autograd"])
def test_a_population_on_the_device_equals_its_solo_runs(backend, grads):
    """Three float64 members with their own h and lambda (and, on the autograd engine, their own r1 weights, instance
    noise and WGAN-GP) through the compiled stage op's per-segment coefficient rows on the device: each equals its
    solo run with the same backend (tests/test_population.py's check, 20 steps, 1e-12)."""
    from .test_population import BASE, MIXED, assert_members_equal_solo

    opts = {**BASE, "device": DEVICE.type, "backend": backend, "method": "rk4", "grads": grads}
    members = MIXED
    if grads == "autograd":
        opts.update(instance_noise=0.1, wgan_gp=0.2)
        members = [dict(m, r1=w) for m, w in zip(MIXED, (0.5, 0.0, 2.0))]
    pop = assert_members_equal_solo(opts, members)
    assert pop.flat.params.device.type == DEVICE.type and pop.opt.backend == backend
