"""FID's inputs: real images in a folder or a class-folder tree, and Inception weights that load safely.

Nothing is downloaded: the weights file is torch-fidelity's own Inception network saved with random weights (the
real file's format, keys and shapes; its FID values mean nothing, but FID of a set against itself is still
zero), the real images are small PNGs, and every download is replaced by one that fails as an offline machine's
does.
"""

import math
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

torch_fidelity = pytest.importorskip("torch_fidelity", reason="FID needs torch-fidelity (the [dev] extra)")
from PIL import Image  # noqa: E402  (torch-fidelity brings torchvision and PIL)
from torch_fidelity import feature_extractor_inceptionv3 as inception  # noqa: E402

from odegan_kernels.metrics import (  # noqa: E402
    check_fid_inputs,
    fid_is,
    fid_real_inputs,
    inception_weights_file,
    load_inception_weights,
)
from odegan_kernels.problems import build_problem  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception network with random weights, saved as its released weights file is."""
    path = tmp_path_factory.mktemp("inception") / "weights-inception.pth"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(inception, "load_state_dict_from_url", lambda *a, **k: None)  # no weights to fetch
        m.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    torch.save(net.state_dict(), path)
    return path


def write_images(folder: Path, n: int, size=(32, 32), seed: int = 0, mode: str = "RGB") -> list[torch.Tensor]:
    """n random PNGs; returns them as uint8 [3, H, W] tensors (as torch-fidelity reads them)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
        img = Image.fromarray(x.numpy()).convert(mode)
        img.save(folder / f"{i:03d}.png")
        out.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
    return out


@pytest.fixture
def class_tree(tmp_path) -> tuple[Path, list[torch.Tensor]]:
    """An ImageFolder tree (one subfolder per class, no image at the top) of 32x32 images."""
    root = tmp_path / "real"
    images = write_images(root / "cat", 6, seed=1) + write_images(root / "dog", 6, seed=2, mode="L")
    return root, images


def replay(images: list[torch.Tensor]):
    """generate(n) that returns the given uint8 images, in [-1, 1], n at a time."""
    left = list(images)

    def generate(n):
        batch, left[:] = left[:n], left[n:]
        return torch.stack(batch).float() / 127.5 - 1

    return generate


def noise(n):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)) * 2 - 1


# -- the real side: a class-folder tree -----------------------------------------------------------------
def test_fid_against_a_class_folder_tree(class_tree, weights):
    """torch-fidelity itself finds the images of an ImageFolder tree (it looks only at the top folder by
    default); FID of those images against themselves is zero, and far from it against noise."""
    root, images = class_tree
    same = fid_is(
        replay(images),
        str(root),
        num_samples=len(images),
        batch=5,
        device="cpu",
        feature_extractor_weights_path=str(weights),
    )
    other = fid_is(noise, str(root), num_samples=12, batch=5, device="cpu", feature_extractor_weights_path=str(weights))
    for res in (same, other):
        assert math.isfinite(res["fid"]) and math.isfinite(res["is"]) and res["is"] > 0
    assert abs(same["fid"]) < 1e-2 * other["fid"], (same, other)


def test_grayscale_samples_against_grayscale_images(tmp_path, weights):
    """A one-channel generator (grayscale data) is read as RGB with R = G = B, as torch-fidelity reads the
    grayscale real images: the same images on both sides give FID zero."""
    root = tmp_path / "real"
    gray = [x[:1] for x in write_images(root / "digits", 10, seed=5, mode="L")]
    kw = dict(num_samples=10, batch=4, device="cpu", feature_extractor_weights_path=str(weights), isc=False)
    same = fid_is(replay(gray), str(root), **kw)
    other = fid_is(lambda n: noise(n)[:, :1], str(root), **kw)
    assert abs(same["fid"]) < 1e-2 * other["fid"], (same, other)


def test_real_images_of_other_sizes_are_resized_and_cropped(tmp_path, weights):
    """An ImageNet-like tree holds images of several sizes: they are resized and centre-cropped to the
    generated size, as the image loader does, instead of failing to batch."""
    root = tmp_path / "real"
    write_images(root / "a", 5, size=(40, 48), seed=3)
    write_images(root / "b" / "deeper", 5, size=(64, 36), seed=4)
    res = fid_is(
        noise, str(root), num_samples=10, batch=10, device="cpu", feature_extractor_weights_path=str(weights), isc=False
    )
    assert math.isfinite(res["fid"]) and res["is"] is None


def test_fid_real_that_cannot_serve(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"fid_real=.*empty: no images \(\.jpg.*\) in it or its subfolders"):
        fid_real_inputs(str(empty))
    with pytest.raises(ValueError, match="is not a folder: give a folder of real images"):
        fid_real_inputs(str(empty / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist: .*cifar10-train"):
        fid_real_inputs(str(tmp_path / "missing"))
    for bad in (3, True, "", None):
        with pytest.raises(TypeError, match="fid_real must be a path"):
            fid_real_inputs(bad)
    flat = tmp_path / "flat"
    write_images(flat, 2)
    assert fid_real_inputs(flat)["input2"] == str(flat)
    assert fid_real_inputs("cifar10-train") == {"input2": "cifar10-train"}  # torch-fidelity's own inputs


# -- the Inception weights -------------------------------------------------------------------------------
def test_no_weights_offline_says_what_to_do(class_tree, tmp_path, monkeypatch):
    """Without inception_weights the file comes from torch's hub cache; offline, a failed download names the
    setting to use instead of surfacing a raw URLError (and torch-fidelity never tries on its own)."""
    root, _ = class_tree
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    tried = []

    def offline(url, dst, *a, **k):
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("torch-fidelity downloads"))
    msg = r"inception_weights is not set; downloading them from https://\S+\.pth failed .*set inception_weights=PATH"
    with pytest.raises(FileNotFoundError, match=msg):
        check_fid_inputs(str(root), None)
    with pytest.raises(FileNotFoundError, match=msg):
        fid_is(noise, str(root), num_samples=4, device="cpu")
    assert len(tried) == 2 and tried[0] == inception.URL_INCEPTION_V3


def test_weights_in_the_hub_cache_are_used_without_a_download(class_tree, weights, tmp_path, monkeypatch):
    root, _ = class_tree
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    cached = tmp_path / "hub" / "checkpoints" / Path(inception.URL_INCEPTION_V3).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights.read_bytes())
    assert inception_weights_file(None) == cached
    check_fid_inputs(str(root), None)


def test_bogus_weights_files(tmp_path, weights):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a weights file\n" * 10)
    with pytest.raises(ValueError, match=r"inception_weights=.*junk.pth is not a PyTorch weights file"):
        load_inception_weights(junk)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a PyTorch weights file"):
        load_inception_weights(tmp_path / "empty.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="is not a state dict of named tensors .*list"):
        load_inception_weights(tmp_path / "list.pth")
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "other.pth")
    with pytest.raises(
        ValueError, match=r"not torch-fidelity's Inception weights \(Conv2d_1a_3x3.conv.weight .*no such"
    ):
        load_inception_weights(tmp_path / "other.pth")
    for bad in (tmp_path / "missing.pth", tmp_path):
        with pytest.raises(FileNotFoundError, match="is not a file: give the path of torch-fidelity's Inception"):
            inception_weights_file(str(bad))
    with pytest.raises(TypeError, match="inception_weights must be a path"):
        inception_weights_file(1)
    assert set(load_inception_weights(weights)) == set(torch.load(weights, weights_only=True))


def test_weights_that_do_not_fit_the_network(class_tree, weights, tmp_path):
    """The right signature but a missing tensor: torch-fidelity's strict load fails, and says so in our words."""
    root, _ = class_tree
    state = torch.load(weights, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="does not fit torch-fidelity's Inception network: Error.*loading state_dict"):
        fid_is(
            noise, str(root), num_samples=4, device="cpu", feature_extractor_weights_path=str(tmp_path / "partial.pth")
        )


class Payload:
    """Unpickling this writes a file: what a hostile weights file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_pickled_payload_in_the_weights_is_refused_and_never_runs(class_tree, weights, tmp_path):
    root, _ = class_tree
    state = torch.load(weights, weights_only=True)
    # the test's own check that the payload is live: an unguarded load runs it
    live = tmp_path / "live-marker"
    torch.save({**state, "extra": Payload(live)}, tmp_path / "live.pth")
    torch.load(tmp_path / "live.pth", weights_only=False)
    assert live.read_text() == "ran"

    marker = tmp_path / "marker"
    bad = tmp_path / "hostile.pth"
    torch.save({**state, "extra": Payload(marker)}, bad)
    msg = "holds more than tensors, so it was not loaded .*weights_only=True"
    with pytest.raises(ValueError, match=msg):
        load_inception_weights(bad)
    with pytest.raises(ValueError, match=msg):
        check_fid_inputs(str(root), str(bad))
    with pytest.raises(ValueError, match=msg):  # the real torch-fidelity behind it, which would unpickle freely
        fid_is(noise, str(root), num_samples=4, device="cpu", feature_extractor_weights_path=str(bad))
    assert not marker.exists(), "the payload ran"


# -- the settings together, and fid_is's own arguments ---------------------------------------------------------
def _cfg(**kw):
    base = dict(z_dim=8, hidden=5, seed=0, device="cpu", data=None, fid_real=None, inception_weights=None)
    base["fid_features"] = "inception"
    return SimpleNamespace(**{**base, **kw})


def test_weights_without_fid_real_are_refused(weights, tmp_path):
    with pytest.raises(ValueError, match="inception_weights is set but fid_real is not"):
        check_fid_inputs(None, str(weights))
    with pytest.raises(ValueError, match="inception_weights is set but fid_real is not"):
        build_problem("imagefolder", _cfg(data=str(tmp_path / "data"), inception_weights=str(weights)))
    for name in ("mog", "dirac"):
        for opt in ("fid_real", "inception_weights"):
            with pytest.raises(
                ValueError, match=f"fid_real and inception_weights are for the image problems; '{name}'"
            ):
                build_problem(name, _cfg(**{opt: str(weights)}))
    with pytest.raises(FileNotFoundError, match="fid_real=.* does not exist"):
        build_problem(
            "cifar10", _cfg(data=str(tmp_path), fid_real=str(tmp_path / "nope"), inception_weights=str(weights))
        )
    check_fid_inputs(None, None)  # no FID: nothing to check


def test_fid_is_arguments(class_tree, weights):
    root, _ = class_tree
    run = lambda gen, **kw: fid_is(
        gen, str(root), **{"device": "cpu", "feature_extractor_weights_path": str(weights), "num_samples": 4, **kw}
    )
    with pytest.raises(TypeError, match="generate must be a function of n"):
        run("noise")
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="num_samples must be a positive int"):
            run(noise, num_samples=bad)
        with pytest.raises(ValueError, match="batch must be a positive int"):
            run(noise, batch=bad)
    with pytest.raises(TypeError, match="isc must be True or False"):
        run(noise, isc="yes")
    msg = r"generate\(4\) must return 4 images as an \[4, 3 or 1, H, W\] tensor, got \(4, 2"
    with pytest.raises(ValueError, match=msg):
        run(lambda n: torch.zeros(n, 2, 32, 32))
    with pytest.raises(ValueError, match=r"generate\(4\) must return .* got list"):
        run(lambda n: [torch.zeros(3, 32, 32)] * n)
    nan = lambda n: noise(n).index_fill_(0, torch.tensor([1]), float("nan"))
    with pytest.raises(ValueError, match=r"generate\(4\) returned 3072 non-finite values"):
        run(nan)
