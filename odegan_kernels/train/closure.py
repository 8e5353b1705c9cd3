"""The trainer's closure: the data each stage needs (fresh or shared, eager or from graph-mode slots), as a Batch
for the gradient engine chosen once for the run (game.choose_engine: autograd, or hand-derived for ReLU MLP pairs)."""

from __future__ import annotations

import warnings

import torch

from ..contract import PENALTIES, Stage, StageResult
from ..game import Batch, MLPPair, choose_engine
from ..game.population import PopulationMLP
from ..graphs import StaticBatches


def run_engine(cfg, problem):
    """The run's gradient engine (game.choose_engine with the run's options); ``grads='mlp'`` that cannot run is a
    ValueError naming the reason."""
    pens = [k for k in PENALTIES if k != "g_reg" and getattr(cfg, k)] + (["g_reg"] if cfg.reg > 0 else [])
    engine, why = choose_engine(
        problem.D,
        problem.G,
        "autograd" if cfg.grads == "autograd" else "auto",
        loss=cfg.loss,
        reg_method=cfg.reg_method,
        penalties=pens,
        autocast=cfg.autocast,
        conditional=bool(problem.num_classes),
        capture=cfg.cuda_graph,
    )
    if cfg.grads == "mlp" and why is not None:
        raise ValueError(f"grads='mlp' cannot run here: {why}")
    if getattr(cfg, "compile", False) and not traces_whole_step(cfg, engine):
        from ..game.compiled import compile_engine

        engine, why = compile_engine(engine, pens)
        if why is not None:
            warnings.warn(why, stacklevel=2)
    return engine


def traces_whole_step(cfg, engine) -> bool:
    """Whether ``compile=true`` traces the run's whole step as one graph (ODEStepper(compile="step")): the ODE
    stepper with the hand-derived engine (a pair's, or a population's batched one), eagerly, its data drawn before
    each step (Predrawn)."""
    hand_derived = isinstance(engine, (MLPPair, PopulationMLP))
    return bool(cfg.compile) and cfg.optimizer == "ode" and not cfg.cuda_graph and hand_derived


class Predrawn:
    """The traced step's batches (compile=true): drawn before the step in the order the eager step draws them
    (``fill``), read in that order inside the trace (``next``), and checked after it (``check``): a step that read
    fewer would leave the streams where the eager step never does. GameClosure's and PopulationClosure's."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.cursor = 0

    def fill(self, draw, n: int) -> None:
        self.batches = [draw() for _ in range(n)]
        self.cursor = 0

    def next(self) -> Batch:
        self.cursor += 1  # (the trace indexes the list: too few batches fail it, too many check names)
        return self.batches[self.cursor - 1]

    def check(self) -> None:
        if self.cursor != len(self.batches):
            raise RuntimeError(
                f"the traced step (compile=true) read {self.cursor} of the {len(self.batches)} batches drawn before "
                "it: predraw must draw optimizer.draws_per_step(data_per_stage) batches"
            )


def noise_std(cfg, step: int) -> float:
    """The instance noise's std at ``step`` (steps taken before it): cfg.instance_noise, constant, or annealed
    linearly to 0 over cfg.instance_noise_anneal steps."""
    sigma, span = cfg.instance_noise, cfg.instance_noise_anneal
    return sigma * max(0.0, 1.0 - step / span) if span > 0 else sigma


class GameClosure:
    """``closure(stage)`` for the optimisers: draws what the stage needs and fills the players' gradients.

    ``data_per_stage="fresh"`` draws a real batch and z at every stage (the CIFAR-10 reference), "shared"
    once per step (the colab). In graph mode (``static`` set) the real batches come from static slots that
    ``fill_static`` refills before each replay, and z (and the labels to generate) are drawn inside the graph
    from the device's default generator, which CUDA graphs advance on every replay. ``batch`` is the current
    stage's Batch (with, when asked for, WGAN-GP's interpolation weights and the instance noise, drawn with z from
    the same generator: the default one in graph mode), so runs reproduce. Annealed instance noise in graph mode
    reads its std from a device tensor that ``fill_static(step)`` refreshes.
    """

    def __init__(self, cfg, problem, data_gen: torch.Generator, z_gen: torch.Generator, static=None) -> None:
        self.cfg, self.problem = cfg, problem
        self.data_gen, self.z_gen = data_gen, z_gen
        self.static: StaticBatches | None = static
        self.engine = run_engine(cfg, problem)
        self.batch: Batch | None = None
        self.fake0: torch.Tensor | None = None  # the samples G drew at stage 0 of this step
        # compile=true's traced step: the step's batches drawn before it (predraw), read in order inside the trace
        self.traced = static is None and traces_whole_step(cfg, self.engine)
        self.pre = Predrawn()
        graphed = static is not None or self.traced
        # (in the parameters' dtype: a float32 std would round a float64 run's noise as eager never does)
        self.sigma = torch.full((), self.noise_std(0), device=cfg.device, dtype=cfg.torch_dtype) if graphed else None

    def noise_std(self, step: int) -> float:
        """The instance noise's std at ``step``: constant, or annealed linearly to 0 over instance_noise_anneal."""
        return noise_std(self.cfg, step)

    def fill_static(self, step: int | None = None) -> None:
        self.static.fill(lambda: self.problem.draw(self.cfg.batch, self.data_gen))
        if step is not None:
            self.sigma.fill_(self.noise_std(step))
        elif self.cfg.instance_noise_anneal > 0 and self.cfg.instance_noise > 0:
            raise ValueError("annealed instance noise under cuda_graph needs fill_static(step) before every step")

    def prepare_trace(self) -> None:
        """Before the first traced step: the engine's gradient views made and the fused ops' backend resolved (and
        csrc loaded), eagerly, so the trace finds them."""
        from ..game.compiled import prepare_trace

        prepare_trace(self.engine, self.cfg.torch_dtype, self.cfg.device)

    def predraw(self, step: int, n: int) -> None:
        """Draw the next step's ``n`` batches (ODEStepper.draws_per_step) now, in the order the eager step draws
        them, for the traced step to read; set the instance noise's std for ``step``."""
        self.pre.fill(lambda: self._draw_now(0), n)
        self.sigma.fill_(self.noise_std(step))

    def check_predrawn(self) -> None:
        """After a traced step: it read every batch drawn for it, no more."""
        self.pre.check()

    def _draw(self, stage_index: int) -> Batch:
        return self.pre.next() if self.traced else self._draw_now(stage_index)

    def _draw_now(self, stage_index: int) -> Batch:
        cfg, k = self.cfg, self.problem.num_classes
        z_dim, dev, dt = self.problem.z_dim, cfg.device, cfg.torch_dtype
        y_fake = None
        if self.static is not None:
            x, y_real = self.static.slot(stage_index if cfg.data_per_stage == "fresh" else 0)
            z = torch.randn(cfg.batch, z_dim, device=dev, dtype=dt)
            if k:
                y_fake = torch.randint(k, (cfg.batch,), device=dev)
        else:
            x, y_real = self.problem.draw(cfg.batch, self.data_gen)
            x = x.to(dev)
            z = torch.randn(cfg.batch, z_dim, generator=self.z_gen, device=dev, dtype=dt)
            if k:
                y_real = y_real.to(dev)
                y_fake = torch.randint(k, (cfg.batch,), generator=self.z_gen, device=dev)
        gen = None if self.static is not None else self.z_gen
        mix = torch.rand(cfg.batch, generator=gen, device=dev, dtype=dt) if cfg.wgan_gp else None
        noise = None
        if cfg.instance_noise:
            noise = tuple(torch.randn(x.shape, generator=gen, device=dev, dtype=x.dtype) for _ in range(2))
        return Batch(x, z, y_real, y_fake, mix, noise)

    def __call__(self, stage: Stage) -> StageResult:
        cfg = self.cfg
        if stage.index == 0 or cfg.data_per_stage == "fresh":
            self.batch, self.fake0 = self._draw(stage.index), None
        b = self.batch
        # Decoupled D-only stages see G frozen at the step's start: with shared data, the samples G drew
        # at stage 0 are exactly the ones it would draw again, so reuse them.
        reuse = stage.players == (0,) and cfg.data_per_stage == "shared" and "consensus" not in stage.penalties
        noise = b.noise
        if noise is not None:  # the std: a float eagerly, a device tensor refreshed outside the graph in graph mode
            sigma = self.noise_std(stage.step) if self.sigma is None else self.sigma
            noise = (noise[0] * sigma, noise[1] * sigma)
        batch = Batch(b.real, b.z, b.y_real, b.y_fake, b.mix, noise, self.fake0 if reuse else None)
        out = self.engine(batch, stage.players, stage.penalties, losses=stage.index == 0)  # only stage 0's are logged
        if stage.index == 0:
            self.fake0 = out.fake
        out.fake = None
        return out
