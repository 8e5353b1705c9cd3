"""The offline image metric: a small CNN trained on a data set's own labelled images (deterministic, seconds on a
CPU, cached as a file of tensors), whose penultimate features give a Frechet distance through torch-fidelity and
whose predictions give class coverage and an Inception-style score. No download: it needs no Inception weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

# How the classifier is trained; part of the cache key, so a change retrains. Adam on the cross-entropy, no
# augmentation (a shifted or blurred digit should look unlike the data to it), one CPU thread, fixed seed.
RECIPE = {"version": 1, "epochs": 12, "batch": 64, "lr": 2e-3, "seed": 0, "widths": [32, 64], "features": 64}
EXTRACTOR = "odegan-classifier"  # its name in torch-fidelity's registry of feature extractors
FEATURES, LOGITS = "features", "logits"  # the extractor's two outputs: penultimate features, class logits
# On CIFAR-10 or an ImageFolder tree: at most this many images train the classifier and at most this many held-out
# ones are the real side (data.heldout_split)
CLASSIFIER_TRAIN, CLASSIFIER_REAL = 10_000, 2_000


class DataClassifier(nn.Module):
    """Conv 3x3 + ReLU + 2x2 max-pool stages down to 4x4 (``widths`` channels, the last repeated for larger
    images), then ``features`` ReLU units (the Frechet distance's features) and a linear layer to the class
    logits. Inputs: [N, channels, image_size, image_size] in [-1, 1]."""

    def __init__(self, channels: int, image_size: int, num_classes: int, widths=(32, 64), features: int = 64) -> None:
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"the classifier takes square power-of-two images >= 8, got image_size={image_size}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(int(math.log2(image_size)) - 2):
            c_out = widths[min(i, len(widths) - 1)]
            layers += [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        self.penultimate = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.penultimate(self.conv(x))
        return f, self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as uint8 0..255 (how torch-fidelity's inputs, and so the classifier's, are stored)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def dataset_images(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of ``dataset``'s items at ``indices`` (items are (image in [-1, 1], label))."""
    xs, ys = zip(*(dataset[i] for i in indices))
    return to_uint8(torch.stack(xs)), torch.tensor(ys)


def _from_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1


@contextlib.contextmanager
def _deterministic():
    """One CPU thread, deterministic algorithms and a private global RNG state, all restored after (the GAN's
    own random streams and thread count are untouched)."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, recipe=RECIPE) -> DataClassifier:
    """A DataClassifier trained on ``images`` (uint8 [N, C, S, S]) and ``labels`` (int [N] in [0, num_classes))
    by ``recipe``, on the CPU; the same inputs give the same weights, bit for bit."""
    _check_images(images, "images")
    if labels.shape != (images.shape[0],) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int tensor [{images.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    with _deterministic(), torch.enable_grad():
        torch.manual_seed(recipe["seed"])
        net = DataClassifier(images.shape[1], images.shape[-1], num_classes, recipe["widths"], recipe["features"])
        opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
        order = torch.Generator().manual_seed(recipe["seed"])
        x_all = _from_uint8(images)
        for _ in range(recipe["epochs"]):
            for idx in torch.randperm(len(labels), generator=order).split(recipe["batch"]):
                loss = nn.functional.cross_entropy(net(x_all[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.eval().requires_grad_(False)


def _check_images(images, name: str) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be a non-empty uint8 [N, C, H, W] tensor (to_uint8 makes one), got {got}")


def cache_key(images: torch.Tensor, labels: torch.Tensor, num_classes: int, recipe=RECIPE) -> str:
    """A digest of the training data and the recipe: the cached classifier's name."""
    h = hashlib.sha256(json.dumps({"recipe": recipe, "classes": num_classes, "shape": list(images.shape)}).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.long().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def load_or_train(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, cache_dir=None, recipe=RECIPE
) -> tuple[DataClassifier, Path | None]:
    """The classifier for these data and this recipe: read from ``cache_dir/classifier-<key>.pt`` when it is there
    (loaded with weights_only=True: a file holding code is never unpickled), else trained and written there."""
    key = cache_key(images, labels, num_classes, recipe)
    path = None if cache_dir is None else Path(cache_dir) / f"classifier-{key}.pt"
    if path is not None and path.is_file():
        net = load_classifier(path)
        if net is not None:
            return net, path
    net = train_classifier(images, labels, num_classes, recipe)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"arch": _arch(net, recipe), "state": net.state_dict(), "key": key}, tmp)
        tmp.replace(path)  # atomic: a reader sees the old file or the whole new one
    return net, path


def _arch(net: DataClassifier, recipe) -> dict:
    return dict(
        channels=net.channels,
        image_size=net.image_size,
        num_classes=net.num_classes,
        widths=list(recipe["widths"]),
        features=recipe["features"],
    )


def load_classifier(path) -> DataClassifier | None:
    """A classifier written by load_or_train, or None when the file is not one (then it is retrained)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = DataClassifier(**saved["arch"])
        net.load_state_dict(saved["state"])
    except Exception:  # unreadable, holds code, or another layout: train again rather than trust it
        return None
    return net.eval().requires_grad_(False)


def _register_extractor() -> None:
    """torch-fidelity's view of a DataClassifier: a registered feature extractor reading the weights file that
    calculate_metrics passes it (feature_extractor_weights_path), with the two outputs FEATURES and LOGITS."""
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return

    class ClassifierFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            net = load_classifier(feature_extractor_weights_path)
            if net is None:
                raise ValueError(f"{feature_extractor_weights_path} is not a classifier written by load_or_train")
            self.net = net

        @staticmethod
        def get_provided_features_list():
            return (FEATURES, LOGITS)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": LOGITS, "fid": FEATURES, "kid": FEATURES, "prc": FEATURES}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            raise NotImplementedError

        def forward(self, x):
            out = dict(zip((FEATURES, LOGITS), self.net.features_and_logits(_from_uint8(x))))
            return tuple(out[name].double() for name in self.features_list)

    register_feature_extractor(EXTRACTOR, ClassifierFeatures)


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class ClassifierMetric:
    """Judges generated images against ``real`` (held-out uint8 images the classifier never saw) with a classifier
    trained on ``train_images`` / ``train_labels`` (cached in ``cache_dir``). Calling it on samples in [-1, 1]
    gives ``fid_classifier`` (torch-fidelity's Frechet distance of the penultimate features), ``coverage`` (the
    fraction of classes predicted for at least ``coverage_share`` of the samples; 0.5: half a class's share under
    uniform classes, so 5% of the samples for 10 classes) and ``score`` (torch-fidelity's Inception Score of the
    logits: exp E KL(p(y|x) || p(y)), mean over 10 splits; 1 to num_classes)."""

    def __init__(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        real: torch.Tensor,
        num_classes: int,
        cache_dir=None,
        real_labels: torch.Tensor | None = None,
        coverage_share: float = 0.5,
    ) -> None:
        _check_images(train_images, "train_images")
        _check_images(real, "real")
        if real.shape[1:] != train_images.shape[1:]:
            shapes = tuple(real.shape[1:]), tuple(train_images.shape[1:])
            raise ValueError(f"real images are {shapes[0]}, training images {shapes[1]}: give one shape")
        import torch_fidelity  # noqa: F401  (fail now, naming the package, not at the first evaluation)

        self.net, self.path = load_or_train(train_images, train_labels, num_classes, cache_dir)
        self.real, self.train_images, self.num_classes = real, train_images, num_classes
        self.coverage_share = coverage_share
        self.accuracy = None
        if real_labels is not None:
            with torch.no_grad():
                pred = torch.cat([self.net(_from_uint8(x)).argmax(1) for x in real.split(1000)])
            self.accuracy = float((pred == real_labels.long()).float().mean())

    def __call__(self, samples: torch.Tensor) -> dict:
        """The three metrics of ``samples`` ([N, C, H, W] in [-1, 1], the real images' shape)."""
        if not torch.is_tensor(samples) or samples.dim() != 4 or tuple(samples.shape[1:]) != tuple(self.real.shape[1:]):
            got = tuple(samples.shape) if torch.is_tensor(samples) else type(samples).__name__
            raise ValueError(f"samples must be [N, {', '.join(map(str, self.real.shape[1:]))}] images, got {got}")
        if not torch.isfinite(samples).all():
            return {"fid_classifier": None, "coverage": None, "score": None}
        return self.of_uint8(to_uint8(samples))

    def of_uint8(self, images: torch.Tensor) -> dict:
        import torch_fidelity

        _check_images(images, "images")
        if self.path is None:
            raise ValueError("ClassifierMetric needs a cache_dir: torch-fidelity reads the classifier from its file")
        _register_extractor()
        with torch.no_grad():
            pred = torch.cat([self.net(_from_uint8(x)).argmax(1) for x in images.split(1000)])
        counts = torch.bincount(pred, minlength=self.num_classes)
        covered = int((counts >= self.coverage_share * images.shape[0] / self.num_classes).sum())
        res = torch_fidelity.calculate_metrics(
            input1=_Images(images),
            input2=_Images(self.real),
            fid=True,
            isc=True,
            feature_extractor=EXTRACTOR,
            feature_extractor_weights_path=str(self.path),
            cuda=False,
            batch_size=500,
            save_cpu_ram=True,  # no loader worker processes for tensors already in memory
            cache=False,
            verbose=False,
        )
        return {
            "fid_classifier": res["frechet_inception_distance"],
            "coverage": covered / self.num_classes,
            "score": res["inception_score_mean"],
        }

    def real_vs_real(self) -> dict:
        """The metrics of the classifier's own training images against the held-out ones: the floor a perfect
        generator of the data would reach (up to sampling noise)."""
        return self.of_uint8(self.train_images)
