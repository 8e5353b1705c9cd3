"""Whole-step CUDA graph capture: the CPU-side logic here; the GPU tests run in bench/gpu_check.sh."""

import contextlib

import pytest
import torch

from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
from odegan_kernels.graphs import GraphCaptureError, StaticBatches, StepGraph, capture_error
from odegan_kernels.models import mog_pair
from odegan_kernels.train import Trainer, make_config

from .conftest import gpu


def test_refuses_cpu_parameters():
    D, G = mog_pair()
    with pytest.raises(GraphCaptureError, match="needs the players' parameters on a CUDA device"):
        ODEStepper(FlatParams(D=D, G=G), cuda_graph=True)


def test_trainer_refuses_graph_for_baselines():
    with pytest.raises(ValueError, match="cuda_graph applies to the ODE stepper"):
        Trainer(make_config("mog-adam", cuda_graph=True, out="unused"))


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        StepGraph(lambda c: None, warmup=0)


def test_static_buffers_feed_each_stage(tmp_path):
    """Graph mode reads stage i's batch from static buffer slot i (fresh data) or slot 0 (shared)."""
    for per_stage, expected in (("fresh", [0, 1, 2, 3]), ("shared", [0])):
        tr = Trainer(make_config("mog-joint", data_per_stage=per_stage, out=str(tmp_path), progress=False))
        n = 4 if per_stage == "fresh" else 1
        static = tr.game_closure.static = StaticBatches(n, 512, tr.problem.sample_shape, labels=False, device="cpu")
        static.x.zero_()
        tr.game_closure.fill_static()
        assert static.x.abs().sum() > 0  # refilled from the data pipeline
        seen = []

        def spy(stage, inner=tr.closure):
            out = inner(stage)
            seen.append(tr.game_closure.batch.real.data_ptr())
            return out

        tr.opt.step(spy)
        slots = [static.x[i].data_ptr() for i in range(n)]
        assert [slots.index(p) for p in dict.fromkeys(seen)] == expected


def test_static_label_buffers_follow_their_images(tmp_path):
    """A conditional problem in graph mode: each stage's real labels sit in a static slot beside its images."""
    pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")
    from .test_trainer import tiny_imagenet_config, write_imagefolder

    write_imagefolder(tmp_path / "data")
    tr = Trainer(tiny_imagenet_config(tmp_path, steps=1))
    static = tr.game_closure.static = StaticBatches(4, 4, tr.problem.sample_shape, labels=True, device="cpu")
    static.y.fill_(-1)
    tr.game_closure.fill_static()
    assert torch.equal(static.x.mean(dim=(3, 4)).argmax(2), static.y % 3)  # colour c is class c
    seen = []

    def spy(stage, inner=tr.closure):
        out = inner(stage)
        seen.append(
            (
                tr.game_closure.batch.real.data_ptr(),
                tr.game_closure.batch.y_real.data_ptr(),
                tr.game_closure.batch.y_fake.shape,
            )
        )
        return out

    tr.opt.step(spy)
    assert [x for x, _, _ in seen] == [static.x[i].data_ptr() for i in range(4)]
    assert [y for _, y, _ in seen] == [static.y[i].data_ptr() for i in range(4)]
    assert all(shape == (4,) for _, _, shape in seen)


# -- on a GPU ------------------------------------------------------------------------------------------
def _pair_on_cuda(seed=0):
    D, G = mog_pair(seed=seed)
    return D.cuda(), G.cuda()


def _run(cuda_graph: bool, coupling: str, penalty: str, steps: int, data, zs, schedule):
    D, G = _pair_on_cuda()
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(
        flat,
        "rk4",
        h=0.1,
        reg=0.07,
        reg_at=penalty,
        coupling=coupling,
        cuda_graph=cuda_graph,
        backend="auto",
    )
    static_x = torch.empty_like(data[0])
    static_z = torch.empty_like(zs[0])

    def closure(stage):
        i = stage.index
        return game_gradients(D, G, Batch(static_x[i], static_z[i]), "ns", stage.players, stage.penalties)

    sched = torch.optim.lr_scheduler.LambdaLR(st, schedule)
    history = []
    for s in range(steps):
        static_x.copy_(data[s])  # fresh batch per stage: [4, B, 2]
        static_z.copy_(zs[s])
        st.step(closure)
        sched.step()
        history.append(flat.params.clone())
    return history, st


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("coupling,penalty", [("joint", "first_stage"), ("decoupled", "after_step")])
def test_captured_step_equals_eager_step(coupling, penalty):
    gen = torch.Generator().manual_seed(0)
    steps = 8
    data = [torch.randn(4, 256, 2, generator=gen).cuda() for _ in range(steps)]
    zs = [torch.randn(4, 256, 32, generator=gen).cuda() for _ in range(steps)]
    schedule = lambda step: 1.0 + 0.25 * (step % 3)  # changes h between replays
    eager, _ = _run(False, coupling, penalty, steps, data, zs, schedule)
    graphed, st = _run(True, coupling, penalty, steps, data, zs, schedule)
    assert st.graph.captured
    for e, g in zip(eager, graphed):
        assert torch.isfinite(g).all()
        assert ((g - e).norm() / e.norm()).item() <= 1e-6


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("coupling,penalty", [("joint", "first_stage"), ("decoupled", "after_step")])
def test_a_captured_population_step_equals_its_eager_step(coupling, penalty):
    """A population (3 members, h and lambda mixed) captured in one CUDA graph: every replay equals the eager
    population's step (issue 20: graph capture takes a population), the batched hand-derived engine inside."""
    from odegan_kernels.game import PopulationMLP

    gen = torch.Generator().manual_seed(0)
    steps, k = 6, 3
    data = [torch.randn(4, k, 128, 2, generator=gen).cuda() for _ in range(steps)]
    zs = [torch.randn(4, k, 128, 32, generator=gen).cuda() for _ in range(steps)]

    def run(graph):
        pairs = [tuple(m.cuda() for m in mog_pair(seed=s)) for s in range(k)]
        flat = FlatParams(D=[p[0] for p in pairs], G=[p[1] for p in pairs], members=k)
        st = ODEStepper(flat, "rk4", h=[0.05, 0.1, 0.02], reg=[0.07, 0.0, 0.3], reg_at=penalty, coupling=coupling,
                        cuda_graph=graph)  # fmt: skip
        engine = PopulationMLP(flat, *pairs[0], "ns")
        sx, sz = torch.empty_like(data[0]), torch.empty_like(zs[0])

        def closure(stage):
            return engine(Batch(sx[stage.index], sz[stage.index]), stage.players, stage.penalties)

        out = []
        for s in range(steps):
            sx.copy_(data[s])
            sz.copy_(zs[s])
            st.step(closure)
            out.append(flat.params.clone())
        return out, st

    eager, _ = run(False)
    graphed, st = run(True)
    assert st.graph.captured
    for e, g in zip(eager, graphed):
        assert torch.isfinite(g).all()
        assert ((g - e).norm() / e.norm()).item() <= 1e-6


@gpu
@pytest.mark.gpu
def test_no_host_sync_inside_the_step():
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 256, 2, generator=gen).cuda() for _ in range(6)]
    zs = [torch.randn(4, 256, 32, generator=gen).cuda() for _ in range(6)]
    for cuda_graph in (False, True):
        D, G = _pair_on_cuda()
        flat = FlatParams(D=D, G=G)
        st = ODEStepper(flat, "rk4", h=0.1, reg=0.07, cuda_graph=cuda_graph)
        x, z = data[0].clone(), zs[0].clone()

        def closure(stage):
            return game_gradients(D, G, Batch(x[stage.index], z[stage.index]), "ns", stage.players, stage.penalties)

        for _ in range(5):  # warm-up (and capture): caches, tables, Triton compilation
            st.step(closure)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            st.step(closure)
            st.h = [0.05, 0.07]  # a change of h (a scheduler's, every step) is written without a host sync too
            st.step(closure)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        assert torch.isfinite(flat.params).all()


@gpu
@pytest.mark.gpu
def test_trainer_graph_mode_trains(tmp_path):
    cfg = make_config(
        "mog",
        device="cuda",
        cuda_graph=True,
        steps=300,
        eval_every=300,
        log_every=100,
        plot_every=10**9,
        out=str(tmp_path),
        progress=False,
    )
    summary = Trainer(cfg).run()
    assert summary["finite"] and summary["step"] == 300


@gpu
@pytest.mark.gpu
def test_trainer_graph_mode_conditional_images(tmp_path):
    """The imagenet128 preset (narrow, 32x32) captured: real labels from static slots, fake ones drawn in-graph."""
    pytest.importorskip("torchvision", reason="image data needs torchvision")
    from .test_trainer import tiny_imagenet_config, write_imagefolder

    write_imagefolder(tmp_path / "data")
    tr = Trainer(tiny_imagenet_config(tmp_path, steps=4, device="cuda", cuda_graph=True))
    assert tr.game_closure.static.y is not None and tr.game_closure.static.y.shape == (4, 4)
    summary = tr.run()
    assert summary["step"] == 4 and torch.isfinite(tr.flat.params).all()


def test_every_problem_states_its_sample_shape(tmp_path):
    """Graph mode sizes its static buffers from this, without drawing (and so consuming) a batch."""
    for preset in ("mog", "dirac"):
        tr = Trainer(make_config(preset, out=str(tmp_path), progress=False))
        assert tuple(tr.problem.real_batch(4, tr.state.streams.data).shape[1:]) == tr.problem.sample_shape


def test_capture_errors_keep_the_original_message():
    """A failed capture says what most likely caused it only when the error says so, and always carries the
    original error's type and first line."""
    sync = capture_error(RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore"))
    assert "synchronises with the host" in str(sync)
    assert "RuntimeError: CUDA error: operation not permitted when stream is capturing" in str(sync)
    other = capture_error(ValueError("module load failed: cuModuleLoadData"))
    assert "synchronises" not in str(other) and "ValueError: module load failed: cuModuleLoadData" in str(other)


SYNCING_CLOSURE = r"""
import torch
from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
from odegan_kernels.graphs import GraphCaptureError
from odegan_kernels.models import mog_pair

def pair():
    D, G = mog_pair(seed=0)
    return D.cuda(), G.cuda()

D, G = pair()
flat = FlatParams(D=D, G=G)
st = ODEStepper(flat, "euler", h=0.1, cuda_graph=True, graph_warmup=1)
x, z = torch.randn(64, 2).cuda(), torch.randn(64, 32).cuda()

def syncing(stage):
    out = game_gradients(D, G, Batch(x, z), players=stage.players)
    float(out.loss_d)  # a host read: refused under capture
    return out

st.step(syncing)  # warm-up runs eagerly
before, stream = flat.params.clone(), torch.cuda.current_stream()
try:
    st.step(syncing)
    raise SystemExit("the syncing closure was captured")
except GraphCaptureError as exc:
    assert "synchronises with the host" in str(exc), exc
assert torch.cuda.current_stream() == stream and torch.equal(flat.params, before)
print("refused")
# the same process after the failure: a good closure captures and replays as eager steps run
for cuda_graph in (False, True):
    D, G = pair()
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=0.1, reg=0.07, cuda_graph=cuda_graph, graph_warmup=1)
    torch.manual_seed(0)
    for _ in range(4):
        x.normal_(), z.normal_()
        st.step(lambda s: game_gradients(D, G, Batch(x, z), players=s.players, penalties=s.penalties))
    if cuda_graph:
        assert st.graph.captured
        err = ((flat.params - eager).norm() / eager.norm()).item()
        assert err <= 1e-6, err
    else:
        eager = flat.params.clone()
print("captured after a failed capture")
"""


@gpu
@pytest.mark.gpu
def test_closure_that_syncs_is_refused_leaving_the_current_stream_and_the_parameters():
    """A closure that reads a value back cannot be captured: the error says so, and the failed capture leaves the
    caller's stream current and the parameters at the step's start; a later capture in the same process works.
    In a subprocess: a failed capture must not leave this test process's allocator in a state that fails a later
    test confusingly."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", SYNCING_CLOSURE], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "captured after a failed capture" in res.stdout, res.stdout + res.stderr[-4000:]


@gpu
@pytest.mark.gpu
def test_graph_mode_with_loader_workers(tmp_path):
    """Capture while the DataLoader's worker and pin-memory threads run (thread_local capture mode)."""
    pytest.importorskip("torchvision", reason="image data needs torchvision")
    from .test_trainer import tiny_imagenet_config, write_imagefolder

    write_imagefolder(tmp_path / "data", per_class=12)
    tr = Trainer(tiny_imagenet_config(tmp_path, steps=6, device="cuda", cuda_graph=True, workers=2))
    assert tr.run()["step"] == 6 and torch.isfinite(tr.flat.params).all()


class _FakeCuda:
    """Stand-ins for torch.cuda's stream and graph calls, so StepGraph's bookkeeping runs on a CPU: a fake
    graph records what the step asked for while it was captured, and a replay logs that recording."""

    def __init__(self, monkeypatch):
        self.recording: list | None = None
        self.replayed: list = []
        self.captured_on: list = []  # the stream each capture began on
        self.end_raises = False  # capture_end fails, as torch's does after a capture that went wrong
        self.current = None
        fake = self

        class Graph:
            def capture_begin(self, capture_error_mode="global"):
                assert capture_error_mode == "thread_local"
                fake.recording = []
                fake.captured_on.append(fake.current)

            def capture_end(self):
                self.recorded, fake.recording = fake.recording, None
                if fake.end_raises:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

            def reset(self):
                pass

            def replay(self):
                fake.replayed.append(self.recorded)

        class Stream:
            def wait_stream(self, other):
                pass

        @contextlib.contextmanager
        def stream(s):
            before, fake.current = fake.current, s
            try:
                yield
            finally:
                fake.current = before

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def test_each_kind_of_step_is_warmed_captured_and_replayed_on_its_own_graph(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    eager = []

    def run_step(closure):
        work = closure()
        if fake.recording is not None:
            fake.recording.append(work)
        else:
            eager.append(work)
        return work

    sg = StepGraph(run_step, warmup=2)
    kinds = [("r1",) if s % 3 == 0 else () for s in range(15)]
    for kind in kinds:
        sg(lambda kind=kind: kind, key=kind)
    # r1 steps (0, 3, 6, ...): two eager, the capture at step 6 (recorded, then replayed), replays after;
    # the others the same on their own graph
    assert eager == [("r1",), (), (), ("r1",)]
    assert sg.captured and set(sg.variants) == {(), ("r1",)}
    replays = [r[0] for r in fake.replayed]
    assert replays == kinds[4:]  # from the first capture (step 4) on, every step replays its own kind's graph
    sg.reset()
    assert not sg.captured


def test_a_captured_kind_refuses_another_closure(monkeypatch):
    _FakeCuda(monkeypatch)
    sg = StepGraph(lambda closure: closure(), warmup=1)
    for _ in range(2):
        sg(lambda: 1.0, key="a")
    with pytest.raises(GraphCaptureError, match="replays the closure it captured"):
        sg(lambda: 2.0, key="a")
    sg(lambda: 3.0, key="b")  # another kind warms up with its own closure


def test_a_failed_capture_drops_its_stream_and_warms_up_again(monkeypatch):
    """After a failed capture (capture_end raising too), the side stream is dropped, so nothing later allocates on a
    stream whose allocations may still be routed to the dead graph's pool: the kind warms up again on a fresh
    stream and captures there."""
    fake = _FakeCuda(monkeypatch)
    calls = []

    def run_step(closure):
        calls.append(fake.current)
        return closure()

    def failing():
        if fake.recording is not None:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return 1.0

    sg = StepGraph(run_step, warmup=1)
    sg(failing)  # warm-up
    first = sg.stream
    fake.end_raises = True
    with pytest.raises(GraphCaptureError, match="synchronises with the host"):
        sg(failing)  # the capture fails; so does capture_end, whose error is not the one that matters
    assert sg.stream is None and not sg.captured
    fake.end_raises = False
    sg(lambda: 2.0)  # warms up again: on a new stream
    assert sg.stream is not None and sg.stream is not first and calls[-1] is sg.stream
    sg(lambda: 2.0)  # captured on the new stream
    assert sg.captured and fake.captured_on == [first, sg.stream]
    fake.end_raises = True  # a capture whose closure ran but whose capture_end fails: dropped the same way
    sg2 = StepGraph(lambda c: c(), warmup=1)
    sg2(lambda: 3.0)
    with pytest.raises(GraphCaptureError, match="could not be captured"):
        sg2(lambda: 3.0)
    assert sg2.stream is None and not sg2.captured


def test_the_syncing_closure_script_compiles():
    """Its GPU test runs it in a subprocess; here, on any machine, at least it must parse."""
    compile(SYNCING_CLOSURE, "<syncing closure>", "exec")
