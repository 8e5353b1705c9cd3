"""The Trainer: builds a run from its Config and runs (or resumes) it: steps, logs, evaluations, checkpoints.

A run folder holds config.json (the resolved options), metrics.jsonl, sample plots and checkpoint.pt,
which is written atomically and resumed from automatically.

The run's state is its parts' state: the players, the optimiser and its scheduler, the average of G, and a
RunState (train/state.py: the booked step, what is still due, the interval's sums, the random streams, the data
position). Recovery and the checkpoint get it through ``local_state_dict`` / ``load_local_state_dict``.

Under torchrun (WORLD_SIZE > 1) the run is data parallel: each rank draws its own batches (``batch`` per
rank and stage), the flat gradients are averaged once per stage, rank 0 alone writes the run folder, and
the checkpoint holds every rank's random streams so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ..distributed import all_gather_objects, init_distributed
from ..files import write_file
from ..flat import FlatParams
from ..graphs import StaticBatches
from ..ode import get_tableau
from ..problems import build_problem
from .baselines import build_optimizer
from .checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    CheckpointError,
    RunLock,
    atomic_save,
    load_latest,
    remove_stale_temporaries,
    set_aside,
)
from .closure import GameClosure
from .config import Config, describe, resolve_device, unread_options, written_options
from .ema import GeneratorAverage
from .interrupts import StopRequests, TrainingInterrupted, critical
from .legacy import FORMAT, RENAMED_COLUMNS, migrate_checkpoint, migrate_options
from .logging import Console, MetricsLog, TensorBoardLog, write_summary
from .recovery import NonFiniteError, Recovery, scale_step_size
from .state import RandomStreams, RunState


class Trainer:
    """Builds the problem, the flat parameters, the optimiser and the closure from a Config; ``run()`` trains."""

    def __init__(self, cfg: Config) -> None:
        cfg.validate()
        self.rank, self.world, cfg.device = init_distributed(resolve_device(cfg.device))
        if cfg.compile and self.world > 1:
            raise ValueError("compile=true under torchrun (data parallel) is not supported yet: run without it")
        self.is_main = self.rank == 0
        self.cfg = cfg
        if cfg.threads > 0 and cfg.device == "cpu":
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.problem = build_problem(cfg.problem, cfg, self.rank, self.world)
        self.D, self.G = self.problem.D, self.problem.G
        self.flat = FlatParams(D=self.D, G=self.G, dtype=cfg.torch_dtype)
        if self.world > 1:  # every rank starts from rank 0's parameters
            torch.distributed.broadcast(self.flat.params, 0)
        dev = torch.device(cfg.device)
        self.state = RunState(RandomStreams(cfg.seed, self.rank, dev), self.problem)
        eval_gen = torch.Generator(device=dev).manual_seed(10_000 + cfg.seed)
        z_shape = (cfg.eval_samples, self.problem.z_dim)
        self.fixed_z = torch.randn(z_shape, generator=eval_gen, device=dev, dtype=cfg.torch_dtype)
        k = self.problem.num_classes
        self.fixed_y = torch.arange(cfg.eval_samples, device=dev) % k if k else None  # every class in turn
        static = None
        if cfg.cuda_graph:
            slots = len(get_tableau(cfg.method).b) if cfg.data_per_stage == "fresh" else 1
            shape = self.problem.sample_shape
            static = StaticBatches(slots, cfg.batch, shape, labels=bool(k), device=dev, dtype=cfg.torch_dtype)
        streams = self.state.streams
        self.game_closure = GameClosure(cfg, self.problem, streams.data, streams.z, static)
        self.closure = self.game_closure  # what the optimiser calls (wrap it to observe or inject)
        traced = self.game_closure.traced  # compile=true with the hand-derived engine: the whole step is traced
        self.opt, self.scheduler = build_optimizer(cfg, self.flat, distributed=self.world > 1, traced=traced)
        if traced:  # what the trace must find built, built now: every step is traced, the first included, so a
            self.game_closure.prepare_trace()  # resumed run's steps round as the uninterrupted run's did
            self.opt.compiled_step.warmed = True
        self.ema = GeneratorAverage(self.flat, cfg.ema, cfg.ema_start, cfg.backend)  # off when cfg.ema == 0
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.is_main)
        self._stop = StopRequests()  # run() installs the signal handlers
        self._last_ckpt = time.monotonic()  # when the last checkpoint was written (the clock of ckpt_minutes)
        self.recovery = Recovery(
            self.local_state_dict,
            self.load_local_state_dict,
            lambda factor: scale_step_size(self.opt, self.scheduler, factor),
            self.out / CHECKPOINT,
            cfg.recover_factor,
            cfg.recover_retries,
        )

    @property
    def step(self) -> int:
        """The steps this run has booked (RunState.step)."""
        return self.state.step

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimiser step; returns its statistics (0-dim tensors on the device: losses, penalties)."""
        if self.game_closure.static is not None:
            self.game_closure.fill_static(self.step)  # the step also sets annealed instance noise's std
        elif self.game_closure.traced:  # the traced step reads its data drawn here, in the eager step's order
            self.game_closure.predraw(self.step, self.opt.draws_per_step(self.cfg.data_per_stage))
        self.opt.step(self.closure)  # an interrupt inside is rolled back by the stepper
        if self.game_closure.traced:
            self.game_closure.check_predrawn()
        return self._book()

    def _book(self) -> dict[str, torch.Tensor]:
        """The optimiser's finished step booked, whole or not at all (an interrupt waits for it): the schedule, the
        average of G, the step (the optimiser's count), the interval's sums and what is due after the step."""
        with critical():
            if self.scheduler is not None:
                self.scheduler.step()
            self.ema.update(self.opt.steps)
            self.state.step = self.opt.steps
            stats = self.opt.last_result.scalars()
            self.state.means.add(stats)
            self.state.pending = self._due()
        return stats

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def samples(self) -> torch.Tensor:
        """Samples from the fixed latents (and labels), with BN running statistics; with ema on, from G's weight
        average (its BN statistics stay the trained ones: GeneratorAverage)."""
        with self.ema.evaluating(self.G):
            if self.fixed_y is None:
                return torch.cat([self.G(z) for z in self.fixed_z.split(1024)])
            return torch.cat([self.G(z, y) for z, y in zip(self.fixed_z.split(1024), self.fixed_y.split(1024))])

    def evaluate(self) -> dict:
        with self.ema.swapped_in():  # FID draws from G itself: the average there too
            return {"step": self.step, **self.problem.evaluate(self.samples())}

    # -- the run's state ---------------------------------------------------------------------------------
    def local_state_dict(self) -> dict:
        """This process's state: everything a resumed run needs but the other ranks' random streams."""
        return {
            "format": FORMAT,
            "run": self.state.state_dict(),
            "D": self.D.state_dict(),
            "G": self.G.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "config": dataclasses.asdict(self.cfg),
        }

    def load_local_state_dict(self, state: dict) -> None:
        self.D.load_state_dict(state["D"])
        self.G.load_state_dict(state["G"])
        self.flat.check_modules(self.D, self.G)
        self.ema.load_state_dict(state.get("ema"))
        self.opt.load_state_dict(state["opt"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.state.load_state_dict(state["run"], device=self.flat.device)

    def state_dict(self) -> dict:
        """Everything a resumed run needs; collective under torchrun (every rank's random streams)."""
        state = self.local_state_dict()
        state["run"]["rng"] = all_gather_objects(state["run"]["rng"], self.world)  # one entry per rank
        state["recovery"] = self.recovery.state_dict()  # not in the local state: a rollback keeps its own count
        return state

    def load_state_dict(self, state: dict, allow_change: bool = False) -> dict:
        """Resume from ``state`` (a checkpoint of 0.1, 0.2 or 0.3: train.migrate_checkpoint); returns the options that
        differ from the checkpoint's (only those declared changeable on resume, and only with ``allow_change``: the
        others must match)."""
        state = migrate_checkpoint(state)
        changes = resume_changes(migrate_options(state.get("config", {})), self.cfg, allow_change)
        rng = state["run"]["rng"]
        rng = rng if isinstance(rng, list) else [rng]
        if len(rng) != self.world:
            raise ValueError(
                f"checkpoint was written by {len(rng)} rank(s) but this run has {self.world}: each rank's "
                "data and noise streams continue from it, so resume with the same number of processes"
            )
        self.load_local_state_dict({**state, "run": {**state["run"], "rng": rng[self.rank]}})
        self.recovery.load_state_dict(state.get("recovery"))
        if changes:
            apply_changes(self.cfg, self.opt, self.scheduler, changes)
        return changes

    def save_checkpoint(self) -> Path:
        """Write checkpoint.pt atomically, keeping the previous one as checkpoint.prev.pt; never over a good
        checkpoint with non-finite parameters. Under torchrun every rank calls this and rank 0 writes."""
        path = self.out / CHECKPOINT
        if not bool(torch.isfinite(self.flat.params).all()):  # the same on every rank: params are shared
            raise NonFiniteError(
                f"non-finite parameters at step {self.step}; kept the last good checkpoint {path}. "
                "Lower the step size h or raise reg."
            )
        state = self.state_dict()
        if self.is_main:
            with critical():  # the previous checkpoint's rename and the new one's happen together
                atomic_save(state, path, previous=self.out / PREVIOUS)
        return path

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, resume: bool = True, allow_change: bool = False) -> dict:
        """Train to ``cfg.steps``, resuming from the run folder unless ``resume=False``; returns the summary.

        ``allow_change``: resume although h, h_g, reg or lr differ from the checkpoint's (recorded in
        metrics.jsonl). Ctrl-C or SIGTERM stops at the next step boundary with a checkpoint (a second one stops
        at once, rolling the unfinished step back) and raises TrainingInterrupted; the run resumes exactly.
        """
        lock = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(self.out).acquire()
        try:
            with StopRequests(immediate=self.world > 1) as self._stop:
                return self._run(resume, allow_change)
        finally:
            self.problem.close()  # the loader's workers, before the interpreter's exit could wait on them
            if lock is not None:
                lock.release()

    def _run(self, resume: bool, allow_change: bool) -> dict:
        cfg, main = self.cfg, self.is_main
        if main:
            remove_stale_temporaries(self.out)
        resumed = self._resume(allow_change) if resume else self._start_fresh()
        if main:
            write_file(self.out / "config.json", json.dumps(written_options(cfg), indent=2) + "\n")
        if resumed:
            self.metrics.truncate(self.step, tuple(self.state.pending), rename=RENAMED_COLUMNS, resumed=True)
        else:
            self.metrics.clear()
            if main:
                self.metrics.write(self.evaluate())
        self._last_ckpt, self._result = time.monotonic(), {}
        t0, s0 = time.perf_counter(), self.step
        self._rate = lambda: (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
        self._console = Console(main, cfg.progress, cfg.steps, self.step, f"{cfg.problem} {cfg.optimizer}")
        start = f"resumed at step {self.step}" if resumed else "from step 0"
        self._console.write(f"{cfg.problem}: {describe(cfg)}, {start} to {cfg.steps} in {self.out}")
        self._tb = TensorBoardLog(self.out, main and cfg.tensorboard)
        self.recovery.start(self.step, float(self.flat.params.abs().max()))
        before, in_step = self.state.position(), False
        self._began = self.step
        try:
            self._finish_step()  # what an interrupted run left to do after its last step
            while self.step < cfg.steps:
                before, in_step = self.state.position(), True
                self._began = self.step  # the step this one starts from (_interrupted: did it finish?)
                self.train_step()
                in_step = False
                self._console.update(1)
                self._finish_step()
        except TrainingInterrupted:
            raise  # stopped at a step boundary, checkpoint written
        except KeyboardInterrupt:
            self._interrupted(in_step, before)
        finally:
            self._console.close()
            self._tb.close()
        return self._summary(self._rate())

    def _due(self) -> list[str]:
        cfg, s = self.cfg, self.step
        last = s == cfg.steps
        every = (("log", cfg.log_every), ("eval", cfg.eval_every), ("plot", cfg.plot_every), ("ckpt", cfg.ckpt_every))
        due = [item for item, n in every if s % n == 0 or last]
        # a single process checks the clock at every step (no device work); torchrun ranks agree on it at the
        # log intervals (one all-reduce there), so that they all write the checkpoint together
        if self.world == 1 and "ckpt" not in due and time.monotonic() - self._last_ckpt > 60 * cfg.ckpt_minutes:
            due.append("ckpt")
        return due

    def _finish_step(self) -> None:
        """Do what is due after the last booked step, one item at a time (an interrupted run saves the rest as
        pending, and its resumption does it first); stop here when a stop was requested."""
        run = self.state
        while run.pending:
            self._stop_if_requested()
            item = run.pending[0]  # removed once done: an interrupted item is redone on resume
            if item == "log":
                self._log_interval()
            elif item == "eval" and self.is_main:
                self._result = self.evaluate()
                self.metrics.write(self._result)
                self._tb.scalars(self._result, "eval")
                self._console.evaluation(self._result)
            elif item == "plot" and self.is_main:
                title = f"{self.cfg.problem} {describe(self.cfg)} step {self.step}"
                path = self.out / f"samples_{self.step:07d}.png"
                self.problem.plot(self.samples(), path, title)
                if path.exists():
                    self._tb.picture(path, self.step)
            elif item == "ckpt":
                if not self._finite_or_rolled_back():  # never a checkpoint of a diverged state: recovery first
                    continue
                run.pending.pop(0)  # the checkpoint holds what is left after it
                self.save_checkpoint()
                self._last_ckpt = time.monotonic()
                continue
            if run.pending[:1] == [item] and item != "log":  # (the log item removes itself; a rollback, all)
                run.pending.pop(0)
        self._stop_if_requested()

    def _finite_or_rolled_back(self) -> bool:
        """The divergence check of a log interval without its row, before a checkpoint (one host sync): True when the
        run is finite, False when it rolled back (a ``diverged`` row; what was pending is moot)."""
        rec, (pmax,) = self.state.means.means([self.flat.params.abs().max()], self.world)
        with critical():
            event = self.recovery.check(self.step, rec, pmax / self.world)
            if event is None:
                self.recovery.snapshot(self.step)  # known good: a later rollback comes back here
                return True
            message = event.pop("message")
            self.metrics.truncate(self.step)
            self.metrics.write(event)
            self.state.pending = []
        self._console.write(message)
        return False

    def _log_interval(self) -> None:
        """The interval's means and the divergence check (one host sync, one all-reduce under torchrun): a row in
        metrics.jsonl, or a rollback to the last good state with a smaller step size."""
        late = time.monotonic() - self._last_ckpt > 60 * self.cfg.ckpt_minutes
        params = self.flat.params
        rec, (late_any, pmax) = self.state.means.means(
            [params.new_tensor(float(late and self.is_main)), params.abs().max()], self.world
        )
        with critical():  # a rollback, or a row and the reset of its sums, happens whole
            # the ranks hold the same parameters; NonFiniteError when no rollback is left
            event = self.recovery.check(self.step, rec, pmax / self.world)
            if event is not None:  # rolled back
                message = event.pop("message")
                self.metrics.truncate(self.step)
                self.metrics.write(event)
                self.state.pending = []  # the good state's step had done its own
            else:
                row = {"step": self.step, **rec, "steps_per_s": self._rate()}
                self.metrics.write(row)
                self.state.means.reset()
                self.state.pending.remove("log")
        if event is not None:
            self._console.write(message)
            return
        self._console.interval(self.step, rec, row["steps_per_s"])
        self._tb.scalars(row, "train")
        warning = self.recovery.growth(self.step, pmax / self.world)
        if warning is not None:
            self._console.write(warning.pop("message"))
            self.metrics.write(warning)
        if late_any > 0 and "ckpt" not in self.state.pending:
            self.state.pending.append("ckpt")
        self.recovery.snapshot(self.step)

    def _summary(self, rate: float) -> dict:
        if not self.is_main:
            return {"step": self.step, "rank": self.rank, "steps_per_s": rate}
        # resumed at or past cfg.steps: still report where the run stands, at the run's own speed
        result, rate = (self._result, rate) if self._result else (self.evaluate(), None)
        return write_summary(self.out, result, rate, describe(self.cfg))

    # -- stopping and resuming ---------------------------------------------------------------------------
    def _interrupted(self, in_step: bool, before: tuple[dict, dict]) -> None:
        """An interrupt that stopped the run at once: make the state whole, checkpoint it (a single process), and
        raise TrainingInterrupted."""
        if in_step and self.opt.steps == self._began:  # the optimiser did not finish the step (undone, or
            self.state.set_position(before)  # stopped before it began, its batches drawn ahead): replay its draws
        elif self.opt.steps > self.step:  # the optimiser's step finished, its booking had not begun
            self._book()
        if self.world > 1:  # the ranks stop at different points: a collective save could hang
            raise TrainingInterrupted(
                f"rank {self.rank} interrupted at step {self.step}; the last checkpoint stands"
            ) from None
        self._finite_or_rolled_back()  # a diverged state is rolled back to the last good one, which is saved
        path = self.save_checkpoint()
        raise TrainingInterrupted(
            f"interrupted at step {self.step}; saved {path}; rerun the same command to resume"
        ) from None

    def _stop_if_requested(self) -> None:
        """At a step boundary: when a signal asked to stop, checkpoint and raise TrainingInterrupted."""
        if self._stop.requested is not None:
            self._finite_or_rolled_back()  # a diverged state is rolled back to the last good one, which is saved
            path = self.save_checkpoint()
            raise TrainingInterrupted(
                f"{self._stop.requested} at step {self.step}; saved {path}; rerun the same command to resume"
            )

    def _resume(self, allow_change: bool = False) -> bool:
        """Resume from the run folder's newest usable checkpoint; False when there is none (a fresh run)."""
        found = load_latest(self.out, self.cfg.device)
        if found is None:  # nothing to resume; an earlier run's files (one that ended before its first checkpoint)
            moved = set_aside(self.out) if self.is_main else None  # are kept, never overwritten
            if moved is not None:
                self._say(f"{self.out} has no checkpoint to resume from: the earlier run's files moved to {moved}")
            return False
        state, path = found
        try:
            state = migrate_checkpoint(state)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}; delete or move it") from None
        try:
            changes = self.load_state_dict(state, allow_change)
        except (KeyError, RuntimeError, TypeError) as exc:  # the file's parts do not fit this run's (a config mismatch)
            raise CheckpointError(f"{path} does not fit this run: {_first_line(exc)}") from None
        if changes and self.is_main:
            self.metrics.write({"step": self.step, "event": "resumed_with_changes", "changes": changes})
        steps, at = self.cfg.steps, f"{self.out} is at step {self.step} of {self.cfg.steps}"
        if self.step >= steps:
            self._say(f"{at}: nothing left to do (--steps N continues it, --fresh starts over)")
        else:
            self._say(f"resuming: {at}" + (f", with the changes {changes}" if changes else ""))
        return True

    def _start_fresh(self) -> bool:
        """A run that ignores the folder's checkpoint: an earlier run's files are set aside first. False."""
        moved = set_aside(self.out) if self.is_main else None
        if moved is not None:
            self._say(f"fresh run: the earlier run's files in {self.out} moved to {moved}")
        return False

    def _say(self, line: str) -> None:
        if self.is_main:
            print(line, file=sys.stderr, flush=True)


def resume_changes(saved: dict, cfg: Config, allow_change: bool) -> dict:
    """The options of ``cfg`` that differ from the checkpoint's ``saved`` ones: {name: [old, new]}, only those declared
    changeable on resume and only with ``allow_change``; any other difference is a ValueError naming it. Options
    this optimiser never reads are not compared (an Adam run's config.json has no h)."""
    changes = {}
    unread = unread_options(cfg.optimizer) if saved.get("optimizer", cfg.optimizer) == cfg.optimizer else ()
    for key in Config.resume_keys():
        if key in unread:
            continue
        old, new = _norm(saved.get(key)), _norm(getattr(cfg, key))
        if key in saved and old != new:
            if not (allow_change and key in Config.changeable_keys()):
                how = " or pass --allow-change" if key in Config.changeable_keys() else ""
                raise ValueError(
                    f"checkpoint was trained with {key}={saved[key]!r} but this run asks for "
                    f"{key}={getattr(cfg, key)!r}; use another --out or match the option{how}"
                )
            changes[key] = [old, new]
    if "reg" in changes and (changes["reg"][0] > 0) != (changes["reg"][1] > 0) and cfg.optimizer == "ode":
        raise ValueError(
            f"reg {changes['reg'][0]} -> {changes['reg'][1]} turns ODE-GAN's regulariser "
            f"{'on' if changes['reg'][1] > 0 else 'off'}, which changes what every step computes; "
            "--allow-change takes a new weight, not this: start a new run (another --out)"
        )
    return changes


def apply_changes(cfg: Config, opt, scheduler, changes: dict) -> None:
    """A resumed run's new h, h_g, reg or lr, in force from the next step."""
    if "reg" in changes:
        opt.reg = cfg.reg
    if "h" in changes or "h_g" in changes or "lr" in changes:
        base = ([cfg.h] * 2 if cfg.h_g is None else [cfg.h, cfg.h_g]) if cfg.optimizer == "ode" else [cfg.lr] * 2
        if scheduler is not None:
            scheduler.base_lrs = list(base)
            base = [b * scheduler.lr_lambdas[0](scheduler.last_epoch) for b in base]
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr


def _first_line(exc: BaseException) -> str:
    """An exception's first informative line (torch's state-dict mismatch is several: the first mismatch)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    mismatch = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    text = (mismatch or lines or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text[:300]}"


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
