import importlib
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


@pytest.fixture
def input_rebuilds(monkeypatch) -> list:
    """Counts, while the test runs, the calls at which a compiled graph rebuilt inputs that alias a mutated one from a
    synthetic base (AOTAutograd's merge_view_inputs at run time, told from its compile-time call by its missing
    input descriptions): a traced step whose inputs do not alias makes none (ode/compiled.py, TracedBuffers)."""
    importlib.import_module("torch._dynamo")  # first: imported alone, AOTAutograd's wrappers meet a circular import
    wrappers = importlib.import_module("torch._functorch._aot_autograd.runtime_wrappers")
    merge, calls = wrappers.merge_view_inputs, []

    def counting(aot_config, fwd_inputs, fwd_inputs_descs, *args, **kwargs):
        if fwd_inputs_descs is None:
            calls.append(len(fwd_inputs))
        return merge(aot_config, fwd_inputs, fwd_inputs_descs, *args, **kwargs)

    monkeypatch.setattr(wrappers, "merge_view_inputs", counting)
    return calls
