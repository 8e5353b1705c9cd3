"""What the wheel and the sdist hold: the package with its C++/CUDA sources and LICENSE, and in the sdist the
CMake build too. Built as CI builds them (.ci/wheel_smoke.sh --build-only: a few seconds); the same script,
run whole in CI, installs the wheel into a fresh venv and builds and runs the csrc library from it."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from odegan_kernels.ops import csrc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run(
        ["bash", str(ROOT / ".ci" / "wheel_smoke.sh"), "--build-only", str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def _sources() -> list[str]:
    """The C++/CUDA sources in the checkout, as paths from its root (csrc/...)."""
    files = [f.relative_to(ROOT).as_posix() for f in csrc.sources()]
    assert {"csrc/ops.cpp", "csrc/cuda/ops_cuda.cu"} <= set(files), files
    return files


def _in_wheel(source: str) -> str:
    """Where the wheel carries a source of csrc/: inside the package, as odegan_kernels/csrc/..."""
    return "odegan_kernels/" + source


def test_wheel_holds_the_csrc_sources_and_the_license(dists):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [_in_wheel(f) for f in _sources() if _in_wheel(f) not in names]
        assert not missing, f"the wheel lacks {missing}"
        assert not [n for n in names if n.startswith("csrc/")], "the sources belong inside the package in a wheel"
        assert "odegan_kernels/ops/csrc.py" in names
        (license,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert z.read(license) == (ROOT / "LICENSE").read_bytes()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Dist: ninja" in metadata
    jax = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: jax")]
    assert jax and all("extra ==" in line for line in jax), f"jax must stay an optional (bench) dependency: {jax}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))], "build products in the wheel"


def test_sdist_holds_the_sources_the_cmake_build_and_the_license(dists):
    _, sdist = dists
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        names = {n.removeprefix(top + "/") for n in t.getnames()}
        wanted = _sources() + ["CMakeLists.txt", "csrc/build.sh", "LICENSE"]
        missing = [f for f in wanted if f not in names]
        assert not missing, f"the sdist lacks {missing}"
        assert t.extractfile(f"{top}/LICENSE").read() == (ROOT / "LICENSE").read_bytes()


def test_every_subpackage_is_packaged():
    """pyproject.toml lists the packages (csrc/ is mapped in from the top level): a new subpackage must be there."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's tomllib reads pyproject.toml")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "odegan_kernels").rglob("__init__.py")}
    assert found - listed == set(), f"subpackages missing from pyproject.toml's packages: {sorted(found - listed)}"
    assert "odegan_kernels.csrc" in listed


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 the odegan-kernels authors\n")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


def test_the_package_page_has_no_links_a_package_index_cannot_follow(dists):
    """The wheel's long description (a package index's page) shows no image or link relative to the checkout."""
    import re

    wheel, _ = dists
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    head, _, page = metadata.partition("\n\n")
    assert "Description-Content-Type: text/markdown" in head
    assert "ODEStepper" in page
    targets = re.findall(r"\]\(([^)]+)\)", page) + re.findall(r"<img[^>]*src=\"([^\"]+)\"", page)
    relative = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert not relative, f"the package page links to files it does not have: {relative}"
