"""Data: the 16-Gaussian mixture, DiracGAN, and image sets (CIFAR-10 via torchvision, ImageFolder)."""

from __future__ import annotations

import itertools

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


def image_loader(
    root: str,
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
    torchvision ImageFolder tree (ImageNet's train/ folder included), resized and centre-cropped.
    ``channels``: 3 (RGB) or 1 (images converted to grayscale).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    try:
        import torchvision
        from torchvision import transforms
    except Exception as exc:  # torchvision loads only with a matching torch build
        raise RuntimeError(
            "image data needs torchvision, built for this torch: from a checkout, pip install -c constraints.txt "
            "-e '.[vision]' (keeps the pinned torch); otherwise install the torchvision release that matches "
            f"torch {torch.__version__} ({type(exc).__name__}: {exc})"
        ) from exc
    from pathlib import Path

    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"data path {root!r} does not exist (nothing is downloaded: give a local copy)")
    norm = transforms.Normalize((0.5,) * channels, (0.5,) * channels)
    gray = [transforms.Grayscale(1)] if channels == 1 else []
    if dataset == "cifar10":
        if not (path / "cifar-10-batches-py").is_dir():
            raise FileNotFoundError(
                f"{root!r} has no cifar-10-batches-py folder: point --data at the folder "
                "holding the extracted CIFAR-10 python archive"
            )

        class LocalCIFAR10(torchvision.datasets.CIFAR10):
            # torchvision checks the official archive's MD5s; a local copy (or a subset made for tests)
            # only has to have the files, in the same pickle format.
            def _check_integrity(self) -> bool:
                base = Path(self.root) / self.base_folder
                return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

            def _load_meta(self) -> None:
                import pickle

                meta = Path(self.root) / self.base_folder / self.meta["filename"]
                if not meta.is_file():
                    raise FileNotFoundError(f"{meta} is missing: the CIFAR-10 folder is incomplete")
                with open(meta, "rb") as f:
                    self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        ds = LocalCIFAR10(
            str(path), train=True, download=False, transform=transforms.Compose([*gray, transforms.ToTensor(), norm])
        )
    elif dataset == "imagefolder":
        ds = torchvision.datasets.ImageFolder(
            str(path),
            transform=transforms.Compose(
                [*gray, transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(), norm]
            ),
        )
    else:
        raise ValueError(f"unknown image dataset {dataset!r}; choose cifar10 or imagefolder")
    if len(ds) < batch * world:
        raise ValueError(
            f"{root!r} holds {len(ds)} images, fewer than one batch of {batch}"
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
    )
