"""Data-parallel ODE steps: gloo on the CPU, two processes, one all-reduce of the flat gradients per stage."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
from odegan_kernels.models import mog_pair

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _data(steps):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 128, 2, generator=gen), torch.randn(4, 128, 32, generator=gen)) for _ in range(steps)]


def _train(coupling, penalty, reg, steps, rank=None, world=1, distributed=False):
    D, G = mog_pair(seed=1)
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=0.1, reg=reg, reg_at=penalty, coupling=coupling, distributed=distributed)
    for x, z in _data(steps):
        if rank is not None:  # this rank's half of every batch
            x, z = x.chunk(world, dim=1)[rank], z.chunk(world, dim=1)[rank]
        st.step(
            lambda s, x=x, z=z: game_gradients(
                D, G, Batch(x[s.index], z[s.index]), players=s.players, penalties=s.penalties
            )
        )
    return flat.params.clone()


def _worker(rank, world, port, coupling, penalty, reg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        out[rank] = _train(coupling, penalty, reg, 3, rank=rank, world=world, distributed=True)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("coupling,penalty", [("joint", "first_stage"), ("decoupled", "after_step")])
def test_two_ranks_equal_one_process_on_the_whole_batch(coupling, penalty):
    """Without the regulariser, averaging per-rank mean gradients is the full batch's gradient, so two
    ranks on half batches must match one process on the whole batch, and each other."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _worker, args=(2, _free_port(), coupling, penalty, 0.0, out), nprocs=2, join=True, start_method="spawn"
        )
        r0, r1 = out[0], out[1]
    single = _train(coupling, penalty, 0.0, 3)
    assert torch.equal(r0, r1)
    assert torch.allclose(r0, single, rtol=1e-5, atol=1e-6)


def test_regularised_ranks_stay_identical():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _worker,
            args=(2, _free_port(), "decoupled", "after_step", 0.07, out),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        assert torch.equal(out[0], out[1]) and torch.isfinite(out[0]).all()


# -- a population under data parallelism ----------------------------------------------------------------
POP_HS, POP_REGS, POP_STEPS, TOL = [0.1, 0.05, 0.2], [0.07, 0.0, 0.3], 4, 1e-12  # TOL: as tests/test_population.py


def _member_data(k: int, steps: int):
    """Member k's own batches, float64: [steps] of ([4 stages, 16, 2], [4, 16, 4])."""
    gen = torch.Generator().manual_seed(100 + k)
    f64 = torch.float64
    return [
        (torch.randn(4, 16, 2, generator=gen, dtype=f64), torch.randn(4, 16, 4, generator=gen, dtype=f64))
        for _ in range(steps)
    ]


def _half(t, rank, world):  # this rank's share of every stage's batch (dim 1: the batch; dim 0: the stages)
    return t.chunk(world, dim=1)[rank] if world > 1 else t


def _pop_pair(k: int):
    return mog_pair(z_dim=4, hidden=6, seed=k, dtype=torch.float64)


def _solo_member(k, coupling, penalty, rank, world):
    """Member k's settings run alone (the autograd engine), on this rank's half of its batches."""
    D, G = _pop_pair(k)
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    st = ODEStepper(flat, "rk4", h=POP_HS[k], reg=POP_REGS[k], reg_at=penalty, coupling=coupling,
                    backend="foreach", distributed=world > 1)  # fmt: skip
    for x, z in _member_data(k, POP_STEPS):
        x, z = _half(x, rank, world), _half(z, rank, world)
        st.step(lambda s, x=x, z=z: game_gradients(D, G, Batch(x[s.index], z[s.index]), players=s.players,
                                                     penalties=s.penalties, engine="autograd"))  # fmt: skip
    return flat.params.clone()


def _population(engine_name, coupling, penalty, rank, world):
    """The three members as one population, each member's half of its own batches on this rank."""
    from odegan_kernels.game import PopulationAutograd, PopulationMLP

    pairs = [_pop_pair(k) for k in range(len(POP_HS))]
    flat = FlatParams(D=[d for d, _ in pairs], G=[g for _, g in pairs], members=len(pairs), dtype=torch.float64)
    st = ODEStepper(flat, "rk4", h=POP_HS, reg=POP_REGS, reg_at=penalty, coupling=coupling, backend="foreach",
                    distributed=world > 1)  # fmt: skip
    engine = (PopulationAutograd if engine_name == "autograd" else PopulationMLP)(flat, *pairs[0])
    data = [_member_data(k, POP_STEPS) for k in range(len(pairs))]
    for step in zip(*data):
        x = torch.stack([_half(x, rank, world) for x, _ in step], dim=1)  # [stages, K, batch, ...]
        z = torch.stack([_half(z, rank, world) for _, z in step], dim=1)
        st.step(lambda s, x=x, z=z: engine(Batch(x[s.index], z[s.index]), s.players, s.penalties))
    return [flat.params[k * flat.block : (k + 1) * flat.block].clone() for k in range(len(pairs))]


def _population_worker(rank, world, port, coupling, penalty, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        out[rank] = {
            "solo": [_solo_member(k, coupling, penalty, rank, world) for k in range(len(POP_HS))],
            **{e: _population(e, coupling, penalty, rank, world) for e in ("autograd", "mlp")},
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("coupling,penalty", [("joint", "first_stage"), ("decoupled", "after_step")])
def test_a_population_on_two_ranks_gives_each_member_its_solo_two_rank_run(coupling, penalty):
    """Three members (mixed h and lambda) on two ranks, each rank with its half of every member's batch: each
    member equals its own solo two-rank run (float64, the population's 1e-12 relative), both engines, and the
    ranks agree exactly; the member without the regulariser equals one process on its whole batches."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_population_worker, args=(2, _free_port(), coupling, penalty, out), nprocs=2, join=True,
                           start_method="spawn")  # fmt: skip
        r0, r1 = out[0], out[1]
    whole = [_solo_member(k, coupling, penalty, 0, 1) for k in range(len(POP_HS))]
    for k, ref in enumerate(r0["solo"]):
        assert torch.isfinite(ref).all() and torch.equal(ref, r1["solo"][k])
        for engine in ("autograd", "mlp"):
            got = r0[engine][k]
            assert torch.equal(got, r1[engine][k]), (engine, k)
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            assert rel <= TOL, f"{engine} member {k} differs from its solo 2-rank run by {rel:.3g} relative"
    assert not torch.equal(r0["solo"][0], r0["solo"][1])
    # lambda 0 (member 1): the ranks' averaged half-batch gradients are the whole batch's, so the ranks averaged
    rel = ((r0["solo"][1] - whole[1]).abs().max() / whole[1].abs().max()).item()
    assert POP_REGS[1] == 0 and rel <= 1e-10, rel


POP_BASE = dict(problem="mog", dtype="float64", batch=16, z_dim=4, hidden=6, backend="foreach", method="rk4")
POP_MEMBERS = [dict(seed=0, h=0.1, reg=0.07), dict(seed=1, h=0.05, reg=0.0), dict(seed=2, h=0.2, reg=0.3)]
POP_SETTINGS = [dict(coupling="joint", reg_at="first_stage"), dict(coupling="decoupled", reg_at="after_step")]


def _trainer_population_worker(rank, world, port, out):
    """Each rank: every member's solo run built as a Trainer under torchrun builds it (this rank's problem and
    streams, the optimiser averaging over the ranks), then train.population.Population(cfgs, rank, world)."""
    from odegan_kernels.problems import build_problem
    from odegan_kernels.train.baselines import build_optimizer
    from odegan_kernels.train.closure import GameClosure
    from odegan_kernels.train.config import Config
    from odegan_kernels.train.population import Population
    from odegan_kernels.train.state import RandomStreams

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        res = []
        for setting in POP_SETTINGS:
            solos = []
            for m in POP_MEMBERS:
                cfg = Config(**POP_BASE, **setting, **m)
                cfg.validate()
                problem = build_problem(cfg.problem, cfg, rank, world)
                flat = FlatParams(D=problem.D, G=problem.G, dtype=cfg.torch_dtype)
                opt, _ = build_optimizer(cfg, flat, distributed=True)
                streams = RandomStreams(cfg.seed, rank, cfg.device)
                closure = GameClosure(cfg, problem, streams.data, streams.z)
                for _ in range(POP_STEPS):
                    opt.step(closure)
                solos.append(flat.params.clone())
            pop = Population([Config(**POP_BASE, **setting, **m) for m in POP_MEMBERS], rank, world)
            for _ in range(POP_STEPS):
                pop.step()
            res.append((solos, [pop.member_params(k).clone() for k in range(len(POP_MEMBERS))]))
        out[rank] = res
    finally:
        dist.destroy_process_group()


def test_the_trainers_population_on_two_ranks_gives_each_member_its_solo_two_rank_run():
    """train.population.Population(cfgs, rank, world): each member equals its solo run as a Trainer under torchrun
    builds it (every rank its own streams, gradients averaged), float64, 1e-12 relative; the ranks agree exactly."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_trainer_population_worker, args=(2, _free_port(), out), nprocs=2, join=True,
                           start_method="spawn")  # fmt: skip
        r0, r1 = out[0], out[1]
    for (solos, members), (solos1, members1), setting in zip(r0, r1, POP_SETTINGS):
        for k, (ref, got) in enumerate(zip(solos, members)):
            assert torch.isfinite(ref).all() and torch.equal(ref, solos1[k]) and torch.equal(got, members1[k])
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            assert rel <= TOL, f"{setting} member {k} differs from its solo 2-rank run by {rel:.3g} relative"
        assert not torch.equal(members[0], members[2])


def test_distributed_needs_an_initialised_group():
    D, G = mog_pair()
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        ODEStepper(FlatParams(D=D, G=G), distributed=True)


# -- the trainer under torchrun ------------------------------------------------------------------------
RUN = dict(eval_every=4, log_every=2, plot_every=10**9, ckpt_every=4, eval_samples=64, progress=False)


def _trainer_worker(rank, world, port, root, out):
    """What torchrun gives each process: its environment. The trainer initialises the group itself."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    from odegan_kernels.train import Trainer, make_config

    try:
        res = {}
        res["straight"] = Trainer(make_config("mog", steps=8, out=f"{root}/a", **RUN))
        res["straight"].run()
        Trainer(make_config("mog", steps=4, out=f"{root}/b", **RUN)).run()
        res["resumed"] = Trainer(make_config("mog", steps=8, out=f"{root}/b", **RUN))
        res["resumed"].run()
        res["adam"] = Trainer(make_config("mog-adam", steps=4, out=f"{root}/adam", **RUN))
        res["adam"].run()
        out[rank] = {k: t.flat.params.clone() for k, t in res.items()}
        out[f"world{rank}"] = (res["straight"].rank, res["straight"].world)
    finally:
        dist.destroy_process_group()


def test_trainer_under_torchrun(tmp_path):
    """Two ranks: identical parameters on both, exact resume (each rank's streams are in the checkpoint),
    one writer of the run folder, the Adam baseline averaged too; a resume with another world size is
    refused with a clear message."""
    import importlib.util
    import json

    from odegan_kernels.train import Trainer, make_config

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _trainer_worker, args=(2, _free_port(), str(tmp_path), out), nprocs=2, join=True, start_method="spawn"
        )
        r0, r1 = out[0], out[1]
        assert (out["world0"], out["world1"]) == ((0, 2), (1, 2))
    for key in ("straight", "resumed", "adam"):
        assert torch.equal(r0[key], r1[key]), key
    assert torch.equal(r0["straight"], r0["resumed"])
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "loss_d" in r]
    assert logged == [2, 4, 6, 8]  # rank 0 alone writes
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        ".lock",
        "checkpoint.prev.pt",
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
        "metrics.png",
        "samples_0000008.png",
        "summary.json",
        *(["tensorboard"] if importlib.util.find_spec("tensorboard") else []),
    ]
    # the two ranks drew different data: a single process from the same seed ends elsewhere
    single = Trainer(make_config("mog", steps=8, out=str(tmp_path / "single"), **RUN))
    single.run()
    assert not torch.equal(single.flat.params, r0["straight"])
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\) but this run has 1"):
        Trainer(make_config("mog", steps=12, out=str(tmp_path / "b"), **RUN)).run()


def test_image_ranks_read_disjoint_shares(tmp_path):
    pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")
    from odegan_kernels.data import image_loader

    from .test_trainer import write_imagefolder

    write_imagefolder(tmp_path, classes=2, per_class=8)
    loaders = [image_loader(str(tmp_path), "imagefolder", 4, seed=1, workers=0, rank=r, world=2) for r in (0, 1)]
    for epoch in (0, 1):
        shares = []
        for ld in loaders:
            ld.sampler.set_epoch(epoch)
            shares.append(list(ld.sampler))
        assert len(shares[0]) == len(shares[1]) == 8 and not set(shares[0]) & set(shares[1])
    with pytest.raises(ValueError, match="fewer than one batch of 4 for each of 8 ranks"):
        image_loader(str(tmp_path), "imagefolder", 4, workers=0, rank=0, world=8)
