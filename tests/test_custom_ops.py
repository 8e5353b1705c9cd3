"""torch.library registration of the compiled backends: opcheck (schema, fake tensors, autograd)."""

import pytest
import torch

from odegan_kernels import ops

TRITON = ops.why_unavailable("triton")


@pytest.mark.skipif(TRITON is not None, reason=f"triton backend unavailable: {TRITON}")
def test_opcheck_triton_stage():
    gen = torch.Generator().manual_seed(0)
    n = 300
    bufs = [torch.randn(n, generator=gen) for _ in range(4)]
    coeffs = torch.randn(2, 5, generator=gen)
    for reg, write in ((None, False), (torch.randn(120, generator=gen), True)):
        torch.library.opcheck(torch.ops.odegan_kernels.triton_stage,
                              (*[b.clone() for b in bufs], coeffs, [0, 100], reg, write))


@pytest.mark.skipif(TRITON is not None, reason=f"triton backend unavailable: {TRITON}")
def test_opcheck_triton_sqnorm():
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=gen, requires_grad=True) for s in ((3, 4), (5000,), (1,))]
    torch.library.opcheck(torch.ops.odegan_kernels.triton_sqnorm, (ts,))


@pytest.mark.skipif(TRITON is not None, reason=f"triton backend unavailable: {TRITON}")
def test_triton_sqnorm_is_deterministic_and_handles_empty_tensors():
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(9000, generator=gen), torch.empty(0), torch.randn(33, generator=gen)]
    a = ops.sqnorm(ts, backend="triton")
    b = ops.sqnorm(ts, backend="triton")
    assert torch.equal(a, b)
    assert torch.allclose(a, sum(t.double().square().sum() for t in ts).float(), rtol=1e-6)
