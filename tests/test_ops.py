"""Every backend of the fused ops against the reference, on fresh random inputs with poisoned outputs."""

import pytest
import torch

from odegan_kernels import TABLEAUS, compile_tableau, ops
from odegan_kernels.ops import reference

from .bounds import assert_within, stage_bound
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
    reference.stage(want["p"], g.clone(), want["x0"], want["acc"], coeffs, segs, reg_grad=reg, write_x0=write_x0)
    got = dict(p=poison(torch.empty(n, dtype=dtype, device=DEVICE)), acc=acc.clone(), x0=x0.clone())
    ops.rk_stage(got["p"], g, got["x0"], got["acc"], coeffs, segs, reg_grad=reg, write_x0=write_x0, backend=backend)
    bound = stage_bound(g, x0, acc, coeffs, segs, reg)
    for key in ("p", "acc", "x0"):
        tol = bound["acc" if key == "acc" else "p"]
        assert_within(got[key], want[key], tol, what=f"{backend} {key} n={n} segs={segs[:3]}")
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
    with pytest.raises(ValueError, match="reg_grad has 17 elements"):
        ops.rk_stage(p, g, x0, acc, c, seg, reg_grad=torch.zeros(17, device=DEVICE), backend=backend)
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
    assert ops.choices[("stage", "cpu")] == "reference"  # a forced choice is recorded too
    monkeypatch.delenv("ODEGAN_BACKEND")
    assert ops.resolve("auto", "cpu", "sqnorm") == ops.choices[("sqnorm", "cpu")]  # a device name works too
    monkeypatch.setenv("ODEGAN_BACKEND", "nope")
    with pytest.raises(ValueError, match="ODEGAN_BACKEND"):
        ops.resolve("auto", torch.device("cpu"), "stage")


def test_the_names_removed_in_0_3_are_refused_with_todays_name(monkeypatch, rng):
    """'cuda' (the csrc backend's name before 0.2) and rk_stage's reg= (now reg_grad=) were deprecated aliases in
    0.2 and are gone in 0.3: each is refused, the message naming what to use."""
    p, g, x0, acc = (torch.randn(64, generator=rng) for _ in range(4))
    coeffs = torch.randn(1, 5, generator=rng)
    with pytest.raises(ValueError, match="backend 'cuda' is called 'csrc' since 0.2"):
        ops.rk_stage(p, g, x0, acc, coeffs, [(0, 64)], write_x0=True, backend="cuda")
    with pytest.raises(ValueError, match="'csrc'"):
        ops.resolve("cuda", torch.device("cpu"), "stage")
    with pytest.raises(ValueError, match="'csrc'"):
        ops.why_unavailable("cuda")
    monkeypatch.setenv("ODEGAN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="'csrc'"):
        ops.resolve("auto", torch.device("cpu"), "stage")
    monkeypatch.delenv("ODEGAN_BACKEND")
    assert "cuda" not in ops.BACKENDS and "csrc" in ops.BACKENDS
    with pytest.raises(TypeError, match="reg"):
        ops.rk_stage(p, g, x0, acc, coeffs, [(0, 64)], reg=torch.zeros(64))
    ops.rk_stage(p, g, x0, acc, coeffs, [(0, 64)], torch.zeros(64), True)  # reg_grad and write_x0, by position
    with pytest.raises(ImportError):
        __import__("odegan_kernels.ops.cuda")


@pytest.fixture
def fresh_backends():
    """The dispatch looks for backends again before and after the test (which changes what is available)."""
    ops.reset_backends()
    yield
    ops.reset_backends()


def test_supports_says_which_backend_runs_on_which_device(monkeypatch, fresh_backends):
    assert ops.supports("reference", "cpu") and ops.supports("foreach", torch.device("cpu"))
    assert ops.supports("csrc", "cpu") == (ops.why_unavailable("csrc") is None)  # conftest builds it
    assert ops.supports("csrc", "meta") is False
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.supports("auto", "cpu")


def test_an_unavailable_backend_says_why(monkeypatch, fresh_backends):
    pytest.importorskip("triton", reason="needs triton_kernels importable, to make it report itself unavailable")
    from odegan_kernels.ops import triton_kernels

    monkeypatch.setattr(triton_kernels, "available", lambda: (False, "not here"))
    ops.reset_backends()
    assert ops.why_unavailable("triton") == "not here"
    assert ops.supports("triton", "cpu") is False and ops.supports("triton", "cuda") is False
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable: not here"):
        ops.resolve("triton", "cpu", "stage")
    monkeypatch.setenv("ODEGAN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"backend 'triton' \(set by ODEGAN_BACKEND\) is unavailable"):
        ops.resolve("auto", "cpu", "stage")


# -- any number of segments ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("nseg", [1, 8, 9, 33])
@pytest.mark.parametrize("n", [1021, 4099])
def test_stage_any_number_of_segments(backend, nseg, n, rng):
    """A compiled launch takes at most 8 segments; more go in several launches, with reg's prefix ending in any
    of them (and auto must not pick a backend that refuses)."""
    for reg_len in (None, n // 3, n):
        run_stage(backend, n, nseg, rand_coeffs(rng), torch.float32, rng, reg_len=reg_len, write_x0=True)
    run_stage(backend, n, nseg, rand_coeffs(rng), torch.float64, rng, reg_len=n // 2)
    run_stage(backend, n, nseg, rand_coeffs(rng), torch.float32, rng, poison_acc=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage_empty_segments_across_launches(backend, rng):
    """Zero-length segments (a player with no parameters), some where one launch's group of 8 ends."""
    bounds = [0, 0, 5, 5, 5, 40, 41, 41, 41, 90, 90, 90, 300, 300]
    segs = list(zip(bounds[:-1], bounds[1:]))
    g, x0, acc = (torch.randn(300, generator=rng).to(DEVICE) for _ in range(3))
    coeffs = torch.randn(len(segs), 5, generator=rng).to(DEVICE)
    reg = torch.randn(95, generator=rng).to(DEVICE)
    want = [poison(torch.empty(300, device=DEVICE)), x0.clone(), acc.clone()]
    reference.stage(want[0], g, want[1], want[2], coeffs, segs, reg_grad=reg, write_x0=True)
    got = [poison(torch.empty(300, device=DEVICE)), x0.clone(), acc.clone()]
    ops.rk_stage(got[0], g, got[1], got[2], coeffs, segs, reg_grad=reg, write_x0=True, backend=backend)
    bound = stage_bound(g, x0, acc, coeffs, segs, reg)
    for key, a, b in zip(("params", "x0", "acc"), got, want):
        assert_within(a, b, bound["acc" if key == "acc" else "p"], what=f"{backend} {key}")


# -- tensors that require grad: refused with autograd recording, versions bumped without -----------
STAGE_ARGS = ("params", "grads", "x0", "acc", "reg_grad", "coeffs")


def _stage_call(backend, needs_grad: str | None = None, poisoned: bool = True):
    bufs = {k: torch.zeros(64, device=DEVICE) for k in ("params", "x0", "acc", "reg_grad")}
    bufs["grads"] = torch.ones(64, device=DEVICE)
    if poisoned:
        for k in ("params", "x0", "acc"):
            poison(bufs[k])
    bufs["coeffs"] = torch.ones(2, 5, device=DEVICE)
    if needs_grad:
        bufs[needs_grad].requires_grad_()

    def call():
        b = bufs
        ops.rk_stage(
            b["params"],
            b["grads"],
            b["x0"],
            b["acc"],
            b["coeffs"],
            [(0, 20), (20, 64)],
            reg_grad=b["reg_grad"],
            write_x0=True,
            backend=backend,
        )

    return bufs, call


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("name", STAGE_ARGS)
def test_stage_refuses_tensors_that_require_grad(backend, name):
    """The op writes in place and has no derivative: a leaf written behind autograd's back, or an input whose
    gradient path is silently cut, is refused by every backend, before anything is written."""
    bufs, call = _stage_call(backend, needs_grad=name)
    with pytest.raises(RuntimeError, match=f"{name} requires grad.*detach\\(\\) or call it under torch.no_grad"):
        call()
    for k in ("params", "x0", "acc"):
        assert bufs[k].isnan().all(), f"{backend}: the refused call wrote {k}"


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("name", ["params", "x0", "acc"])
def test_stage_bumps_the_version_of_what_it_writes(backend, name):
    """Under no_grad a leaf that requires grad may be written (as torch's own in-place ops allow); a graph
    that saved it before must then refuse its backward, not silently use the new values."""
    bufs, call = _stage_call(backend, needs_grad=name, poisoned=False)
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    loss = (w * bufs[name]).sum()  # saves the buffer for w's gradient
    with torch.no_grad():
        call()
    assert bufs[name].ne(0).all(), "the stage did not write"  # k = 1: acc = 1, params = x0 = 2
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# -- arguments of the wrong kind: a TypeError or ValueError that names the argument -----------------
BAD_STAGE_ARGS = [
    (dict(segments=5), TypeError, r"segments must be a sequence of \(start, end\) pairs.*got int"),
    (dict(segments=None), TypeError, "segments must be a sequence.*got NoneType"),
    (dict(segments="0:16"), TypeError, "segments must be a sequence.*got str"),
    (dict(segments=[(0, 2.5), (2.5, 16)]), TypeError, r"segments\[0\] end must be an int.*2\.5"),
    (dict(segments=[(0.0, 16)]), TypeError, r"segments\[0\] start must be an int.*float"),
    (dict(segments=[(False, True), (1, 16)]), TypeError, r"segments\[0\] start must be an int.*bool"),
    (dict(segments=[(0, torch.tensor(16.0))]), TypeError, r"segments\[0\] end must be an int"),
    (dict(segments=[(0,)]), TypeError, r"segments\[0\] must be a \(start, end\) pair"),
    (dict(segments=[0, 16]), TypeError, r"segments\[0\] must be a \(start, end\) pair, got 0"),
    (dict(segments=[(0, 16, 1)]), TypeError, r"segments\[0\] must be a \(start, end\) pair"),
    (dict(segments=[]), ValueError, "segments is empty"),
    (dict(segments=[(0, 10), (9, 16)]), ValueError, "segment 1 is \\[9, 16\\) after position 10"),
    (dict(write_x0=1), TypeError, "write_x0 must be True or False, got 1"),
    (dict(write_x0="yes"), TypeError, "write_x0 must be True or False"),
    (dict(write_x0=None), TypeError, "write_x0 must be True or False"),
    (dict(coeffs="abcde"), TypeError, r"coeffs must be an \[1, 5\] tensor or a nested sequence.*got str"),
    (dict(coeffs=None), TypeError, "coeffs must be an .* got NoneType"),
    (dict(coeffs=[[1.0, 2.0, "x", 4.0, 5.0]]), TypeError, "coeffs must be an .*tensor or a nested sequence"),
    (dict(coeffs=[]), ValueError, r"coeffs must have shape \[1, 5\]"),
    (dict(coeffs=torch.zeros(1, 5, dtype=torch.float64)), TypeError, r"coeffs is torch.float64.*coeffs.to"),
    (dict(coeffs=torch.zeros(1, 5).to_sparse()), TypeError, "coeffs is a torch.sparse_coo tensor"),
    (dict(reg_grad=[0.0] * 4), TypeError, "reg_grad must be a tensor, got list"),
    (dict(grads=[0.0] * 16), TypeError, "grads must be a tensor, got list"),
    (dict(params=torch.zeros(16).to_sparse()), TypeError, "params is a torch.sparse_coo tensor"),
    (dict(backend=None), TypeError, "backend must be a string"),
    (dict(backend=3), TypeError, "backend must be a string"),
]


@pytest.mark.parametrize("backend", ["reference", "auto"] + BACKENDS)
@pytest.mark.parametrize("kwargs, exc, match", BAD_STAGE_ARGS, ids=lambda v: str(v)[:40] if isinstance(v, dict) else "")
def test_stage_bad_argument_types(backend, kwargs, exc, match):
    p, g, x0, acc = _bufs()
    poison(p)
    args = dict(params=p, grads=g, x0=x0, acc=acc, coeffs=torch.zeros(1, 5, device=DEVICE), segments=[(0, 16)])
    args.update(backend=backend)
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) and not v.is_sparse else v for k, v in kwargs.items()})
    if "segments" in kwargs and isinstance(kwargs["segments"], list) and len(kwargs["segments"]) == 2:
        args["coeffs"] = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(exc, match=match):
        ops.rk_stage(**args)
    assert p.isnan().all() or "params" in kwargs, "a refused call wrote params"


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_stage_integer_like_bounds_are_taken(backend, rng):
    """Bounds that are integers of another type (numpy, 0-d integer tensors) are exact: accepted."""
    np = pytest.importorskip("numpy")
    n = 64
    segs = [(np.int64(0), torch.tensor(20)), (20, np.int32(n))]
    g, x0, acc = (torch.randn(n, generator=rng).to(DEVICE) for _ in range(3))
    coeffs = torch.randn(2, 5, generator=rng).to(DEVICE)
    want = [poison(torch.empty(n, device=DEVICE)), x0.clone(), acc.clone()]
    reference.stage(want[0], g, want[1], want[2], coeffs, [(0, 20), (20, n)])
    got = [poison(torch.empty(n, device=DEVICE)), x0.clone(), acc.clone()]
    ops.rk_stage(got[0], g, got[1], got[2], coeffs, segs, backend=backend)
    bound = stage_bound(g, x0, acc, coeffs, [(0, 20), (20, n)])
    for a, b, key in zip(got, want, ("p", "p", "acc")):
        assert_within(a, b, bound[key], what=f"{backend} {key}")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_stage_coeffs_overlapping_an_output_is_refused(backend):
    p, g, x0, acc = _bufs(20)
    with pytest.raises(ValueError, match="params .* overlaps coeffs"):
        ops.rk_stage(p, g, x0, acc, p[:10].view(2, 5), [(0, 10), (10, 20)], backend=backend)
    with pytest.raises(ValueError, match="x0 .* overlaps coeffs"):
        ops.rk_stage(p, g, x0, acc, x0[5:10], [(0, 20)], write_x0=True, backend=backend)
    ops.rk_stage(p, g, x0, acc, g[5:10], [(0, 20)], backend=backend)  # an input may hold them: only read


def test_dispatch_arguments_are_checked():
    with pytest.raises(ValueError, match=r"op must be one of \('stage', 'sqnorm', 'ema_update'\); got 'stagee'"):
        ops.resolve("auto", "cpu", "stagee")
    with pytest.raises(ValueError, match="backend must be one of 'reference'.*got 'fast'"):
        ops.why_unavailable("fast")
    with pytest.raises(TypeError, match="backend must be a string"):
        ops.why_unavailable(None)
    with pytest.raises(TypeError, match="backend must be a string"):
        ops.sqnorm([torch.ones(2)], backend=["csrc"])


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


BAD_SQNORM_ARGS = [
    ([1.0, 2.0], TypeError, r"tensors\[0\] is a float, not a tensor: pass tensors"),
    ([torch.ones(2), 3], TypeError, r"tensors\[1\] is a int, not a tensor"),
    (None, TypeError, "tensors must be a tensor or a sequence of tensors, got NoneType"),
    (5, TypeError, "tensors must be a tensor or a sequence of tensors, got int"),
    ("ab", TypeError, "tensors must be a tensor or a sequence of tensors, got str"),
    ({"w": torch.ones(2)}, TypeError, "tensors must be a tensor or a sequence of tensors, got dict"),
    ([torch.ones(3).to_sparse()], TypeError, r"tensors\[0\] is a torch.sparse_coo tensor.*to_dense"),
    ([torch.ones(3, dtype=torch.bool)], TypeError, "torch.bool"),
]


@pytest.mark.parametrize("backend", ["reference", "auto"] + BACKENDS)
@pytest.mark.parametrize("tensors, exc, match", BAD_SQNORM_ARGS, ids=lambda v: type(v).__name__)
def test_sqnorm_bad_argument_types(backend, tensors, exc, match):
    with pytest.raises(exc, match=match):
        ops.sqnorm(tensors, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_sqnorm_of_views_generators_and_empty_tensors(backend, rng):
    """Non-contiguous views, a generator, one bare tensor and tensors with no elements all give the reference's
    sum (an all-empty list sums to an exact zero)."""
    base = torch.randn(64, 33, generator=rng).to(DEVICE)
    views = [base.t(), base[::3, 1::2], base[:, 5], torch.empty(0, 4, device=DEVICE)]
    want = reference.sqnorm([v.contiguous() for v in views])
    got = ops.sqnorm((v for v in views), backend=backend)
    assert_close(got.reshape(1), want.reshape(1), what=f"{backend} views", rtol=1e-5, atol=1e-6)
    one = ops.sqnorm(base, backend=backend)
    assert_close(one.reshape(1), base.square().sum().reshape(1), what=f"{backend} one tensor", rtol=1e-5, atol=1e-6)
    zero = ops.sqnorm([torch.empty(0, device=DEVICE), torch.empty(3, 0, device=DEVICE)], backend=backend)
    assert zero.dtype == torch.float32 and zero.item() == 0.0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, by design
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_sqnorm_overflow_is_inf_not_an_error(backend):
    """A diverging run must reach the trainer's non-finite check, not crash inside a kernel."""
    ts = [torch.full((1000,), 3e37, device=DEVICE), torch.ones(3, device=DEVICE)]
    out = ops.sqnorm(ts, backend=backend)
    assert out.dtype == torch.float32 and torch.isinf(out).item()


def test_validation_cache_never_lets_a_changed_argument_through():
    """The stage op skips its checks for arguments it has seen pass; anything that changes a check's answer
    (autograd recording, an overlapping buffer, the segments) is checked again."""
    n = 10
    params, grads, x0, acc = (torch.randn(n) for _ in range(4))
    coeffs = torch.tensor([[0.0, 1.0, -0.1, 0.0, 0.0]])
    ops.rk_stage(params, grads, x0, acc, coeffs, [(0, n)], backend="foreach")
    ops.rk_stage(params, grads, x0, acc, coeffs, [(0, n)], backend="foreach")  # cached
    params.requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires grad"):
        ops.rk_stage(params, grads, x0, acc, coeffs, [(0, n)], backend="foreach")
    params.requires_grad_(False)
    with pytest.raises(ValueError, match="overlaps"):
        ops.rk_stage(params, grads, params, acc, coeffs, [(0, n)], write_x0=True, backend="foreach")
    with pytest.raises(ValueError, match="segments"):
        ops.rk_stage(params, grads, x0, acc, coeffs, [(0, n - 1)], backend="foreach")
    two = torch.tensor([[0.0, 1.0, -0.1, 0.0, 0.0], [0.0, 1.0, -0.2, 0.0, 0.0]])
    ops.rk_stage(params, grads, x0, acc, two, [(0, 4), (4, n)], backend="foreach")
    for wrong in (two.view(1, 10), two.view(5, 2)):  # the same storage, another shape: checked again
        with pytest.raises(ValueError, match="coeffs"):
            ops.rk_stage(params, grads, x0, acc, wrong, [(0, 4), (4, n)], backend="foreach")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_inference_tensors_are_written_only_in_inference_mode_on_every_backend(backend):
    """torch refuses in-place writes to inference tensors outside inference_mode; every backend does the same
    (the compiled ones would otherwise write them without a word), and inside inference_mode all of them write."""
    n = 10
    with torch.inference_mode():
        params, grads, x0, acc, avg = (torch.randn(n) for _ in range(5))
    coeffs = torch.tensor([[0.0, 1.0, -0.1, 0.0, 0.0]])
    with pytest.raises(RuntimeError, match="inference tensor"):
        ops.rk_stage(params, grads, x0, acc, coeffs, [(0, n)], backend=backend)
    with pytest.raises(RuntimeError, match="inference tensor"):
        ops.ema_update(avg, params, 0.9, backend=backend)
    with torch.inference_mode():
        want = x0 - 0.1 * grads
        ops.rk_stage(params, grads, x0, acc, coeffs, [(0, n)], backend=backend)
        torch.testing.assert_close(params, want)
    with torch.no_grad(), pytest.raises(RuntimeError, match="inference tensor"):  # the call that passed inside
        ops.rk_stage(params, grads, x0, acc, coeffs, [(0, n)], backend=backend)  # is checked again
