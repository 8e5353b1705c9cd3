"""Error bounds of the fused ops from their rounding error analyses, and the check against them: what the stage,
ema_update and sqnorm tests compare a compiled backend with the reference by (tests/test_stage_fma.py shows why a
relative 1e-6 of the result is too tight for kernels with fused multiply-adds)."""

import torch

# A compiled step's tolerance against the eager one (tests/test_compiled.py, tests/test_population_compiled.py):
# NUDGE_MARGIN x the same run's distance from itself with its start point nudged by one ulp. A compiled step rounds
# differently from the eager one in the last bits (other fused orders of the same products), and the game amplifies
# that as it amplifies a nudge.
NUDGE_MARGIN = 30


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
