"""The toy problem's metrics on samples whose answers are known."""

import math

import pytest
import torch

from odegan_kernels.data import MixtureOfGaussians
from odegan_kernels.metrics import mode_metrics

MOG = MixtureOfGaussians()


def test_perfect_samples():
    samples = MOG.centres.repeat(25, 1)  # 25 on every mode, exactly
    m = mode_metrics(samples, MOG.centres, MOG.std)
    assert m == {"modes": 16, "high_quality": 1.0, "kl": 0.0, "finite": True}


def test_one_mode_only():
    samples = MOG.centres[:1].repeat(400, 1) + 0.01
    m = mode_metrics(samples, MOG.centres, MOG.std)
    assert m["modes"] == 1 and m["high_quality"] == 1.0
    assert math.isclose(m["kl"], math.log(16), rel_tol=1e-6)


def test_quality_threshold_is_three_std_and_coverage_needs_20():
    c = MOG.centres
    near = c[:2].repeat(20, 1) + torch.tensor([2.9 * MOG.std, 0.0])  # inside 3 std: high quality
    far = c[2:3].repeat(20, 1) + torch.tensor([3.1 * MOG.std, 0.0])  # outside: not
    few = c[3:4].repeat(19, 1)  # high quality but only 19: not covered
    m = mode_metrics(torch.cat([near, far, few]), c, MOG.std)
    assert m["modes"] == 2
    assert math.isclose(m["high_quality"], 59 / 79)


def test_nothing_near_any_mode_and_non_finite_samples():
    m = mode_metrics(torch.full((100, 2), 5.0), MOG.centres, MOG.std)
    assert m["modes"] == 0 and m["high_quality"] == 0.0 and math.isclose(m["kl"], math.log(16))
    bad = MOG.centres.repeat(25, 1)
    bad[0, 0] = float("nan")
    assert mode_metrics(bad, MOG.centres, MOG.std)["finite"] is False


def test_mixture_sampler_is_stratified_and_seeded():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = MOG.sample(512, g1), MOG.sample(512, g2)
    assert torch.equal(a, b)
    nearest = torch.cdist(a, MOG.centres).argmin(1)
    assert torch.equal(torch.bincount(nearest, minlength=16), torch.full((16,), 32))
    assert (a - MOG.centres[nearest]).std().item() < 0.03


def test_mixture_sampler_draws_on_its_generators_device(monkeypatch):
    """The trainer's data generator lives on the CPU while a GPU run keeps the centres on the GPU, and
    CUDA refuses a CPU generator for a CUDA draw. So every draw must be on the generator's device."""
    import odegan_kernels.data as data

    calls = []

    def checked(name):
        real = getattr(torch, name)

        def draw(*args, generator=None, device=None, **kw):
            if generator is not None:
                calls.append(name)
                assert torch.device(device or "cpu").type == generator.device.type, (name, device)
            return real(*args, generator=generator, device=device, **kw)

        return draw

    monkeypatch.setattr(data.torch, "randn", checked("randn"))
    monkeypatch.setattr(data.torch, "randint", checked("randint"))
    mog = MixtureOfGaussians(device="meta")  # stands in for a device other than the generator's
    assert mog.sample(512, torch.Generator().manual_seed(0)).device.type == "meta"
    assert mog.sample(100, torch.Generator().manual_seed(0)).shape == (100, 2)  # random-mode path
    assert calls == ["randn", "randint", "randn"]


def test_mode_metrics_arguments_are_checked():
    c = MOG.centres
    with pytest.raises(ValueError, match=r"samples must be a non-empty \[N, D\] tensor .*got \(5,\)"):
        mode_metrics(torch.zeros(5), c, MOG.std)
    with pytest.raises(ValueError, match=r"samples must be .*got \(0, 2\)"):
        mode_metrics(torch.zeros(0, 2), c, MOG.std)
    with pytest.raises(ValueError, match="centres must be .*got list"):
        mode_metrics(torch.zeros(4, 2), [[0.0, 0.0]], MOG.std)
    with pytest.raises(ValueError, match="samples are 3-D but centres are 2-D"):
        mode_metrics(torch.zeros(4, 3), c, MOG.std)
    for bad in (0.0, -1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="std must be a positive number"):
            mode_metrics(torch.zeros(4, 2), c, bad)
    for bad in (0, 2.5, False):
        with pytest.raises(ValueError, match="min_count must be a positive int"):
            mode_metrics(torch.zeros(4, 2), c, MOG.std, min_count=bad)
