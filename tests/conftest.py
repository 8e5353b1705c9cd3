import os

import pytest
import torch  # noqa: E402

# Without a GPU, Triton kernels are checked on the CPU through the interpreter (set before triton is
# imported). With one, the same tests run on CUDA tensors for real.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = ""):
    """allclose that never lets NaN pass and says how many elements differ, and where."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: {int(torch.isnan(actual).sum())} NaN in result"
    assert not torch.isnan(expected).any(), f"{what}: NaN in the reference"
    diff = (actual.double() - expected.double()).abs()
    bad = diff > atol + rtol * expected.double().abs()
    if bad.any():
        idx = bad.nonzero()[:5].flatten().tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; max abs diff "
            f"{diff.max().item():.3e}; first at {idx}: {actual.flatten()[idx].tolist()} vs "
            f"{expected.flatten()[idx].tolist()}"
        )


def gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of n roundings (u the unit roundoff of dtype)."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def stage_bound(g, x0, acc, coeffs, segments, reg_grad=None) -> dict[str, torch.Tensor]:
    """Per-element bounds on |backend - reference| for the stage op's outputs acc and p (and x0 = p), from the error
    analysis of  k = g + e*r,  acc' = a*acc + b*k,  p = x0 + c*k + d*acc'.

    Expanded, p is a sum of products (x0, c g, c e r, d a acc, d b g, d b e r) and acc' one of (a acc, b g, b e r).
    Any evaluation order, with multiply-adds fused or rounded separately, rounds each product term of p at most 6
    times and of acc' at most 4 (the reference's separate roundings are the longest chain), so each evaluation is
    within gamma_n M of the exact value, M the sum of the terms' magnitudes:

        M_k = |g| + |e r|,  M_acc = |a acc| + |b| M_k,  M_p = |x0| + |c| M_k + |d| M_acc,

    and two evaluations differ by at most 2 gamma_4 M_acc and 2 gamma_6 M_p, about 4.8e-7 and 7.2e-7 of M in
    float32 (plus the smallest normal number, for underflow). Where the terms cancel, the result is far smaller than
    M and this is far more than a relative 1e-6 of it: there nvcc's and Triton's fused multiply-adds part from the
    reference's separate roundings (tests/test_stage_fma.py emulates both). acc is unread where a == 0."""
    dtype = g.dtype
    f = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    g, x0, acc, coeffs = f(g), f(x0), f(acc), f(coeffs)
    m_acc, m_p = torch.empty_like(g), torch.empty_like(g)
    for s, (lo, hi) in enumerate(segments):
        a, b, c, d, e = coeffs[s].abs().tolist()
        mk = g[lo:hi].abs()
        if reg_grad is not None and reg_grad.numel() > lo:
            m = min(hi, reg_grad.numel()) - lo
            mk[:m] += e * f(reg_grad)[lo : lo + m].abs()
        ma = b * mk + (a * acc[lo:hi].abs() if a != 0 else 0.0)
        m_acc[lo:hi] = ma
        m_p[lo:hi] = x0[lo:hi].abs() + c * mk + d * ma
    tiny = torch.finfo(dtype).tiny
    return {"acc": 2 * gamma(4, dtype) * m_acc + tiny, "p": 2 * gamma(6, dtype) * m_p + tiny}


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str = ""):
    """|actual - expected| <= bound element by element (bound from an error analysis); NaN never passes; says how
    many elements differ, by how much against their bound, and where."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: {int(torch.isnan(actual).sum())} NaN in result"
    assert not torch.isnan(expected).any(), f"{what}: NaN in the reference"
    diff = (actual.detach().to("cpu", torch.float64) - expected.detach().to("cpu", torch.float64)).abs()
    bad = diff > bound
    if bad.any():
        idx = bad.nonzero()[:5].flatten().tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements beyond their error bound; worst at "
            f"{(diff / bound).max().item():.2f}x its bound; first at {idx}: {actual.flatten()[idx].tolist()} vs "
            f"{expected.flatten()[idx].tolist()} (bounds {bound[idx].tolist()})"
        )


def poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


def pytest_configure(config):
    """Make sure the csrc library is there, so its tests run rather than skip (CI builds it here)."""
    if os.environ.get("ODEGAN_SKIP_CSRC_BUILD") == "1":
        return
    from odegan_kernels.ops import csrc

    if not csrc.load():
        csrc.build()  # CPU kernels via torch.utils.cpp_extension (~30 s, cached); a failure fails the run


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def has_cuda() -> bool:
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/gpu_check.sh)")


def corrupt_once(trainer, at_step: int = 12) -> list:
    """Make the trainer's data source give one all-NaN batch, the first time a batch is drawn at ``at_step`` (a
    transient blow-up); returns a list that gets an item when it happened."""
    sample, hit = trainer.problem.real_batch, []

    def corrupt(n, gen):
        x = sample(n, gen)
        if trainer.step == at_step and not hit:
            hit.append(1)
            return x * float("nan")
        return x

    trainer.problem.real_batch = corrupt
    return hit
