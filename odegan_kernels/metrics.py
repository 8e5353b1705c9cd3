"""Sample-quality metrics: mode coverage for the toy mixtures; FID / IS through torch-fidelity.

FID's inputs are checked here before torch-fidelity sees them: the real images (a folder, flat or one subfolder
per class) and the Inception weights, loaded with weights_only=True and handed to torch-fidelity as a fresh copy
of their tensors (it unpickles the file it is given without that guard, so a file's own bytes never reach it).
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch

# torchvision's ImageFolder reads these; the real side of FID finds the same files
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# (name, shape) pairs that tell torch-fidelity's Inception weights from another network's
INCEPTION_SIGNATURE = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}


@torch.no_grad()
def mode_metrics(samples: torch.Tensor, centres: torch.Tensor, std: float, min_count: int = 20) -> dict:
    """Modes covered, fraction of high-quality samples, and KL(mode histogram || uniform).

    A sample is high-quality when it lies within 3 std of its nearest mode; a mode is covered when at
    least ``min_count`` high-quality samples are nearest to it. The KL is taken over the high-quality
    samples' nearest modes (log K when there are none: as far from uniform as a point mass).
    """
    for name, t in (("samples", samples), ("centres", centres)):
        if not torch.is_tensor(t) or t.dim() != 2 or t.shape[0] == 0:
            got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name} must be a non-empty [N, D] tensor (one point per row), got {got}")
    if samples.shape[1] != centres.shape[1]:
        raise ValueError(f"samples are {samples.shape[1]}-D but centres are {centres.shape[1]}-D")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0:
        raise ValueError(f"std must be a positive number, got {std!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be a positive int, got {min_count!r}")
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


def _torch_fidelity():
    try:
        import torch_fidelity
    except ImportError as exc:
        raise RuntimeError("FID/IS need torch-fidelity: pip install 'odegan-kernels[vision]'") from exc
    return torch_fidelity


def _path_arg(value, name: str) -> Path:
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or not str(value):
        raise TypeError(f"{name} must be a path, got {value!r}")
    return Path(value)


def has_images(folder: Path) -> bool:
    """Whether ``folder`` or any folder under it holds an image file ImageFolder would read."""
    return any(f.lower().endswith(IMAGE_SUFFIXES) for _, _, files in os.walk(folder) for f in files)


def fid_real_inputs(real) -> dict:
    """torch-fidelity's arguments for FID's real side: a folder of images, flat or a class-folder tree as
    ImageFolder reads (searched recursively), or the name of one of torch-fidelity's registered datasets."""
    path = _path_arg(real, "fid_real")
    usage = "give a folder of real images (flat, or one subfolder per class as ImageFolder reads)"
    if path.is_dir():
        if not has_images(path):
            raise ValueError(
                f"fid_real={real}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or its subfolders; {usage}"
            )
        return dict(input2=str(path), samples_find_deep=True, samples_find_ext=",".join(s[1:] for s in IMAGE_SUFFIXES))
    from torch_fidelity.registry import DATASETS_REGISTRY

    if str(real) in DATASETS_REGISTRY:
        return dict(input2=str(real))
    if path.exists():
        raise ValueError(f"fid_real={real} is not a folder: {usage}")
    raise FileNotFoundError(
        f"fid_real={real} does not exist: {usage}, or one of torch-fidelity's inputs ({', '.join(DATASETS_REGISTRY)})"
    )


def _inception_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_weights_file(weights=None) -> Path:
    """The Inception weights file FID uses: ``weights`` when given, else torch-fidelity's file in torch's hub
    cache (where torch-fidelity itself keeps it), downloaded there first if it is missing."""
    url = _inception_url()
    if weights is not None:
        path = _path_arg(weights, "inception_weights")
        if not path.is_file():
            raise FileNotFoundError(
                f"inception_weights={weights} is not a file: give the path of torch-fidelity's Inception weights "
                f"(a copy of {url})"
            )
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except (urllib.error.URLError, OSError) as exc:
            raise FileNotFoundError(
                f"FID needs torch-fidelity's Inception weights and inception_weights is not set; downloading them "
                f"from {url} failed ({exc}). Offline, copy that file here and set inception_weights=PATH (or put it "
                f"at {path})"
            ) from None
    return path


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_inception_weights(path) -> dict[str, torch.Tensor]:
    """The Inception weights in ``path`` as a state dict, loaded with ``weights_only=True``: a file that holds
    anything but tensors (a pickled object could run code when loaded) is refused, never unpickled."""
    what = f"inception_weights={path}"
    fix = f"use torch-fidelity's weights file ({_inception_url()}) or a state dict of tensors saved with torch.save"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise ValueError(
                f"{what} holds more than tensors, so it was not loaded (unpickling it could run code); "
                f"torch.load(weights_only=True) refused it: {_first_line(exc)}. {fix[0].upper()}{fix[1:]}"
            ) from None
        raise ValueError(f"{what} is not a PyTorch weights file ({_first_line(exc)}): {fix}") from None
    except Exception as exc:  # a truncated archive, a text file, a directory: all the same to the caller
        raise ValueError(
            f"{what} is not a PyTorch weights file ({type(exc).__name__}: {_first_line(exc)}): {fix}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{what} is not a state dict of named tensors (it holds a {type(state).__name__}): {fix}")
    for name, shape in INCEPTION_SIGNATURE.items():
        t = state.get(name)
        if t is None or tuple(t.shape) != shape:
            found = "no such tensor" if t is None else f"shape {list(t.shape)}"
            raise ValueError(
                f"{what} is not torch-fidelity's Inception weights ({name} should be {list(shape)}, found {found}): "
                f"{fix}"
            )
    return state


def check_fid_inputs(real, weights=None) -> None:
    """Fail now, not at the first evaluation, when FID cannot run: ``real`` (fid_real) must be usable, and the
    Inception weights (``weights``, or torch-fidelity's cached or downloaded copy) must load safely. Weights
    without real images are refused: FID would silently never run."""
    if not real:
        if weights:
            raise ValueError(
                "inception_weights is set but fid_real is not: FID/IS run only against real images; set "
                "fid_real=FOLDER too, or drop inception_weights"
            )
        return
    _torch_fidelity()
    fid_real_inputs(real)
    load_inception_weights(inception_weights_file(weights))


def fid_is(
    generate,
    real: str,
    num_samples: int = 50_000,
    batch: int = 500,
    device="cuda",
    feature_extractor_weights_path: str | None = None,
    isc: bool = True,
) -> dict:
    """FID against ``real`` (a folder of images, flat or a class-folder tree, or a torch-fidelity input name)
    and the Inception Score.

    ``generate(n)`` returns n images in [-1, 1], NCHW, RGB or grayscale. torch-fidelity is imported here, not at
    package import. ``feature_extractor_weights_path`` is the Inception weights file (offline machines must give
    it; without it torch-fidelity's copy in torch's hub cache is used, downloaded if missing). Real images are
    resized and centre-cropped to the generated size, as the image loader does.
    """
    torch_fidelity = _torch_fidelity()
    if not callable(generate):
        raise TypeError(f"generate must be a function of n returning n images, got {type(generate).__name__}")
    for name, value in (("num_samples", num_samples), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(isc, bool):
        raise TypeError(f"isc must be True or False, got {isc!r}")
    real_kwargs = fid_real_inputs(real)
    weights_file = inception_weights_file(feature_extractor_weights_path)
    state = load_inception_weights(weights_file)

    images = []
    left = num_samples
    while left > 0:
        n = min(batch, left)
        with torch.no_grad():
            x = generate(n)
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[0] != n or x.shape[1] not in (1, 3):
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"generate({n}) must return {n} images as an [{n}, 3 or 1, H, W] tensor, got {got}")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"generate({n}) returned {bad} non-finite values: FID/IS of such samples mean nothing")
        # grayscale as RGB, R = G = B, as torch-fidelity reads a grayscale real image
        images.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().expand(-1, 3, -1, -1))
        left -= n
    fake = torch.cat(images)

    class _Fake(torch.utils.data.Dataset):
        def __len__(self):
            return fake.shape[0]

        def __getitem__(self, i):
            return fake[i]

    size = fake.shape[-1] if fake.shape[-1] == fake.shape[-2] else 0
    with tempfile.TemporaryDirectory(prefix="odegan-inception-") as tmp:
        weights = os.path.join(tmp, "inception.pth")  # a fresh copy of the checked tensors: nothing else to unpickle
        torch.save(state, weights)
        del state
        try:
            res = torch_fidelity.calculate_metrics(
                input1=_Fake(),
                fid=True,
                isc=isc,
                cuda=str(device).startswith("cuda"),
                verbose=False,
                feature_extractor_weights_path=weights,
                samples_resize_and_crop=size,
                **real_kwargs,
            )
        except urllib.error.URLError as exc:
            raise FileNotFoundError(
                f"torch-fidelity tried to download fid_real={real} and failed ({exc}): offline, give a local folder"
            ) from None
        except RuntimeError as exc:
            if "Error(s) in loading state_dict" not in str(exc):
                raise
            raise ValueError(
                f"inception_weights={weights_file} does not fit torch-fidelity's Inception network: {_first_line(exc)}"
            ) from None
    return {"fid": res.get("frechet_inception_distance"), "is": res.get("inception_score_mean")}
