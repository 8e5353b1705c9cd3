"""odegan_kernels.inductor: Inductor's CPU vector-ISA probe (a fresh Python importing torch per candidate ISA, in every
process that compiles for the CPU) answered from a file the first probing process wrote. The answer read back must
be the probe's, a file that is not a clean answer must never be believed, and the user's own vec_isa_ok wins."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch._inductor import config
from torch._inductor import cpu_vec_isa as isa

from odegan_kernels import inductor

KNOWN = {str(v): v for v in isa.supported_vec_isa_list}
ANSWER = [v for v in isa.supported_vec_isa_list if str(v) in ("avx512", "avx2")]


class Probe:
    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def __call__(self):
        self.calls += 1
        return list(self.answer)


def test_the_first_process_probes_and_writes_the_next_reads(tmp_path):
    path = tmp_path / "cache" / "vec-isa-key.json"
    first = Probe(ANSWER)
    assert inductor.remembered(first, path, KNOWN)() == ANSWER
    assert first.calls == 1
    assert json.loads(path.read_text()) == [str(v) for v in ANSWER]
    later = Probe([])  # a later process: its probe would say otherwise, so a call to it shows
    got = inductor.remembered(later, path, KNOWN)()
    assert later.calls == 0
    assert got == ANSWER and all(g is k for g, k in zip(got, ANSWER))  # Inductor's own objects
    empty = tmp_path / "none.json"  # "no ISA passed" is an answer too, remembered as such
    inductor.remembered(Probe([]), empty, KNOWN)()
    assert inductor.remembered(Probe(ANSWER), empty, KNOWN)() == []


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"avx2": true}', b'["avx2", "avx9000"]', b"[1, 2]", b"\xff\xfe", b'"avx2"', b""],
)
def test_a_file_that_is_not_a_clean_answer_is_probed_over(tmp_path, content):
    path = tmp_path / "vec-isa-key.json"
    path.write_bytes(content)
    probe = Probe(ANSWER)
    assert inductor.remembered(probe, path, KNOWN)() == ANSWER
    assert probe.calls == 1
    assert json.loads(path.read_text()) == [str(v) for v in ANSWER]  # and the clean answer written over it


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_or_a_link_at_the_file_is_not_read_through(tmp_path):
    fifo = tmp_path / "vec-isa-fifo.json"
    os.mkfifo(fifo)
    probe = Probe(ANSWER)
    assert inductor.remembered(probe, fifo, KNOWN)() == ANSWER  # no hang on the FIFO
    assert probe.calls == 1
    elsewhere = tmp_path / "users-file.txt"
    elsewhere.write_text("keep me\n")
    link = tmp_path / "vec-isa-link.json"
    link.symlink_to(elsewhere)
    inductor.remembered(Probe(ANSWER), link, KNOWN)()
    assert elsewhere.read_text() == "keep me\n"  # replaced the link, never wrote through it


def test_a_folder_that_cannot_be_written_still_answers(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    probe = Probe(ANSWER)
    assert inductor.remembered(probe, blocked / "vec-isa-key.json", KNOWN)() == ANSWER
    assert probe.calls == 1


def test_the_key_moves_with_what_the_answer_depends_on(monkeypatch, tmp_path):
    from torch._inductor import cpp_builder

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    here = inductor.memo_path()
    if here is None:
        pytest.skip("no Inductor CPU probe or C++ compiler here: nothing is remembered")
    assert here.parent == tmp_path and here.name.startswith("vec-isa-")
    monkeypatch.setattr(cpp_builder, "get_compiler_version_info", lambda cxx: "another compiler")
    assert inductor.memo_path() != here
    monkeypatch.undo()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(isa, "x86_isa_checker", lambda: ["avx2"])  # another CPU
    assert inductor.memo_path() != here
    with config.patch({"cpp.vec_isa_ok": True}):  # the user's own answer: nothing to remember
        assert inductor.memo_path() is None
    assert inductor.memo_path() is not None


def test_installed_inductor_answers_as_its_file_says():
    path = inductor.remember_vec_isa()
    if path is None:
        pytest.skip("no Inductor CPU probe or C++ compiler here: nothing is remembered")
    assert inductor.remember_vec_isa() == path  # once per process
    got = isa.valid_vec_isa_list()
    assert [str(v) for v in got] == json.loads(path.read_text())
    assert isa.pick_vec_isa() in got or not got
    fn = inductor.torch_compile(lambda x: x * 2 + 1)
    x = torch.randn(7)
    assert torch.equal(fn(x), x * 2 + 1)
