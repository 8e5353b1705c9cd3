"""Data: the 16-Gaussian mixture, DiracGAN, and image sets (CIFAR-10 from its python archive, read as data only;
ImageFolder, scikit-learn's 8x8 handwritten digits), all images through one loader."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import torch


class MixtureOfGaussians:
    """16 Gaussians on the grid {-1.5, -0.5, 0.5, 1.5}^2 with std 0.02 (the colab's problem).

    A batch that is a multiple of the mode count holds each mode equally often (512 = 32 per mode).
    """

    def __init__(
        self, grid: int = 4, spacing: float = 1.0, std: float = 0.02, device="cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        ticks = (torch.arange(grid, dtype=dtype) - (grid - 1) / 2) * spacing
        gx, gy = torch.meshgrid(ticks, ticks, indexing="ij")
        self.centres = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).to(device)
        self.std = std

    @property
    def modes(self) -> int:
        return self.centres.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = self.modes
        dev = self.centres.device
        # draw where the generator lives (a GPU run keeps a CPU data generator), then move the batch
        gdev = generator.device if generator is not None else dev
        if n % k == 0:
            idx = torch.arange(k, device=gdev).repeat(n // k)
        else:
            idx = torch.randint(k, (n,), generator=generator, device=gdev)
        noise = torch.randn(n, 2, generator=generator, device=gdev, dtype=self.centres.dtype)
        return self.centres[idx.to(dev)] + self.std * noise.to(dev)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """A DistributedSampler whose epoch can start part-way: a resumed run skips the samples it had drawn."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"an epoch has {self.num_samples} samples on this rank; cannot start at {start}")
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


DIGITS_EXTRA = (
    "the digits data set needs scikit-learn: pip install -c constraints.txt -e '.[digits]' in a checkout "
    "(pip install 'odegan-kernels[digits]' otherwise)"
)
DIGITS_SPLITS = ("train", "heldout")


def load_digits_arrays(split: str = "train"):
    """scikit-learn's handwritten digits (1797 8x8 images, values 0..16, labels 0..9; shipped inside the package,
    never downloaded) as (images [N, 8, 8] uint8 scaled to 0..255, labels [N]) numpy arrays of one split
    (heldout_split: ``heldout`` is every fifth image of each class, 364 images; ``train`` the other 1433)."""
    import numpy as np

    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS}, got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError(DIGITS_EXTRA) from None  # one line from the odegan command, as torchvision's is
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    keep = heldout_split(labels.tolist())[split == "heldout"]
    images = np.rint(digits.images[keep] * (255 / 16)).astype(np.uint8)
    return images, labels[keep]


def heldout_split(targets, max_train: int | None = None, max_heldout: int | None = None) -> tuple[list, list]:
    """(train, held-out) indices of a labelled data set: every fifth image of each class, in the data set's order,
    is held out, the rest is train; each list is then thinned evenly to at most ``max_train`` / ``max_heldout``
    indices. No random numbers, so the split is the same under any library version."""
    seen: dict = {}
    held, kept = [], []
    for i, t in enumerate(targets):
        (held if seen.get(t, 0) % 5 == 0 else kept).append(i)
        seen[t] = seen.get(t, 0) + 1

    def thin(idx, n):
        return idx if n is None or len(idx) <= n else [idx[j * len(idx) // n] for j in range(n)]

    return thin(kept, max_train), thin(held, max_heldout)


class DigitsDataset(torch.utils.data.Dataset):
    """One split of scikit-learn's digits as an ImageFolder-like dataset: ``(transform(image), label)`` where the
    image is an RGB PIL image (R = G = B), as ImageFolder's loader gives; ``classes`` and ``targets`` as there."""

    def __init__(self, split: str = "train", transform=None) -> None:
        self.images, labels = load_digits_arrays(split)
        self.targets = labels.tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        image = Image.fromarray(self.images[i], mode="L").convert("RGB")
        return (self.transform(image) if self.transform is not None else image), self.targets[i]


# What a CIFAR-10 python file may name besides plain containers: numpy's array rebuilders and their dtype, and the
# latin-1 codec Python 2's pickles use for bytes. Anything else (a class whose unpickling runs code) is refused.
CIFAR_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _Refused(pickle.UnpicklingError):
    pass


class _CIFARUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise _Refused(f"it names {module}.{name}, which is not part of the CIFAR-10 format")


def read_cifar_file(path) -> dict:
    """One file of the CIFAR-10 python archive, read as data only: dicts, lists, strings, bytes, numbers and numpy
    arrays (CIFAR_GLOBALS); a file naming anything else, or damaged, is a ValueError naming the file."""
    from .files import open_regular

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the CIFAR-10 folder is incomplete (nothing is downloaded)")
    try:
        with open_regular(path) as f:
            obj = _CIFARUnpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise ValueError(f"{path} was refused: {exc} (a CIFAR-10 file holds only arrays, lists and strings)") from None
    except OSError:
        raise
    except Exception as exc:  # truncated or random bytes: EOFError, struct.error, ...
        raise ValueError(f"{path} is not a CIFAR-10 file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR-10 file: it holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


class CIFAR10Batches(torch.utils.data.Dataset):
    """The training split of a local CIFAR-10 python archive (``folder`` = cifar-10-batches-py: data_batch_1..5 and
    batches.meta), read by read_cifar_file (data only, never code) and checked: every batch a uint8 array of
    N x 3072 with N labels. Items are (transformed PIL image, label), as torchvision's CIFAR10 gives them."""

    FILES = tuple(f"data_batch_{i}" for i in range(1, 6))

    def __init__(self, folder, transform=None) -> None:
        import numpy as np

        folder = Path(folder)
        self.transform = transform
        meta = read_cifar_file(folder / "batches.meta")
        names = meta.get("label_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{folder / 'batches.meta'} has no label_names list: not CIFAR-10's batches.meta")
        self.classes = names
        self.class_to_idx = {c: i for i, c in enumerate(names)}
        data, targets = [], []
        for name in self.FILES:
            entry = read_cifar_file(folder / name)
            x, y = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
                got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
                raise ValueError(f"{folder / name}: 'data' must be a uint8 array of N x 3072 pixels, got {got}")
            if not isinstance(y, list) or len(y) != len(x) or not all(isinstance(v, int) for v in y):
                raise ValueError(f"{folder / name}: 'labels' must be a list of {len(x)} integers")
            if any(not 0 <= v < len(names) for v in y):
                raise ValueError(f"{folder / name}: a label is outside the {len(names)} classes of batches.meta")
            data.append(x)
            targets += y
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # N x H x W x C
        self.targets = targets

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.data[i])
        return (self.transform(img) if self.transform is not None else img), self.targets[i]


class ImageFileError(ValueError):
    """An image of the data set that cannot be read; the message names the file (also from a loader worker)."""


class NamedImageFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder tree whose unreadable image (corrupt, truncated) is an ImageFileError naming it."""

    def __init__(self, root, transform=None) -> None:
        import torchvision

        self.folder = torchvision.datasets.ImageFolder(str(root), transform=transform)
        self.classes, self.class_to_idx = self.folder.classes, self.folder.class_to_idx
        self.samples, self.targets = self.folder.samples, self.folder.targets

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        try:
            return self.folder[i]
        except Exception as exc:
            raise ImageFileError(
                f"{self.samples[i][0]} cannot be read as an image ({type(exc).__name__}: {exc})"
            ) from None


def from_a_worker(exc: BaseException) -> BaseException:
    """An ImageFileError re-raised by a DataLoader from its worker carries the worker's traceback in its text: the
    same error with its own last line only."""
    if isinstance(exc, ImageFileError) and "Traceback" in str(exc):
        last = [line for line in str(exc).strip().splitlines() if line.strip()][-1]
        return ImageFileError(last.split(": ", 1)[1] if last.startswith(("ImageFileError", "odegan")) else last)
    return exc


def ignore_stop_signals(_worker_id: int) -> None:
    """A loader worker's init: SIGINT and SIGTERM are the main process's to act on. A signal to the whole process
    group (systemd, Slurm, kill -- -PGID) then stops the run at a step boundary with a checkpoint, instead of killing
    the workers under it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def image_transform(channels: int = 3, image_size: int | None = None):
    """The loader's transform: (grayscale when ``channels`` is 1), resized and centre-cropped to ``image_size``
    (None: kept), to a tensor in [-1, 1]."""
    from torchvision import transforms

    gray = [transforms.Grayscale(1)] if channels == 1 else []
    size = [transforms.Resize(image_size), transforms.CenterCrop(image_size)] if image_size else []
    norm = transforms.Normalize((0.5,) * channels, (0.5,) * channels)
    return transforms.Compose([*gray, *size, transforms.ToTensor(), norm])


def image_loader(
    root: str | None,
    dataset: str = "cifar10",
    batch: int = 64,
    seed: int = 0,
    workers: int = 2,
    image_size: int = 32,
    rank: int = 0,
    world: int = 1,
    channels: int = 3,
):
    """A DataLoader of (images scaled to [-1, 1], labels) from a local path (never downloads).

    Batches are ``batch`` images of rank ``rank``'s share of each epoch (a DistributedSampler: shuffled
    with ``seed`` and the epoch set through ``loader.sampler.set_epoch(epoch, start)``, which can also skip
    the epoch's first ``start`` samples; every rank gets as many batches).

    ``cifar10``: the torchvision CIFAR10 layout (``root/cifar-10-batches-py``); ``imagefolder``: any
    torchvision ImageFolder tree (ImageNet's train/ folder included), resized and centre-cropped; ``digits``:
    the train split of scikit-learn's 8x8 digits (``root`` None: the package ships them), resized to
    ``image_size`` (bilinear, as Resize does).
    ``channels``: 3 (RGB) or 1 (images converted to grayscale).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    try:
        pass
    except Exception as exc:  # torchvision loads only with a matching torch build
        raise RuntimeError(
            "image data needs torchvision, built for this torch: from a checkout, pip install -c constraints.txt "
            "-e '.[vision]' (keeps the pinned torch); otherwise install the torchvision release that matches "
            f"torch {torch.__version__} ({type(exc).__name__}: {exc})"
        ) from exc
    from pathlib import Path

    if dataset == "digits":
        if root is not None:
            raise ValueError("the digits data set ships with scikit-learn: give no data path (--data) for it")
        ds = DigitsDataset("train", image_transform(channels, image_size))
        return _loader(ds, "scikit-learn's digits", batch, seed, workers, rank, world)
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"data path {root!r} does not exist (nothing is downloaded: give a local copy)")
    if dataset == "cifar10":
        if not (path / "cifar-10-batches-py").is_dir():
            raise FileNotFoundError(
                f"{root!r} has no cifar-10-batches-py folder: point --data at the folder "
                "holding the extracted CIFAR-10 python archive"
            )

        ds = CIFAR10Batches(path / "cifar-10-batches-py", transform=image_transform(channels))
    elif dataset == "imagefolder":
        ds = NamedImageFolder(str(path), transform=image_transform(channels, image_size))
    else:
        raise ValueError(f"unknown image dataset {dataset!r}; choose cifar10, imagefolder or digits")
    return _loader(ds, repr(root), batch, seed, workers, rank, world)


def _loader(ds, what: str, batch: int, seed: int, workers: int, rank: int, world: int):
    if len(ds) < batch * world:
        raise ValueError(
            f"{what} holds {len(ds)} images, fewer than one batch of {batch}"
            + (f" for each of {world} ranks" if world > 1 else "")
        )
    sampler = ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )
