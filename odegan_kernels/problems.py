"""Training problems: the players, where real data comes from, and how samples are judged and drawn.

The trainer is generic over these; each problem owns its data pipeline, its metrics and its plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .data import ImageFileError, MixtureOfGaussians, from_a_worker
from .files import save_figure
from .metrics import check_fid_inputs, mode_metrics
from .models.init import default_dtype


class Problem:
    z_dim: int
    sample_shape: tuple[int, ...]  # one real sample's shape
    num_classes: int = 0  # > 0: a class-conditional pair, G(z, y) and D(x, y)
    D: nn.Module
    G: nn.Module

    def real_batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A real batch and its class labels (None for an unconditional problem)."""
        return self.real_batch(n, generator), None

    def state_dict(self) -> dict:  # data-pipeline state beyond the trainer's generators
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, samples: torch.Tensor) -> dict:
        return {}

    def plot(self, samples: torch.Tensor, path: Path, title: str = "") -> None:
        pass

    def close(self) -> None:
        """Release what the data pipeline holds (loader worker processes); the trainer calls it when a run ends."""


class MoGProblem(Problem):
    """The 16-Gaussian mixture of the paper's colab: MLPs with two hidden layers of 25 ReLU units."""

    def __init__(self, z_dim: int = 32, hidden: int = 25, seed: int = 0, device="cpu", dtype=torch.float32) -> None:
        from .models.mlp import mog_pair

        self.z_dim = z_dim
        self.sample_shape = (2,)
        self.mog = MixtureOfGaussians(device=device, dtype=dtype)
        self.D, self.G = (m.to(device) for m in mog_pair(z_dim, hidden, seed=seed, dtype=dtype))

    def real_batch(self, n, generator):
        return self.mog.sample(n, generator)

    def evaluate(self, samples):
        return mode_metrics(samples, self.mog.centres, self.mog.std)

    def plot(self, samples, path, title=""):
        plot_2d_samples(samples, self.mog.centres, path, title)


class DiracProblem(Problem):
    """DiracGAN: real data is the point 0, G is a point, D is linear. Metrics: distance to equilibrium."""

    def __init__(self, psi: float = 1.0, theta: float = 1.0, device="cpu", dtype=torch.float32, **_) -> None:
        from .models.dirac import dirac_pair

        self.z_dim = 1
        self.sample_shape = (1,)
        self.D, self.G = (m.to(device) for m in dirac_pair(psi, theta, dtype=dtype))
        self.device, self.dtype = device, dtype

    def real_batch(self, n, generator):
        return torch.zeros(n, 1, device=self.device, dtype=self.dtype)

    def evaluate(self, samples):
        psi, theta = self.D.psi.item(), self.G.theta.item()
        return {"psi": psi, "theta": theta, "radius": math.hypot(psi, theta)}


ARCHS = ("dcgan", "resnet", "resnet128")
PROBLEMS = ("mog", "dirac", "cifar10", "imagefolder", "digits")
FID_FEATURES = ("inception", "classifier")
IMAGE_PROBLEMS = ("cifar10", "imagefolder", "digits")


def check_image_options(
    dataset: str, arch: str, image_size: int, width: int | None, channels: int, fid_features: str = "inception"
) -> None:
    """Refuse, naming the option, an image run's combination that its models or data cannot make: checked when a
    Config is validated (before anything is built or written) and again when the problem is built."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
    if fid_features not in FID_FEATURES:
        raise ValueError(f"fid_features must be one of {FID_FEATURES}, got {fid_features!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if arch == "resnet" and image_size != 32:
        raise ValueError(f"arch 'resnet' makes 32x32 images; image_size={image_size} needs arch='resnet128' or 'dcgan'")
    if arch == "dcgan" and (image_size < 8 or image_size & (image_size - 1)):
        raise ValueError(
            f"arch 'dcgan' makes power-of-two sizes >= 8 (32: the reference's); got image_size={image_size}"
        )
    if arch == "resnet128" and (image_size < 32 or image_size & (image_size - 1)):
        raise ValueError(
            f"arch 'resnet128' makes power-of-two sizes >= 32 (128: ImageNet's); got image_size={image_size}"
        )
    if width is not None and arch == "resnet":
        raise ValueError("width sets the dcgan and resnet128 pairs' base channel count; arch 'resnet' is fixed")
    if channels != 3 and arch != "dcgan":
        raise ValueError(f"channels={channels} (grayscale data) needs arch='dcgan'; arch {arch!r} takes RGB")
    if dataset == "cifar10" and image_size != 32:
        raise ValueError(f"CIFAR-10 images are 32x32; image_size={image_size} needs an ImageFolder dataset")


class ImageProblem(Problem):
    """Images (CIFAR-10 through torchvision, any ImageFolder tree such as ImageNet's train/, or scikit-learn's
    8x8 digits).

    ``arch``: ``dcgan`` (the reference pair at 32x32; any power of two >= 8) or ``resnet`` at 32x32, unconditional;
    ``resnet128``, the class-conditional projection ResNet at ``image_size`` (128 for ImageNet) with the dataset's
    classes. ``fid_features``: ``inception`` (FID/IS through torch-fidelity's Inception network, when
    ``fid_real`` is set) or ``classifier`` (the offline metric of classifier.py, trained on the data's own labels
    and cached in ``cache_dir``).
    """

    def __init__(
        self,
        data: str,
        dataset: str = "cifar10",
        z_dim: int = 128,
        batch: int = 64,
        seed: int = 0,
        device="cpu",
        workers: int = 2,
        fid_real: str | None = None,
        fid_samples: int = 10_000,
        inception_weights: str | None = None,
        arch: str = "dcgan",
        image_size: int = 32,
        width: int | None = None,
        rank: int = 0,
        world: int = 1,
        channels: int = 3,
        dtype: torch.dtype = torch.float32,
        fid_features: str = "inception",
        cache_dir: str | None = None,
    ) -> None:
        from .data import image_loader
        from .models.dcgan import DCGANDiscriminator, DCGANGenerator
        from .models.resnet import ResNetDiscriminator, ResNetGenerator
        from .models.resnet128 import ConditionalResNetDiscriminator, ConditionalResNetGenerator

        check_image_options(dataset, arch, image_size, width, channels, fid_features)
        # the data first: a conditional pair needs the number of classes
        self.loader = image_loader(
            data,
            dataset,
            batch,
            seed=seed,
            workers=workers,
            image_size=image_size,
            rank=rank,
            world=world,
            channels=channels,
        )
        torch.manual_seed(seed)
        self.z_dim = z_dim
        self.sample_shape = (channels, image_size, image_size)
        with default_dtype(dtype):  # made and initialised in the run's dtype (no float32 rounding in a float64 run)
            if arch == "dcgan":
                kw = {"channels": channels, "image_size": image_size, **({} if width is None else {"width": width})}
                self.D, self.G = DCGANDiscriminator(**kw).to(device), DCGANGenerator(z_dim, **kw).to(device)
            elif arch == "resnet":
                self.D, self.G = ResNetDiscriminator().to(device), ResNetGenerator(z_dim).to(device)
            else:
                self.num_classes = len(self.loader.dataset.classes)
                kw = dict(
                    num_classes=self.num_classes, image_size=image_size, **({} if width is None else {"ch": width})
                )
                self.D = ConditionalResNetDiscriminator(**kw).to(device)
                self.G = ConditionalResNetGenerator(z_dim, **kw).to(device)
        self.device, self.dtype = device, dtype
        self._it = None
        self.epoch = 0
        self.batches = 0  # drawn so far in this epoch: a resumed run continues from there
        self.fid = dict(real=fid_real, num_samples=fid_samples, weights=inception_weights)
        self.fid_features, self.cache_dir, self.metric = fid_features, cache_dir, None
        if fid_features == "classifier":
            classes = len(self.loader.dataset.classes)
            if classes < 2:
                raise ValueError(
                    f"fid_features=classifier trains a classifier on the data's labels (an ImageFolder tree's class "
                    f"folders), and {data!r} has {classes} class; give a tree of at least 2 class folders, or use the "
                    "Inception features (fid_real, inception_weights)"
                )

    def real_batch(self, n, generator):
        return self.draw(n, generator)[0]

    def draw(self, n, generator):
        while True:
            if self._it is None:
                # each epoch's order depends on (seed, epoch) only; a resumed run skips what it had drawn
                self.loader.sampler.set_epoch(self.epoch, start=self.batches * self.loader.batch_size)
                self._it = iter(self.loader)
            try:
                x = next(self._it)
            except ImageFileError as exc:  # from a loader worker, its text carries the worker's traceback
                raise from_a_worker(exc) from None
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.batches = 0
                continue
            self.batches += 1
            x, y = x if isinstance(x, (list, tuple)) else (x, None)
            if x.shape[0] != n:
                raise ValueError(f"the loader gave a batch of {x.shape[0]} but {n} were asked for")
            x = x.to(self.device, self.dtype, non_blocking=True)
            if not self.num_classes:
                return x, None
            return x, y.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Shut the loader's workers down now (they ignore SIGINT and SIGTERM, which are the main process's to act on:
        left to the interpreter's exit, a worker that ignores SIGTERM would never be terminated)."""
        self._it = None
        workers = getattr(self.loader, "_iterator", None)  # torch keeps persistent workers' iterator here
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()
            self.loader._iterator = None

    def state_dict(self):
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state):
        self.epoch = int(state.get("epoch", 0))
        self.batches = int(state.get("batches", 0))
        self._it = None

    @torch.no_grad()
    def evaluate(self, samples):
        """The classifier metric of ``samples`` (fid_features="classifier"), or FID and IS against ``fid_real``
        when it is set (torch-fidelity, imported only then)."""
        if self.fid_features == "classifier":
            return self.classifier_metric()(samples)
        if not self.fid["real"]:
            return {}
        from .metrics import fid_is

        was = self.G.training
        self.G.eval()  # BN running statistics, as the reference evaluates
        try:
            z_dim, k, dev = self.z_dim, self.num_classes, self.device
            cond = (lambda n: (torch.randint(k, (n,), device=dev),)) if k else (lambda n: ())
            return fid_is(
                lambda n: self.G(torch.randn(n, z_dim, device=dev), *cond(n)),
                self.fid["real"],
                num_samples=self.fid["num_samples"],
                device=self.device,
                feature_extractor_weights_path=self.fid["weights"],
            )
        finally:
            self.G.train(was)

    def plot(self, samples, path, title=""):
        plot_image_grid(samples, path, title)

    def classifier_metric(self):
        """The ClassifierMetric of this data set, made at the first call (trained, or read from the cache): on
        the digits, trained on the train split (the GAN's data) and judged against the held-out split; on
        CIFAR-10 or an ImageFolder tree, trained and judged on a stratified split of the images (heldout_split).
        ``classifier.json`` in the cache folder says how well it classifies and what real images score."""
        if self.metric is None:
            from .classifier import CLASSIFIER_REAL, CLASSIFIER_TRAIN, ClassifierMetric, dataset_images
            from .data import DigitsDataset, heldout_split

            ds = self.loader.dataset
            if isinstance(ds, DigitsDataset):
                real_ds, train_idx = DigitsDataset("heldout", ds.transform), range(len(ds))
                real_idx = range(len(real_ds))
            else:
                real_ds, (train_idx, real_idx) = ds, heldout_split(ds.targets, CLASSIFIER_TRAIN, CLASSIFIER_REAL)
            (tx, ty), (rx, ry) = dataset_images(ds, train_idx), dataset_images(real_ds, real_idx)
            self.metric = ClassifierMetric(tx, ty, rx, len(ds.classes), self.cache_dir, real_labels=ry)
            info = {
                "classifier": self.metric.path.name,
                "train_images": len(ty),
                "heldout_images": len(ry),
                "heldout_accuracy": self.metric.accuracy,
                "real_vs_real": self.metric.real_vs_real(),
            }
            (Path(self.cache_dir) / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")
        return self.metric


def plot_2d_samples(samples: torch.Tensor, centres: torch.Tensor, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = samples.detach().float().cpu().numpy()
    c = centres.cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    lim = (-2.5, 2.5)
    axes[0].scatter(s[:, 0], s[:, 1], s=2, alpha=0.4)
    axes[0].scatter(c[:, 0], c[:, 1], s=20, c="red", marker="x")
    axes[0].set_title("samples")
    from matplotlib.colors import PowerNorm

    finite = s[(abs(s) < 10).all(1)]
    axes[1].hist2d(finite[:, 0], finite[:, 1], bins=60, range=[lim, lim], cmap="magma", norm=PowerNorm(0.4))
    axes[1].set_title("density (gamma 0.4)")
    for ax in axes:
        ax.set_xlim(*lim)
        ax.set_ylim(*lim)
        ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def plot_image_grid(samples: torch.Tensor, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = samples[:64].detach().float().cpu().clamp(-1, 1).add(1).div(2)
    n = int(math.ceil(math.sqrt(x.shape[0])))
    c, h, w = x.shape[1:]
    grid = torch.ones(c, n * (h + 2), n * (w + 2))
    for i in range(x.shape[0]):
        r, q = divmod(i, n)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = x[i]
    fig = plt.figure(figsize=(6, 6))
    if c == 1:  # one channel: gray levels, not matplotlib's default colour map
        plt.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        plt.imshow(grid.permute(1, 2, 0).numpy())
    plt.axis("off")
    plt.title(title)
    save_figure(fig, path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def build_problem(name: str, cfg, rank: int = 0, world: int = 1) -> Problem:
    if name in ("mog", "dirac") and (cfg.fid_real or cfg.inception_weights):
        raise ValueError(f"fid_real and inception_weights are for the image problems; {name!r} has its own metrics")
    features = cfg.fid_features
    if name == "mog":
        return MoGProblem(cfg.z_dim, cfg.hidden, seed=cfg.seed, device=cfg.device, dtype=cfg.torch_dtype)
    if name == "dirac":
        return DiracProblem(device=cfg.device, dtype=cfg.torch_dtype)
    if name in IMAGE_PROBLEMS:
        if name == "digits" and cfg.data:
            raise ValueError("the digits data set ships with scikit-learn: drop --data (it reads no folder)")
        if name != "digits" and not cfg.data:
            raise ValueError(f"problem {name!r} needs --data PATH (a local folder; nothing is downloaded)")
        check_fid_inputs(cfg.fid_real, cfg.inception_weights)  # now, not at the first evaluation
        return ImageProblem(
            cfg.data or None,
            name,
            cfg.z_dim,
            cfg.batch,
            seed=cfg.seed,
            device=cfg.device,
            workers=cfg.workers,
            fid_real=cfg.fid_real,
            fid_samples=cfg.fid_samples,
            inception_weights=cfg.inception_weights,
            arch=cfg.arch,
            image_size=cfg.image_size,
            width=cfg.width,
            channels=cfg.channels,
            rank=rank,
            world=world,
            dtype=cfg.torch_dtype,
            fid_features=features,
            cache_dir=cfg.out,
        )
    raise ValueError(f"unknown problem {name!r}; choose one of {PROBLEMS}")
