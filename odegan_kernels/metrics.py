"""Sample-quality metrics: mode coverage for the toy mixtures; FID / IS through torch-fidelity."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def mode_metrics(samples: torch.Tensor, centres: torch.Tensor, std: float, min_count: int = 20) -> dict:
    """Modes covered, fraction of high-quality samples, and KL(mode histogram || uniform).

    A sample is high-quality when it lies within 3 std of its nearest mode; a mode is covered when at
    least ``min_count`` high-quality samples are nearest to it. The KL is taken over the high-quality
    samples' nearest modes (log K when there are none: as far from uniform as a point mass).
    """
    samples = samples.float().cpu()
    centres = centres.float().cpu()
    dist = torch.cdist(samples, centres)
    dmin, nearest = dist.min(1)
    hq = dmin <= 3 * std
    k = centres.shape[0]
    counts = torch.bincount(nearest[hq], minlength=k).float()
    n_hq = int(hq.sum())
    if n_hq == 0:
        kl = math.log(k)
    else:
        p = counts / n_hq
        nz = p > 0
        kl = float((p[nz] * (p[nz] * k).log()).sum())
    finite = bool(torch.isfinite(samples).all())
    return {
        "modes": int((counts >= min_count).sum()),
        "high_quality": n_hq / samples.shape[0],
        "kl": kl,
        "finite": finite,
    }


def fid_is(
    generate,
    real: str,
    num_samples: int = 50_000,
    batch: int = 500,
    device="cuda",
    feature_extractor_weights_path: str | None = None,
    isc: bool = True,
) -> dict:
    """FID against a folder of real images (or a torch-fidelity input name) and the Inception Score.

    ``generate(n)`` returns n images in [-1, 1], NCHW. torch-fidelity is imported here, not at package
    import; offline machines pass ``feature_extractor_weights_path`` (the Inception weights file).
    """
    try:
        import torch_fidelity
    except ImportError as exc:
        raise RuntimeError("FID/IS need torch-fidelity: pip install 'odegan-kernels[vision]'") from exc

    images = []
    left = num_samples
    while left > 0:
        n = min(batch, left)
        with torch.no_grad():
            x = generate(n)
        images.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        left -= n
    fake = torch.cat(images)

    class _Fake(torch.utils.data.Dataset):
        def __len__(self):
            return fake.shape[0]

        def __getitem__(self, i):
            return fake[i]

    kwargs = {}
    if feature_extractor_weights_path:
        kwargs["feature_extractor_weights_path"] = feature_extractor_weights_path
    res = torch_fidelity.calculate_metrics(
        input1=_Fake(), input2=real, fid=True, isc=isc, cuda=str(device).startswith("cuda"), verbose=False, **kwargs
    )
    return {"fid": res.get("frechet_inception_distance"), "is": res.get("inception_score_mean")}
