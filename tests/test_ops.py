"""Every backend of the fused ops against the reference, on fresh random inputs with poisoned outputs."""

import pytest
import torch

from odegan_kernels import TABLEAUS, compile_tableau, ops
from odegan_kernels.ops import reference

from .conftest import DEVICE, TOL, assert_close, poison

BACKENDS = [b for b in ("foreach", "triton", "csrc") if ops.why_unavailable(b) is None]
# Large sizes only where a backend runs natively (on a CPU, Triton runs in its slow interpreter).
NATIVE = BACKENDS if DEVICE.type == "cuda" else [b for b in BACKENDS if b != "triton"]


def make_segments(n: int, nseg: int, gen) -> list[tuple[int, int]]:
    if nseg == 1 or n < nseg:
        return [(0, n)]
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: nseg - 1].add(1).tolist())
    bounds = [0] + cuts + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def run_stage(backend, n, nseg, coeffs_fn, dtype, gen, reg_len=None, write_x0=False, poison_acc=False):
    segs = make_segments(n, nseg, gen)
    g = torch.randn(n, generator=gen, dtype=dtype).to(DEVICE)
    x0 = torch.randn(n, generator=gen, dtype=dtype).to(DEVICE)
    acc = torch.randn(n, generator=gen, dtype=dtype).to(DEVICE)
    reg = None if reg_len is None else torch.randn(reg_len, generator=gen, dtype=dtype).to(DEVICE)
    coeffs = coeffs_fn(len(segs)).to(dtype)
    if poison_acc:
        coeffs[:, 0] = 0.0
        poison(acc)
    coeffs = coeffs.to(DEVICE)
    want = dict(p=torch.empty(n, dtype=dtype, device=DEVICE), acc=acc.clone(), x0=x0.clone())
    poison(want["p"])
    reference.stage(want["p"], g.clone(), want["x0"], want["acc"], coeffs, segs, reg=reg, write_x0=write_x0)
    got = dict(p=poison(torch.empty(n, dtype=dtype, device=DEVICE)), acc=acc.clone(), x0=x0.clone())
    ops.rk_stage(got["p"], g, got["x0"], got["acc"], coeffs, segs, reg=reg, write_x0=write_x0, backend=backend)
    for key in ("p", "acc", "x0"):
        assert_close(got[key], want[key], what=f"{backend} {key} n={n} segs={segs[:3]}", **TOL[dtype])
    if not write_x0:
        assert torch.equal(got["x0"], x0), "x0 was written although write_x0=False"


def rand_coeffs(gen):
    return lambda nseg: torch.randn(nseg, 5, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 13, 1021, 4099])
@pytest.mark.parametrize("nseg", [1, 2, 5])
def test_stage_matches_reference(backend, n, nseg, rng):
    for write_x0 in (False, True):
        run_stage(backend, n, nseg, rand_coeffs(rng), torch.float32, rng, write_x0=write_x0)


@pytest.mark.parametrize("backend", NATIVE)
def test_stage_large(backend, rng):
    run_stage(backend, 2**20 + 7, 3, rand_coeffs(rng), torch.float32, rng, reg_len=2**19 + 3, write_x0=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg_len", [0, 1, 300, 1021])
def test_stage_regulariser_prefix(backend, reg_len, rng):
    # reg covers a prefix (D's segment): it may end inside, at the edge of, or past a segment boundary.
    run_stage(backend, 1021, 2, rand_coeffs(rng), torch.float32, rng, reg_len=reg_len)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage_acc_not_read_when_a_is_zero(backend, rng):
    run_stage(backend, 1021, 2, rand_coeffs(rng), torch.float32, rng, poison_acc=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", sorted(TABLEAUS))
def test_stage_every_tableau_schedule(backend, method, rng):
    """Every (a, b, c, d, e) the stepper issues for each tableau, with per-player step sizes."""
    stages = compile_tableau(TABLEAUS[method])
    h = [0.04, 0.1]
    for i, st in enumerate(stages):
        for e in (0.0, 0.42):

            def coeffs(nseg, st=st, e=e):
                rows = [(st.a, st.b, -h[s % 2] * st.c, -h[s % 2] * st.d, e if s == 0 else 0.0) for s in range(nseg)]
                return torch.tensor(rows, dtype=torch.float64)

            run_stage(backend, 777, 2, coeffs, torch.float32, rng, reg_len=300, write_x0=i == len(stages) - 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage_float64(backend, rng):
    run_stage(backend, 1021, 3, rand_coeffs(rng), torch.float64, rng, reg_len=500, write_x0=True)


# -- bad inputs: one clear error each, for every backend ------------------------------------------------
def _bufs(n=16, dtype=torch.float32):
    return [torch.zeros(n, dtype=dtype, device=DEVICE) for _ in range(4)]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_stage_bad_inputs(backend):
    p, g, x0, acc = _bufs()
    c = torch.zeros(1, 5, device=DEVICE)
    seg = [(0, 16)]
    with pytest.raises(TypeError, match="grads is torch.float64"):
        ops.rk_stage(p, g.double(), x0, acc, c, seg, backend=backend)
    with pytest.raises(TypeError, match="float16"):
        ops.rk_stage(*_bufs(dtype=torch.float16), c.half(), seg, backend=backend)
    with pytest.raises(ValueError, match="acc has 15 elements"):
        ops.rk_stage(p, g, x0, acc[:15], c, seg, backend=backend)
    with pytest.raises(ValueError, match="x0 must be contiguous"):
        ops.rk_stage(p, g, torch.zeros(32, device=DEVICE)[::2], acc, c, seg, backend=backend)
    with pytest.raises(ValueError, match="flat 1-D"):
        ops.rk_stage(p.view(4, 4), g, x0, acc, c, seg, backend=backend)
    with pytest.raises(ValueError, match="params .* overlaps x0"):
        ops.rk_stage(p, g, p, acc, c, seg, backend=backend)
    with pytest.raises(ValueError, match="acc .* overlaps grads"):
        ops.rk_stage(p, g, x0, g, c, seg, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        ops.rk_stage(*_bufs(0), c, [(0, 0)], backend=backend)
    with pytest.raises(ValueError, match="segments cover"):
        ops.rk_stage(p, g, x0, acc, c, [(0, 10)], backend=backend)
    with pytest.raises(ValueError, match="contiguous ascending"):
        ops.rk_stage(p, g, x0, acc, torch.zeros(2, 5, device=DEVICE), [(0, 10), (11, 16)], backend=backend)
    with pytest.raises(ValueError, match=r"coeffs must have shape \[1, 5\]"):
        ops.rk_stage(p, g, x0, acc, torch.zeros(1, 4, device=DEVICE), seg, backend=backend)
    with pytest.raises(ValueError, match="reg has 17 elements"):
        ops.rk_stage(p, g, x0, acc, c, seg, reg=torch.zeros(17, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="is on meta"):
        ops.rk_stage(p, g, x0, torch.zeros(16, device="meta"), c, seg, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.rk_stage(*_bufs(), torch.zeros(1, 5, device=DEVICE), [(0, 16)], backend="fast")


def test_auto_records_its_choice(monkeypatch):
    ops.rk_stage(*_bufs(), torch.zeros(1, 5, device=DEVICE), [(0, 16)])
    assert ops.choices[("stage", DEVICE.type)] in BACKENDS
    monkeypatch.setenv("ODEGAN_BACKEND", "reference")
    assert ops.resolve("auto", torch.device("cpu"), "stage") == "reference"
    monkeypatch.setenv("ODEGAN_BACKEND", "nope")
    with pytest.raises(ValueError, match="ODEGAN_BACKEND"):
        ops.resolve("auto", torch.device("cpu"), "stage")


def test_deprecated_cuda_alias_warns_and_runs_csrc(monkeypatch, rng):
    """'cuda' was the csrc backend's name: it still works, for backend= and ODEGAN_BACKEND, with one warning."""
    p, g, x0, acc = (torch.randn(64, generator=rng) for _ in range(4))
    coeffs = torch.randn(1, 5, generator=rng)
    want = [p.clone(), acc.clone(), x0.clone()]
    ops.rk_stage(want[0], g, want[2], want[1], coeffs, [(0, 64)], write_x0=True, backend="reference")
    with pytest.warns(DeprecationWarning, match="backend 'cuda' is deprecated: use 'csrc'") as rec:
        ops.rk_stage(p, g, x0, acc, coeffs, [(0, 64)], write_x0=True, backend="cuda")
    assert len(rec) == 1 and rec[0].filename == __file__, "the warning should point at the caller's line"
    for got, exp in zip((p, acc, x0), want):
        assert_close(got, exp, **TOL[torch.float32])
    with pytest.warns(DeprecationWarning, match="use 'csrc'"):
        assert ops.resolve("cuda", torch.device("cpu"), "stage") == "csrc"
    with pytest.warns(DeprecationWarning, match="use 'csrc'"):
        assert ops.why_unavailable("cuda") is None
    monkeypatch.setenv("ODEGAN_BACKEND", "cuda")
    with pytest.warns(DeprecationWarning, match="use 'csrc'"):
        assert ops.resolve("auto", torch.device("cpu"), "stage") == "csrc"
    assert "cuda" not in ops.BACKENDS and "csrc" in ops.BACKENDS


def test_supports_says_which_backend_runs_on_which_device(monkeypatch):
    assert ops.supports("reference", "cpu") and ops.supports("foreach", torch.device("cpu"))
    assert ops.supports("csrc", "cpu") == (ops.why_unavailable("csrc") is None)  # conftest builds it
    assert ops.supports("csrc", "meta") is False
    monkeypatch.setitem(ops._unavailable, "triton", "not here")
    monkeypatch.delitem(ops._modules, "triton", raising=False)
    assert ops.supports("triton", "cpu") is False and ops.supports("triton", "cuda") is False
    with pytest.warns(DeprecationWarning, match="use 'csrc'"):
        assert ops.supports("cuda", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.supports("auto", "cpu")


# -- sqnorm ----------------------------------------------------------------------------------------
def _tensors(gen, dtype, shapes=((3, 5), (1,), (7,), (2, 3, 4), (1021,))):
    return [torch.randn(*s, generator=gen, dtype=dtype).to(DEVICE) for s in shapes]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqnorm_matches_reference(backend, dtype, rng):
    ts = _tensors(rng, dtype)
    want = reference.sqnorm(ts)
    got = ops.sqnorm(ts, backend=backend)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else TOL[dtype]
    assert_close(got.reshape(1), want.reshape(1), what=f"{backend} sqnorm", **tol)


@pytest.mark.parametrize("backend", NATIVE)
def test_sqnorm_large(backend, rng):
    ts = [torch.randn(2**20 + 3, generator=rng).to(DEVICE), torch.randn(17, generator=rng).to(DEVICE)]
    want = sum(t.double().square().sum() for t in ts)
    got = ops.sqnorm(ts, backend=backend)
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_sqnorm_gradcheck(backend, rng):
    ts = [t.requires_grad_() for t in _tensors(rng, torch.float64, ((3, 2), (5,), (1,)))]
    fn = lambda *xs: ops.sqnorm(list(xs), backend=backend)
    assert torch.autograd.gradcheck(fn, ts)
    assert torch.autograd.gradgradcheck(fn, ts)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_sqnorm_bad_inputs(backend):
    with pytest.raises(ValueError, match="tensors is empty"):
        ops.sqnorm([], backend=backend)
    with pytest.raises(TypeError, match=r"tensors\[1\] is torch.float64"):
        ops.sqnorm([torch.ones(3), torch.ones(3, dtype=torch.float64)], backend=backend)
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        ops.sqnorm([torch.ones(3, device=DEVICE), torch.ones(3, device="meta")], backend=backend)
    with pytest.raises(TypeError, match="torch.int64"):
        ops.sqnorm([torch.ones(3, dtype=torch.int64)], backend=backend)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, by design
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_sqnorm_overflow_is_inf_not_an_error(backend):
    """A diverging run must reach the trainer's non-finite check, not crash inside a kernel."""
    ts = [torch.full((1000,), 3e37, device=DEVICE), torch.ones(3, device=DEVICE)]
    out = ops.sqnorm(ts, backend=backend)
    assert out.dtype == torch.float32 and torch.isinf(out).item()
