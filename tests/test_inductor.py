"""odegan_kernels.inductor: Inductor's CPU vector-ISA checks (each a probe built and loaded in a fresh Python that
imports torch, in every process that compiles for the CPU) answered from the files where earlier processes wrote their
passes. What Inductor concludes must be what it concludes unpatched, side effects included; a file that is not
exactly a pass is never believed; a failure is never remembered; the user's own vec_isa_ok wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch._inductor import config
from torch._inductor import cpu_vec_isa as isa

from odegan_kernels import inductor

CODE = 'extern "C" void probe() {}\n'


class Check:
    def __init__(self, ok: bool):
        self.ok, self.calls = ok, 0

    def __call__(self, vec_isa, code):
        self.calls += 1
        return self.ok


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_a_pass_is_remembered_and_read_back(cache):
    first = Check(True)
    assert inductor.remembered(first)(isa.VecAVX2(), CODE) is True
    assert first.calls == 1
    (path,) = cache.glob("vec-isa-*.ok")
    assert path.read_bytes() == inductor.PASS
    later = Check(False)  # a later process: a call to its check would show (and answer False)
    assert inductor.remembered(later)(isa.VecAVX2(), CODE) is True
    assert later.calls == 0


def test_a_failure_is_not_remembered(cache):
    check = inductor.remembered(Check(False))
    assert check(isa.VecAVX2(), CODE) is False
    assert not list(cache.glob("vec-isa-*"))
    again = Check(True)
    assert inductor.remembered(again)(isa.VecAVX2(), CODE) is True and again.calls == 1


def test_the_key_moves_with_what_the_check_depends_on(cache, monkeypatch):
    from torch._inductor import cpp_builder

    avx2 = isa.VecAVX2()
    here = inductor.memo_path(avx2, CODE)
    assert here is not None and here.parent == cache and here.name.startswith("vec-isa-")
    assert inductor.memo_path(avx2, CODE + " ") != here  # another probe (AVX512-BF16's, AMX's)
    assert inductor.memo_path(isa.VecAVX512(), CODE) != here  # another ISA
    moved = [
        lambda: monkeypatch.setattr(cpp_builder, "get_compiler_version_info", lambda cxx: "another compiler"),
        lambda: monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "/another/g++"),
        lambda: monkeypatch.setattr(isa, "x86_isa_checker", lambda: ["avx2"]),  # another CPU
        lambda: monkeypatch.setattr(torch.version, "git_version", "another build"),  # the same version, rebuilt
        lambda: monkeypatch.setattr(torch, "__version__", "0.0.0"),
        lambda: monkeypatch.setattr(sys, "executable", "/another/python"),
        lambda: monkeypatch.setenv("LD_LIBRARY_PATH", "/another/lib"),  # what the loading child links against
        lambda: monkeypatch.setenv("TORCH_CUSTOM_PYTHONPATH", "/another/site"),  # which torch the child imports
    ]
    for move in moved:
        move()
        assert inductor.memo_path(avx2, CODE) != here
        monkeypatch.undo()
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        assert inductor.memo_path(avx2, CODE) == here
    monkeypatch.setattr(cpp_builder, "get_compiler_version_info", lambda cxx: "")
    assert inductor.memo_path(avx2, CODE) is None  # no compiler to name: nothing remembered


def test_isas_that_print_alike_are_told_apart(cache):
    neon, sve = isa.VecNEON(), isa.VecSVE256()  # ARM: both print as "asimd"
    assert str(neon) == str(sve)
    assert inductor.memo_path(neon, CODE) != inductor.memo_path(sve, CODE)


def test_the_file_is_found_when_the_check_runs(cache, monkeypatch):
    check = Check(True)
    remembered = inductor.remembered(check)
    remembered(isa.VecAVX2(), CODE)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache / "another"))  # a cache folder chosen later
    remembered(isa.VecAVX2(), CODE)
    assert check.calls == 2 and list((cache / "another").glob("vec-isa-*.ok"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    remembered(isa.VecAVX2(), CODE)
    assert check.calls == 2


@pytest.mark.parametrize("ok", [False, True])
def test_the_users_vec_isa_ok_is_their_answer(cache, ok):
    inductor.remembered(Check(True))(isa.VecAVX2(), CODE)  # a pass on file
    with config.patch({"cpp.vec_isa_ok": ok}):
        check = Check(False)
        assert inductor.remembered(check)(isa.VecAVX2(), CODE) is False and check.calls == 1  # not read
        inductor.remembered(Check(True))(isa.VecAVX512(), CODE)
    assert len(list(cache.glob("vec-isa-*"))) == 1  # nothing written meanwhile


@pytest.mark.parametrize("content", [b"pass", b"pass\n\n", b"PASS\n", b"pass\nmore", b"", b"\xff\xfe", b"p" * 10**6])
def test_a_file_that_is_not_exactly_a_pass_is_checked_over(cache, content):
    path = inductor.memo_path(isa.VecAVX2(), CODE)
    path.write_bytes(content)
    check = Check(True)
    assert inductor.remembered(check)(isa.VecAVX2(), CODE) is True
    assert check.calls == 1
    assert path.read_bytes() == inductor.PASS  # the pass written over it


def test_a_fifo_a_folder_or_a_link_at_the_file(cache, tmp_path, monkeypatch):
    path = inductor.memo_path(isa.VecAVX2(), CODE)
    os.mkfifo(path)
    check = Check(True)
    assert inductor.remembered(check)(isa.VecAVX2(), CODE) is True and check.calls == 1  # no hang on the FIFO
    os.unlink(path)
    path.mkdir()
    assert inductor.remembered(Check(True))(isa.VecAVX2(), CODE) is True  # a folder: checked, left alone
    assert path.is_dir()
    path.rmdir()
    users = tmp_path / "users-file.txt"
    users.write_text("keep me\n")
    path.symlink_to(users)
    inductor.remembered(Check(True))(isa.VecAVX2(), CODE)
    assert users.read_text() == "keep me\n"  # the link replaced, never written through
    blocked = cache / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(blocked))
    check = Check(True)
    assert inductor.remembered(check)(isa.VecAVX2(), CODE) is True and check.calls == 1  # a folder that cannot be made
    assert inductor.memo_path(isa.VecAVX2(), CODE) is None


CHILD = r"""
import json, subprocess, sys
loads = []
real = subprocess.check_call
def spy(cmd, *a, **k):
    if isinstance(cmd, list) and any("LoadLibrary" in str(c) for c in cmd):
        loads.append(1)
    return real(cmd, *a, **k)
subprocess.check_call = spy
if sys.argv[1] == "remembered":
    from odegan_kernels import inductor
    assert inductor.remember_vec_isa()
from torch._inductor import cpu_vec_isa as isa
got = isa.valid_vec_isa_list()
picked = isa.pick_vec_isa()
print(json.dumps({
    "isas": [type(v).__name__ for v in got],
    "picked": type(picked).__name__,
    "flags": picked.build_arch_flags() if got else None,
    "extensions": [[getattr(v, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_fp16_supported")] for v in got],
    "loads": len(loads),
}))
"""


def _child(mode: str, cache_dir) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    env.pop("TORCHINDUCTOR_VEC_ISA_OK", None)
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_inductor_concludes_what_it_concludes_unpatched(tmp_path):
    """Three fresh processes: Inductor alone, then remembering into an empty cache, then reading it back. The ISAs,
    the one picked, its compiler flags and what the checks set (AVX512-BF16, AMX-FP16) are the same in all three;
    the last loads no probe (on a CPU Inductor has no ISA to check for, all three load none and agree)."""
    plain = _child("plain", tmp_path / "plain")
    first = _child("remembered", tmp_path / "memo")
    later = _child("remembered", tmp_path / "memo")
    assert first["loads"] == plain["loads"]
    assert later["loads"] == 0
    for got in (first, later):
        assert {k: v for k, v in got.items() if k != "loads"} == {k: v for k, v in plain.items() if k != "loads"}
    assert bool(list((tmp_path / "memo").glob("vec-isa-*.ok"))) == bool(plain["isas"])  # a pass, remembered
