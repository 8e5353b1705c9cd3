"""torch.library registration of the compiled backends: opcheck (schema, fake tensors, autograd)."""

import pytest
import torch

from odegan_kernels import ops

from .conftest import DEVICE

TRITON = ops.why_unavailable("triton")


@pytest.mark.skipif(TRITON is not None, reason=f"triton backend unavailable: {TRITON}")
def test_opcheck_triton_stage():
    gen = torch.Generator().manual_seed(0)
    n = 300
    bufs = [torch.randn(n, generator=gen).to(DEVICE) for _ in range(4)]
    coeffs = torch.randn(2, 5, generator=gen).to(DEVICE)
    for reg, write in ((None, False), (torch.randn(120, generator=gen).to(DEVICE), True)):
        torch.library.opcheck(
            torch.ops.odegan_kernels.triton_stage, (*[b.clone() for b in bufs], coeffs, [0, 100], reg, write)
        )


@pytest.mark.skipif(TRITON is not None, reason=f"triton backend unavailable: {TRITON}")
def test_opcheck_triton_sqnorm():
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in ((3, 4), (5000,), (1,))]
    torch.library.opcheck(torch.ops.odegan_kernels.triton_sqnorm, (ts,))


@pytest.mark.skipif(TRITON is not None, reason=f"triton backend unavailable: {TRITON}")
def test_triton_sqnorm_is_deterministic_and_handles_empty_tensors():
    gen = torch.Generator().manual_seed(0)
    ts = [
        torch.randn(9000, generator=gen).to(DEVICE),
        torch.empty(0, device=DEVICE),
        torch.randn(33, generator=gen).to(DEVICE),
    ]
    a = ops.sqnorm(ts, backend="triton")
    b = ops.sqnorm(ts, backend="triton")
    assert torch.equal(a, b)
    assert torch.allclose(a.cpu(), sum(t.double().square().sum() for t in ts).float().cpu(), rtol=1e-6)


CSRC = ops.why_unavailable("csrc")
needs_csrc = pytest.mark.skipif(CSRC is not None, reason=f"csrc library unavailable: {CSRC}")


@needs_csrc
def test_opcheck_csrc_ops():
    gen = torch.Generator().manual_seed(0)
    bufs = [torch.randn(300, generator=gen) for _ in range(4)]
    coeffs = torch.randn(2, 5, generator=gen)
    for reg, write in ((None, False), (torch.randn(120, generator=gen), True)):
        args = (*[b.clone() for b in bufs], coeffs, [0, 100], reg, write)
        torch.library.opcheck(torch.ops.odegan_kernels.stage, args)
    ts = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((3, 4), (40000,), (1,))]
    torch.library.opcheck(torch.ops.odegan_kernels.sqnorm, (ts,))


@needs_csrc
def test_csrc_checks_its_own_arguments():
    """The C++ entry points validate with TORCH_CHECK even when called without the Python wrapper."""
    p, g, x0, acc = (torch.zeros(16) for _ in range(4))
    c = torch.zeros(1, 5)
    stage = torch.ops.odegan_kernels.stage
    with pytest.raises(RuntimeError, match="grads is Double but params is Float"):
        stage(p, g.double(), x0, acc, c, [0], None, False)
    with pytest.raises(RuntimeError, match="acc has 15 elements"):
        stage(p, g, x0, acc[:15], c, [0], None, False)
    with pytest.raises(RuntimeError, match="x0 must be contiguous"):
        stage(p, g, torch.zeros(32)[::2], acc, c, [0], None, False)
    with pytest.raises(RuntimeError, match=r"coeffs must be \[2, 5\]"):
        stage(p, g, x0, acc, c, [0, 8], None, False)
    with pytest.raises(RuntimeError, match="starts must be ascending"):
        stage(p, g, x0, acc, torch.zeros(2, 5), [0, 20], None, False)
    with pytest.raises(RuntimeError, match="params is empty"):
        stage(*(torch.zeros(0) for _ in range(4)), c, [0], None, False)
    with pytest.raises(RuntimeError, match="reg_grad has 17 elements"):
        stage(p, g, x0, acc, c, [0], torch.zeros(17), False)
    for i, name in enumerate(("params", "grads", "x0", "acc")):  # as ATen's in-place ops do, with grad mode on
        bufs = [torch.full((16,), float("nan")) for _ in range(4)]
        bufs[i].requires_grad_()
        with pytest.raises(RuntimeError, match=f"{name} requires grad"):
            stage(*bufs, c, [0], None, True)
        assert all(b.isnan().all() for b in bufs), "a refused call wrote a buffer"
        with torch.no_grad():  # allowed there: a leaf's own graph is not at stake
            stage(*bufs, c, [0], None, True)
    # Every buffer it writes has its version bumped: a backward through a graph that saved one of them fails
    # (grads, only read, stays usable).
    for i, written in enumerate((True, False, True, True)):
        bufs = [torch.zeros(16) for _ in range(4)]
        w = torch.ones(16, requires_grad=True)
        loss = (w * bufs[i]).sum()  # saves bufs[i] for w's gradient
        stage(*bufs, c, [0], None, True)
        if written:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
        else:
            loss.backward()
    with pytest.raises(RuntimeError, match="reg_grad requires grad"):
        stage(p, g, x0, acc, c, [0], torch.zeros(3, requires_grad=True), False)
    with pytest.raises(RuntimeError, match="no tensor arguments"):  # the dispatcher refuses before us
        torch.ops.odegan_kernels.sqnorm([])
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is Double"):
        torch.ops.odegan_kernels.sqnorm([torch.ones(2), torch.ones(2, dtype=torch.float64)])


@pytest.mark.skipif(TRITON is not None, reason=f"triton backend unavailable: {TRITON}")
def test_triton_sqnorm_capture_path_equals_table_path():
    """The per-tensor launches used under CUDA-graph capture give exactly the table path's result."""
    from odegan_kernels.ops.triton_sqnorm import SQ_CHUNK, launch_sqnorm

    gen = torch.Generator().manual_seed(3)
    ts = [torch.randn(n, generator=gen).to(DEVICE) for n in (1, 17, SQ_CHUNK, SQ_CHUNK + 5, 3 * SQ_CHUNK - 1)]
    a = launch_sqnorm(ts, per_tensor=False)
    b = launch_sqnorm(ts, per_tensor=True)
    # the two paths may sum in a different order once compiled (scalar vs vector loads): fp32 tolerance
    assert torch.allclose(a, b, rtol=2e-6, atol=0) and torch.isfinite(a)
    assert torch.allclose(a.double(), sum(t.double().square().sum() for t in ts), rtol=1e-6)


# each compiled backend's registered (stage, sqnorm) ops
CUSTOM_OPS = {
    "triton": lambda: (torch.ops.odegan_kernels.triton_stage, torch.ops.odegan_kernels.triton_sqnorm),
    "csrc": lambda: (torch.ops.odegan_kernels.stage, torch.ops.odegan_kernels.sqnorm),
}
COMPILED = [b for b in CUSTOM_OPS if ops.why_unavailable(b) is None]


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_stage_with_more_segments_than_one_launch_takes(backend):
    """Nine and 33 segments (one launch takes at most 8): schema, fake and autograd registration still hold."""
    stage, _ = CUSTOM_OPS[backend]()
    gen = torch.Generator().manual_seed(1)
    n = 700
    for nseg in (9, 33):
        starts = [0] + sorted(torch.randperm(n - 1, generator=gen)[: nseg - 1].add(1).tolist())
        bufs = [torch.randn(n, generator=gen).to(DEVICE) for _ in range(4)]
        coeffs = torch.randn(nseg, 5, generator=gen).to(DEVICE)
        reg = torch.randn(n // 2, generator=gen).to(DEVICE)
        torch.library.opcheck(stage, (*bufs, coeffs, starts, reg, True))


@pytest.mark.parametrize("backend", COMPILED)
def test_custom_ops_under_torch_compile(backend):
    """A stage and a sqnorm inside torch.compile(fullgraph=True): no graph break, same result as eager."""
    from odegan_kernels.ops import reference

    gen = torch.Generator().manual_seed(0)
    n, segs = 1000, [(0, 400), (400, 1000)]
    g, x0, acc = (torch.randn(n, generator=gen).to(DEVICE) for _ in range(3))
    coeffs = torch.randn(2, 5, generator=gen).to(DEVICE)
    stage, sqnorm = CUSTOM_OPS[backend]()
    starts = [s for s, _ in segs]

    def step(p, g, x0, acc, coeffs):
        stage(p, g, x0, acc, coeffs, starts, None, True)
        return sqnorm([p, acc])

    want_p, want_x0, want_acc = torch.empty(n, device=DEVICE), x0.clone(), acc.clone()
    reference.stage(want_p, g, want_x0, want_acc, coeffs, segs, write_x0=True)
    p, x0c, accc = torch.full((n,), float("nan"), device=DEVICE), x0.clone(), acc.clone()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(p, g, x0c, accc, coeffs)
    assert torch.allclose(p, want_p, atol=1e-6) and torch.allclose(accc, want_acc, atol=1e-6)
    assert torch.allclose(x0c, want_p, atol=1e-6)
    assert torch.allclose(out, reference.sqnorm([want_p, want_acc]), rtol=1e-5)


# -- ema_update --------------------------------------------------------------------------------------------
EMA_OPS = {
    "triton": lambda: torch.ops.odegan_kernels.triton_ema_update,
    "csrc": lambda: torch.ops.odegan_kernels.ema_update,
}


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_ema_update(backend):
    """Schema (avg mutated, nothing else), fake kernel and autograd registration, float and tensor decay, fp32
    and fp64, empty and odd sizes."""
    op = EMA_OPS[backend]()
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for n in (0, 1, 301):
            avg, params = (torch.randn(n, generator=gen, dtype=dtype).to(DEVICE) for _ in range(2))
            torch.library.opcheck(op, (avg.clone(), params, None, 0.75))
            torch.library.opcheck(op, (avg.clone(), params, torch.tensor(0.25, dtype=dtype, device=DEVICE), 0.0))


@pytest.mark.parametrize("backend", COMPILED)
def test_ema_update_under_torch_compile(backend):
    """An RK stage and the average's update in one torch.compile(fullgraph=True) region: no graph break."""
    from odegan_kernels.ops import reference

    gen = torch.Generator().manual_seed(0)
    n = 1000
    g, x0, acc, avg = (torch.randn(n, generator=gen).to(DEVICE) for _ in range(4))
    coeffs = torch.randn(1, 5, generator=gen).to(DEVICE)
    decay = torch.tensor(0.9, device=DEVICE)
    stage, _ = CUSTOM_OPS[backend]()
    ema = EMA_OPS[backend]()

    def step(p, x0, acc, avg):
        stage(p, g, x0, acc, coeffs, [0], None, True)
        ema(avg, p, decay, 0.0)

    want = [torch.empty(n, device=DEVICE), x0.clone(), acc.clone(), avg.clone()]
    reference.stage(want[0], g, want[1], want[2], coeffs, [(0, n)], write_x0=True)
    reference.ema_update(want[3], want[0], decay)
    got = [torch.full((n,), float("nan"), device=DEVICE), x0.clone(), acc.clone(), avg.clone()]
    torch.compile(step, backend="aot_eager", fullgraph=True)(*got)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)


@needs_csrc
def test_csrc_ema_update_checks_its_own_arguments():
    """The C++ entry point validates with TORCH_CHECK without the Python wrapper; its Autograd kernel refuses
    tensors that require grad and bumps avg's version."""
    op = torch.ops.odegan_kernels.ema_update
    avg, params = torch.zeros(16), torch.ones(16)
    with pytest.raises(RuntimeError, match="params is Double but avg is Float"):
        op(avg, params.double(), None, 0.5)
    with pytest.raises(RuntimeError, match="params has 15 elements but avg has 16"):
        op(avg, params[:15], None, 0.5)
    with pytest.raises(RuntimeError, match="avg must be 1-D"):
        op(avg.view(4, 4), params, None, 0.5)
    with pytest.raises(RuntimeError, match="params must be contiguous"):
        op(avg, torch.ones(32)[::2], None, 0.5)
    with pytest.raises(RuntimeError, match="avg must be float32 or float64"):
        op(avg.half(), params.half(), None, 0.5)
    with pytest.raises(RuntimeError, match="overlaps params"):
        op(avg, avg, None, 0.5)
    with pytest.raises(RuntimeError, match=r"decay must be finite, in \[0, 1\]"):
        op(avg, params, None, 1.5)
    with pytest.raises(RuntimeError, match=r"decay must be finite, in \[0, 1\]"):
        op(avg, params, torch.tensor(float("nan")), 0.0)  # on a CPU the tensor's value is read: checked too
    with pytest.raises(RuntimeError, match="decay_tensor must be 0-dim"):
        op(avg, params, torch.ones(1), 0.0)
    with pytest.raises(RuntimeError, match="decay_tensor must be of avg's dtype"):
        op(avg, params, torch.tensor(0.5, dtype=torch.float64), 0.0)
    assert avg.eq(0).all(), "a refused call wrote avg"
    for i, name in enumerate(("avg", "params", "decay_tensor")):
        args = [torch.full((16,), float("nan")), torch.ones(16), torch.tensor(0.5)]
        args[i].requires_grad_()
        with pytest.raises(RuntimeError, match=f"{name} requires grad"):
            op(*args, 0.0)
        assert args[0].isnan().all(), "a refused call wrote avg"
    avg = torch.zeros(16)
    w = torch.ones(16, requires_grad=True)
    loss = (w * avg).sum()  # saves avg for w's gradient
    op(avg, params, torch.tensor(0.5), 0.0)
    assert avg.eq(0.5).all()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif(TRITON is not None, reason=f"triton backend unavailable: {TRITON}")
def test_triton_sqnorm_table_cache_knows_the_dtype():
    """A float64 view of float32 storage has the same address and, here, the same length as a float32 slice:
    the cached chunk table must not be reused across them."""
    from odegan_kernels.ops.triton_sqnorm import SQ_CHUNK, launch_sqnorm

    n = 3 * SQ_CHUNK + 7
    storage = torch.randn(2 * n, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    as32, as64 = storage[:n], storage.view(torch.float64)
    assert as32.data_ptr() == as64.data_ptr() and as32.numel() == as64.numel()
    want32, want64 = as32.double().square().sum(), as64.square().sum()
    got32 = launch_sqnorm([as32], per_tensor=False)
    got64 = launch_sqnorm([as64], per_tensor=False)
    assert torch.allclose(got32.double(), want32, rtol=1e-6) and torch.isfinite(got64)
    assert torch.allclose(got64, want64, rtol=1e-12)
