"""The Trainer: builds a run from its Config and runs (or resumes) it: steps, logs, evaluations, checkpoints.

A run folder holds config.json (the resolved options), metrics.jsonl, sample plots and checkpoint.pt,
which is written atomically and resumed from automatically.

Under torchrun (WORLD_SIZE > 1) the run is data parallel: each rank draws its own batches (``batch`` per
rank and stage), the flat gradients are averaged once per stage, rank 0 alone writes the run folder, and
the checkpoint holds every rank's random streams so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..distributed import init_distributed
from ..flat import FlatParams
from ..graphs import StaticBatches
from ..problems import build_problem
from .baselines import build_optimizer
from .checkpoint import RunLock, remove_stale_temporaries
from .closure import GameClosure, RandomStreams
from .config import Config, resolve_device
from .ema import GeneratorAverage
from .interrupts import StopRequests, TrainingInterrupted, critical
from .logging import Console, IntervalMeans, MetricsLog, TensorBoardLog, write_summary
from .recovery import Recovery
from .state import TrainerState


class Trainer(TrainerState):
    """Builds the problem, the flat parameters, the optimiser and the closure from a Config; ``run()`` trains."""

    def __init__(self, cfg: Config) -> None:
        cfg.validate()
        self.rank, self.world, cfg.device = init_distributed(resolve_device(cfg.device))
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
        self.streams = RandomStreams(cfg.seed, self.rank, dev)
        eval_gen = torch.Generator(device=dev).manual_seed(10_000 + cfg.seed)
        z_shape = (cfg.eval_samples, self.problem.z_dim)
        self.fixed_z = torch.randn(z_shape, generator=eval_gen, device=dev, dtype=cfg.torch_dtype)
        k = self.problem.num_classes
        self.fixed_y = torch.arange(cfg.eval_samples, device=dev) % k if k else None  # every class in turn
        self.step = 0
        self.opt, self.scheduler = build_optimizer(cfg, self.flat, distributed=self.world > 1)
        self.ema = GeneratorAverage(self.flat, cfg.ema, cfg.ema_start, cfg.backend)  # off when cfg.ema == 0
        static = None
        if cfg.cuda_graph:
            slots = len(self.opt.tableau.b) if cfg.data_per_stage == "fresh" else 1
            shape = self.problem.sample_shape
            static = StaticBatches(slots, cfg.batch, shape, labels=bool(k), device=dev, dtype=cfg.torch_dtype)
        self.game_closure = GameClosure(cfg, self.problem, self.streams.data, self.streams.z, static)
        self.closure = self.game_closure  # what the optimiser calls (wrap it to observe or inject)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.is_main)
        self._stop = StopRequests()  # run() installs the signal handlers
        self.means = IntervalMeans()
        self.pending: list[str] = []  # what is still to do after the last finished step (log, eval, plot, ckpt)
        self.recovery = Recovery(self, cfg.recover_factor, cfg.recover_retries)

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimiser step; returns its statistics (0-dim tensors on the device: losses, penalty)."""
        if self.game_closure.static is not None:
            self.game_closure.fill_static(self.step)  # the step also sets annealed instance noise's std
        self.opt.step(self.closure)  # an interrupt inside is rolled back by the stepper
        return self._after_opt_step()

    def _after_opt_step(self) -> dict[str, torch.Tensor]:
        """The step's bookkeeping, whole or not at all (an interrupt waits for it): the schedule, the average of G,
        the counter, the interval's sums and what is due after the step."""
        with critical():
            if self.scheduler is not None:
                self.scheduler.step()
            self.ema.update(self.step + 1)
            self.step += 1
            stats = self.opt.last_result.scalars()
            self.means.add(stats)
            self.pending = self._due()
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
            if lock is not None:
                lock.release()

    def _run(self, resume: bool, allow_change: bool) -> dict:
        cfg, main = self.cfg, self.is_main
        if main:
            remove_stale_temporaries(self.out)
        resumed = self.maybe_resume(allow_change) is not None if resume else self.start_fresh()
        if main:
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if resumed:
            self.metrics.truncate(self.step, tuple(self.pending))
        else:
            self.metrics.clear()
            if main:
                self.metrics.write(self.evaluate())
        self._last_ckpt, self._result = time.monotonic(), {}
        t0, s0 = time.perf_counter(), self.step
        self._rate = lambda: (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
        desc = f"{cfg.problem} {cfg.optimizer}:{cfg.method}"
        self._console = Console(main, cfg.progress, cfg.steps, self.step, desc)
        self._tb = TensorBoardLog(self.out, main and cfg.tensorboard)
        self.recovery.start()
        rng_before, data_before, in_step = self.streams.state(), self.problem.state_dict(), False
        try:
            self._finish_step()  # what an interrupted run left to do after its last step
            while self.step < cfg.steps:
                rng_before, data_before, in_step = self.streams.state(), self.problem.state_dict(), True
                self.train_step()
                in_step = False
                self._console.update(1)
                self._finish_step()
        except TrainingInterrupted:
            raise  # stopped at a step boundary, checkpoint written
        except KeyboardInterrupt:
            self._interrupted(in_step, rng_before, data_before)
        finally:
            self._console.close()
            self._tb.close()
        return self._summary(self._rate())

    def _due(self) -> list[str]:
        cfg, s = self.cfg, self.step
        last = s == cfg.steps
        every = (("log", cfg.log_every), ("eval", cfg.eval_every), ("plot", cfg.plot_every), ("ckpt", cfg.ckpt_every))
        return [item for item, n in every if s % n == 0 or last]

    def _finish_step(self) -> None:
        """Do what is due after the last finished step, one item at a time (an interrupted run saves the rest as
        pending, and its resumption does it first); stop here when a stop was requested."""
        while self.pending:
            self._stop_if_requested()
            item = self.pending[0]  # removed once done: an interrupted item is redone on resume
            if item == "log":
                self._log_interval()
            elif item == "eval" and self.is_main:
                self._result = self.evaluate()
                self.metrics.write(self._result)
                self._tb.scalars(self._result, "eval")
                self._console.evaluation(self._result)
            elif item == "plot" and self.is_main:
                title = f"{self.cfg.problem} {self.cfg.method} step {self.step}"
                path = self.out / f"samples_{self.step:07d}.png"
                self.problem.plot(self.samples(), path, title)
                if path.exists():
                    self._tb.picture(path, self.step)
            elif item == "ckpt":
                self.pending.pop(0)  # the checkpoint holds what is left after it
                self.save_checkpoint()
                self._last_ckpt = time.monotonic()
                continue
            if self.pending[:1] == [item] and item != "log":  # (the log item removes itself; a rollback, all)
                self.pending.pop(0)
        self._stop_if_requested()

    def _log_interval(self) -> None:
        """The interval's means and the divergence check (one host sync, one all-reduce under torchrun): a row in
        metrics.jsonl, or a rollback to the last good state with a smaller step size."""
        late = time.monotonic() - self._last_ckpt > 60 * self.cfg.ckpt_minutes
        params = self.flat.params
        rec, (late_any, pmax) = self.means.means(
            [params.new_tensor(float(late and self.is_main)), params.abs().max()], self.world
        )
        with critical():  # a rollback, or a row and the reset of its sums, happens whole
            event = self.recovery.check(rec, pmax / self.world)  # the ranks hold the same parameters
            if event is not None:  # rolled back (or NonFiniteError when no retry is left)
                message = event.pop("message")
                self.metrics.truncate(self.step)
                self.metrics.write(event)
                self.pending = []  # the good state's step had done its own
            else:
                row = {"step": self.step, **rec, "steps_per_s": self._rate()}
                self.metrics.write(row)
                self.means.reset()
                self.pending.remove("log")
        if event is not None:
            self._console.write(message)
            return
        self._console.interval(self.step, rec, row["steps_per_s"])
        self._tb.scalars(row, "train")
        warning = self.recovery.growth(pmax / self.world)
        if warning is not None:
            self._console.write(warning.pop("message"))
            self.metrics.write(warning)
        if late_any > 0 and "ckpt" not in self.pending:
            self.pending.append("ckpt")
        self.recovery.snapshot()

    def _summary(self, rate: float) -> dict:
        if not self.is_main:
            return {"step": self.step, "rank": self.rank, "steps_per_s": rate}
        # resumed at or past cfg.steps: still report where the run stands, at the run's own speed
        return write_summary(self.out, self._result or self.evaluate(), rate if self._result else None)
