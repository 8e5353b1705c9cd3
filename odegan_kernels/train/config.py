"""The run's options (Config), the presets, and make_config."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field

import torch

RESUME, CHANGE = "must_match_on_resume", "may_change_on_resume"


def option(default, help: str, match: bool = False, change: bool = False):
    """A Config field with its one-line meaning. ``match``: the option changes the trajectory's mathematics,
    so a resumed run must ask for the checkpoint's value; ``change``: ... unless the user explicitly allows a
    change (--allow-change: a new step size or weight from the resumed step on). Options that change only the
    rounding (device, backend, grads engine, threads, cuda_graph) may differ on resume."""
    return field(default=default, metadata={"help": help, RESUME: match, CHANGE: change})


@dataclass
class Config:
    """Every option of a run. The defaults are the CIFAR-10 reference code's choices; presets set the rest."""

    problem: str = option("mog", "mog | dirac | cifar10 | imagefolder | digits", match=True)
    optimizer: str = option("ode", "ode (Runge-Kutta on the gradient field) | adam | sgd (baselines)", match=True)
    method: str = option("rk4", "Runge-Kutta method: euler | heun | midpoint | ralston | rk3 | rk4", match=True)
    h: float = option(0.04, "step size of D (and of G unless h_g is set)", match=True, change=True)
    h_g: float | None = option(None, "step size of G (None: h)", match=True, change=True)
    reg: float = option(
        0.02, "weight lambda of ODE-GAN's regulariser grad_theta ||dl_G/dphi||^2", match=True, change=True
    )
    reg_at: str = option(
        "first_stage", "where g_reg's gradient goes: first_stage (folded into stage 1) | after_step", match=True
    )
    coupling: str = option(
        "joint", "joint (one RK step of both players) | decoupled (each with the other frozen)", match=True
    )
    data_per_stage: str = option("fresh", "fresh (a batch per RK stage) | shared (one per step)", match=True)
    schedule: str = option(
        "constant", "step-size schedule: constant | cifar (h/4 for 500 steps, h/2 after 400k)", match=True
    )
    loss: str = option("ns", "GAN loss: ns | minimax | hinge | wasserstein | lsgan", match=True)
    r1: float = option(0.0, "weight gamma of R1 = gamma/2 E||grad_x D(x)||^2 on real data (0: off)", match=True)
    r2: float = option(0.0, "weight gamma of R2 = gamma/2 E||grad_x D(x)||^2 on generated data (0: off)", match=True)
    wgan_gp: float = option(0.0, "weight of WGAN-GP, E(||grad D(x^)|| - 1)^2 on interpolates (0: off)", match=True)
    consensus: float = option(0.0, "weight gamma of consensus optimisation, gamma grad 1/2||v||^2 (0: off)", match=True)
    penalty_every: int = option(
        1, "lazy r1/r2/wgan_gp/consensus: every k steps, weighted k x (StyleGAN2: 16)", match=True
    )
    instance_noise: float = option(0.0, "std of Gaussian noise added to D's inputs, real and fake (0: off)", match=True)
    instance_noise_anneal: int = option(
        0, "anneal the instance noise's std linearly to 0 over this many steps (0: constant)", match=True
    )
    reg_method: str = option(
        "double_backward", "how g_reg is computed: double_backward | finite_difference | jvp", match=True
    )
    autocast: bool = option(False, "bf16 forward/backward (parameters, gradients and stage math stay fp32)", match=True)
    grads: str = option("auto", "gradient engine: autograd | mlp (hand-derived, ReLU MLP pairs) | auto")
    lr: float = option(1e-4, "learning rate of the adam / sgd baselines", match=True, change=True)
    betas: tuple[float, float] = option((0.5, 0.999), "Adam's betas", match=True)
    ema: float = option(
        0.0, "decay of an exponential moving average of G's weights, used for samples, plots, FID (0: off)", match=True
    )
    ema_start: int = option(0, "steps before the average begins (until then it copies G's weights)", match=True)
    steps: int = option(30_000, "train until this many steps")
    batch: int = option(512, "batch size per stage (per rank under torchrun)", match=True)
    z_dim: int = option(32, "latent dimension", match=True)
    hidden: int = option(25, "hidden units of the toy MLPs", match=True)
    seed: int = option(0, "seed of the initial parameters and of the data and noise streams", match=True)
    device: str = option("cpu", "cpu | cuda | auto (CUDA when available)")
    backend: str = option("auto", "fused-op backend: auto | triton | csrc | foreach | reference")
    threads: int = option(1, "CPU threads (0: torch's default); the toy's tiny matrices run fastest on one")
    cuda_graph: bool = option(False, "capture the whole ODE step in one CUDA graph (CUDA only)")
    compile: bool = option(
        False,
        "torch.compile the ODE step: with the hand-derived engine the whole step as one graph, else the stage op "
        "(README: the cache)",
    )
    dtype: str = option(
        "float32", "the parameters', gradients' and data's dtype: float32 | float64 (exact checks)", match=True
    )
    data: str | None = option(None, "local dataset path (cifar10: the folder holding cifar-10-batches-py)")
    arch: str = option("dcgan", "image models: dcgan | resnet (32x32) | resnet128 (class-conditional)", match=True)
    image_size: int = option(
        32,
        "image side: dcgan any power of two >= 8 (32: the reference's; digits: 16), resnet 32 only, resnet128 any "
        "power of two >= 32 on an ImageFolder (128 for ImageNet); CIFAR-10 is 32",
        match=True,
    )
    width: int | None = option(
        None, "dcgan / resnet128 base channel count (None: 64, the reference's and SN-GAN's)", match=True
    )
    channels: int = option(3, "image channels: 3 (RGB) or 1 (grayscale; arch dcgan)", match=True)
    workers: int = option(2, "data-loader worker processes")
    fid_real: str | None = option(None, "real images (folder or torch-fidelity input) for FID/IS")
    fid_samples: int = option(10_000, "generated samples per FID/IS evaluation")
    inception_weights: str | None = option(None, "a local copy of torch-fidelity's Inception weights (offline)")
    eval_every: int = option(2_000, "evaluate (mode metrics, FID) every this many steps")
    eval_samples: int = option(5_120, "samples from fixed latents per evaluation")
    log_every: int = option(100, "append interval means to metrics.jsonl every this many steps")
    plot_every: int = option(10_000, "draw samples_<step>.png every this many steps")
    ckpt_every: int = option(5_000, "write checkpoint.pt every this many steps")
    ckpt_minutes: float = option(10.0, "... and at least every this many minutes")
    out: str = option("runs/mog", "run folder")
    progress: bool = option(True, "show a progress bar on a terminal (else, and when piped: a line per log interval)")
    tensorboard: bool = option(True, "also write TensorBoard events to OUT/tensorboard when tensorboard is installed")
    recover_retries: int = option(3, "divergence: roll back to the last good state this many times, then stop")
    recover_factor: float = option(0.5, "divergence: multiply the step size by this at each rollback")
    fid_features: str = option(
        "inception",
        "image metrics' features: inception (FID/IS with fid_real and inception_weights) | classifier (offline: a "
        "small CNN trained on the data's own labels gives fid_classifier, coverage, score)",
    )

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch.dtype."""
        return getattr(torch, self.dtype)

    @classmethod
    def resume_keys(cls) -> tuple[str, ...]:
        """The options a resumed run must share with its checkpoint."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(RESUME))

    @classmethod
    def changeable_keys(cls) -> tuple[str, ...]:
        """The resume options that --allow-change lets a resumed run change."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(CHANGE))

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each option's one-line meaning."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        """Raise ValueError / TypeError naming the first option whose value is not allowed."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        for name, allowed in choices().items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}")
        if not (self.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        for name in POSITIVE:
            v = getattr(self, name)
            if v is not None and not (v > 0 and (name not in FINITE or math.isfinite(v))):
                raise ValueError(f"{name} must be positive{' and finite' if name in FINITE else ''}, got {v!r}")
        for name in NON_NEGATIVE:
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.out.strip():
            raise ValueError(
                "out is empty: give the run folder (a script's unset variable would write into the current folder)"
            )
        if self.seed >= 2**63:
            raise ValueError(f"seed must be < 2**63 (torch's generators take a 64-bit signed seed), got {self.seed}")
        if not 0 < self.recover_factor < 1:
            raise ValueError(f"recover_factor must be in (0, 1), got {self.recover_factor!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1) (the average's decay; 0: off), got {self.ema!r}")
        if float(torch.tensor(self.ema, dtype=self.torch_dtype)) == 1.0:
            raise ValueError(
                f"ema={self.ema!r} rounds to 1.0 in {self.dtype} (the parameters' dtype), so the average would never "
                f"move; use a decay below {1 - torch.finfo(self.torch_dtype).eps / 2}"
            )
        if self.compile and (self.optimizer != "ode" or self.cuda_graph):
            raise ValueError(
                "compile=true compiles the ODE stepper's step without cuda_graph: "
                + ("use optimizer=ode" if self.optimizer != "ode" else "drop cuda_graph (not supported together yet)")
            )
        if self.autocast and self.dtype != "float32":
            raise ValueError("autocast (bf16 forward/backward over float32 parameters) needs dtype float32")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.inception_weights and not self.fid_real:
            raise ValueError(
                "inception_weights is set but fid_real is not: FID/IS compare with real images; set fid_real too, "
                "or drop inception_weights"
            )
        if (self.fid_real or self.inception_weights) and self.problem not in ("cifar10", "imagefolder"):
            raise ValueError(
                f"fid_real and inception_weights are for the image problems; {self.problem!r} has its own metrics"
            )
        if self.fid_features == "classifier" and (self.fid_real or self.inception_weights):
            raise ValueError(
                "fid_features=classifier judges samples with a classifier of the data itself; fid_real and "
                "inception_weights are for the Inception features: drop them, or set fid_features=inception"
            )
        from ..problems import IMAGE_PROBLEMS

        if self.fid_features == "classifier" and self.problem not in IMAGE_PROBLEMS:
            raise ValueError(f"fid_features=classifier is for the image problems; {self.problem!r} has its own metrics")
        if self.fid_features == "classifier" and self.eval_samples < 10:
            raise ValueError(
                f"eval_samples={self.eval_samples} is too few for the classifier metric: its score averages over 10 "
                "splits of the samples; give eval_samples >= 10"
            )
        if self.problem in IMAGE_PROBLEMS:
            from ..problems import check_image_options

            check_image_options(self.problem, self.arch, self.image_size, self.width, self.channels, self.fid_features)


POSITIVE = (
    "h", "h_g", "lr", "steps", "batch", "z_dim", "hidden", "image_size", "width", "channels", "fid_samples",
    "eval_every", "eval_samples", "log_every", "plot_every", "ckpt_every", "ckpt_minutes", "penalty_every",
)  # fmt: skip
NON_NEGATIVE = (
    "reg", "seed", "threads", "workers", "recover_retries", "ema_start", "r1", "r2", "wgan_gp", "consensus",
    "instance_noise", "instance_noise_anneal",
)  # fmt: skip
FINITE = ("h", "h_g", "lr")


def choices() -> dict[str, tuple]:
    """The options with a fixed set of values, and those values."""
    from ..game import ENGINES, LOSSES, METHODS
    from ..ode import COUPLINGS, REG_PLACEMENTS, SCHEDULES, TABLEAUS
    from ..ops import BACKENDS
    from ..problems import ARCHS, FID_FEATURES, PROBLEMS

    return {
        "problem": PROBLEMS,
        "optimizer": ("ode", "adam", "sgd"),
        "method": tuple(TABLEAUS),
        "reg_at": REG_PLACEMENTS,
        "coupling": COUPLINGS,
        "data_per_stage": ("fresh", "shared"),
        "schedule": tuple(SCHEDULES),
        "loss": tuple(LOSSES),
        "reg_method": METHODS,
        "grads": ENGINES,
        "backend": ("auto", *BACKENDS),
        "arch": ARCHS,
        "dtype": ("float32", "float64"),
        "fid_features": FID_FEATURES,
    }


def coerce(name: str, value, hint):
    """``value`` as option ``name``'s type (``hint``), or a TypeError naming the option and what it expects."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(value) if isinstance(value, (int, str)) else _fail()
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value) if isinstance(value, (int, float, str)) else _fail()
        if hint is str:
            return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else _fail()
        if origin is tuple:
            items = list(value) if isinstance(value, (list, tuple)) else _fail()
            if len(items) != len(typing.get_args(hint)):
                raise ValueError
            return tuple(coerce(name, v, t) for v, t in zip(items, typing.get_args(hint)))
    except (ValueError, TypeError, OverflowError):
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        hint = " (too large)" if isinstance(value, (int, str)) and len(str(value)) > 300 else ""
        raise TypeError(f"option {name} expects {want}, got {shown}{hint}") from None
    return value


def _fail():
    raise ValueError


# The paper's colab on the 16-Gaussian mixture (its public notebook, odegan_mog16.ipynb).
MOG_COLAB = dict(problem="mog", h=0.1, reg=0.07, reg_at="after_step", coupling="decoupled", data_per_stage="shared")

# The CIFAR-10 reference code's choices, shared by every 32x32 image preset.
IMAGE_RUN = dict(
    h=0.04,
    reg=0.02,
    reg_at="first_stage",
    coupling="joint",
    data_per_stage="fresh",
    schedule="cifar",
    batch=64,
    z_dim=128,
    steps=1_000_000,
    eval_every=10_000,
    log_every=500,
    plot_every=10_000,
    ckpt_every=10_000,
    ckpt_minutes=5.0,  # and every 5 minutes of wall time, checked at every step: a crash loses minutes, not hours
    device="auto",  # resolved when a run is configured: no GPU query at import
    # One CPU thread (a GPU run never sets it): on the 2-core machines, the small-width image models measured as
    # fast with 1 as with 2 when the machine was idle and 4-10x faster when it was shared (bench/image_cpu.py,
    # docs/RESULTS.md). --set threads=0 takes torch's default (all cores).
    threads=1,
)

PRESETS: dict[str, dict] = {
    # The paper's colab: decoupled players, one batch per step, penalty after the step, h 0.1, lambda 0.07.
    # Seed 3 reaches 16/16 modes in 30k steps; other seeds cover fewer (docs/RESULTS.md): single runs decide
    # nothing on this problem.
    "mog": dict(MOG_COLAB, seed=3),
    # The CIFAR-10 code's choices (joint, fresh data per stage, penalty in stage 1) at the colab's h and lambda.
    "mog-joint": dict(MOG_COLAB, coupling="joint", data_per_stage="fresh", reg_at="first_stage"),
    "mog-adam": dict(MOG_COLAB, optimizer="adam", lr=1e-4, reg=0.0),
    "dirac": dict(
        problem="dirac",
        method="rk4",
        h=0.2,
        reg=1.0,
        batch=1,
        z_dim=1,
        steps=600,
        eval_every=10,  # each evaluation is a point of the trajectory.png picture
        log_every=50,
        plot_every=10**9,
        out="runs/dirac",
    ),
    # The CIFAR-10 reference: joint RK4, a fresh batch per stage, penalty in stage 1, h 0.04, lambda 0.02.
    "cifar10": dict(IMAGE_RUN, problem="cifar10", out="runs/cifar10"),
    "cifar10-resnet": dict(IMAGE_RUN, problem="cifar10", arch="resnet", out="runs/cifar10-resnet"),
    "imagefolder": dict(IMAGE_RUN, problem="imagefolder", out="runs/imagefolder"),
    # Class-conditional ImageNet at 128x128 (SN-GAN's projection ResNet, no spectral norm) with the CIFAR-10
    # code's ODE settings: the authors published no ImageNet code, so these are a starting point, not theirs.
    # Eight loader workers: a GPU step consumes 4 x 64 decoded, resized JPEGs.
    "imagenet128": dict(
        IMAGE_RUN, problem="imagefolder", arch="resnet128", image_size=128, workers=8, out="runs/imagenet128"
    ),
}
# DiracGAN under simultaneous GD (Euler, h 0.1, the minimax loss) with Mescheder et al. 2018's regularisers: the
# study's settings (odegan study dirac, docs/RESULTS.md): R1 and consensus converge, WGAN-GP does not.
for _name, _extra in (("r1", dict(r1=0.3)), ("consensus", dict(consensus=1.0)), ("wgan-gp", dict(wgan_gp=1.0))):
    _loss = "wasserstein" if _name == "wgan-gp" else "minimax"
    PRESETS[f"dirac-{_name}"] = {
        **PRESETS["dirac"], "method": "euler", "h": 0.1, "reg": 0.0, "loss": _loss, "steps": 1000,
        "out": f"runs/dirac-{_name}", **_extra,
    }  # fmt: skip


# scikit-learn's 8x8 digits at 16x16 (2x), a DCGAN-style pair for a 2-core CPU, judged by the classifier metric at
# every evaluation; the CIFAR-10 code's ODE settings (docs/RESULTS.md: digits).
PRESETS["digits"] = dict(
    IMAGE_RUN, problem="digits", image_size=16, channels=1, width=16, batch=32, workers=0, fid_features="classifier",
    steps=3000, eval_every=500, log_every=100, plot_every=500, ckpt_every=1000, eval_samples=1000, out="runs/digits",
)  # fmt: skip


def nearest_options(key: str) -> list[str]:
    """What an unknown option ``key`` most likely meant: today's name of one renamed since 0.2, else the nearest
    option names (difflib, at most 3; none when nothing is near)."""
    from .legacy import RENAMED_OPTIONS

    if key in RENAMED_OPTIONS:
        return [RENAMED_OPTIONS[key]]
    return difflib.get_close_matches(key, sorted(f.name for f in dataclasses.fields(Config)), n=3)


def unknown_options(names) -> str | None:
    """A message naming the options of ``names`` that Config does not have (with today's name of one renamed since
    0.2), or None when every one is known."""
    from .legacy import RENAMED_OPTIONS

    fields = {f.name for f in dataclasses.fields(Config)}
    bad = sorted(set(names) - fields)
    if not bad:
        return None
    renamed = [f"{k} is {RENAMED_OPTIONS[k]} since 0.3" for k in bad if k in RENAMED_OPTIONS]
    near = {k: nearest_options(k) for k in bad if k not in RENAMED_OPTIONS}
    renamed += [f"did you mean {' or '.join(v)} for {k}?" for k, v in near.items() if v]
    return (
        f"unknown option(s) {bad}" + (f" ({'; '.join(renamed)})" if renamed else "") + f"; options are {sorted(fields)}"
    )


def make_config(preset: str = "mog", **overrides) -> Config:
    """The preset's options with ``overrides`` (None values are ignored) on top, validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    why = unknown_options(overrides)
    if why is not None:
        raise ValueError(why)
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = Config(**{**PRESETS[preset], **given})
    cfg.validate()
    check_applies(cfg, given)
    return cfg


ODE_ONLY = ("h", "h_g", "method", "coupling", "reg_at", "schedule")
BASELINE_ONLY = ("lr", "betas")


def unread_options(optimizer: str) -> tuple[str, ...]:
    """The options an optimiser never reads: a baseline's h, method, coupling, reg_at and schedule (and SGD's
    betas), an ODE run's lr and betas."""
    if optimizer == "ode":
        return BASELINE_ONLY
    return ODE_ONLY + (("betas",) if optimizer == "sgd" else ())


def written_options(cfg: Config) -> dict:
    """config.json's options: every one this run reads, none it ignores (an Adam run's file has no method or h).
    Read back by load_config, the missing ones take their defaults, which this optimiser ignores again."""
    unread = unread_options(cfg.optimizer)
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in unread}


def describe(cfg: Config) -> str:
    """The run's optimiser in words, for its first line, its plot titles and summary.json: what the run does, not
    what its preset's options would do under another optimiser. A baseline says whether it carries ODE-GAN's
    regulariser (the paper's "Adam + reg" variant) or is the plain optimiser."""
    penalties = "".join(f" {k}={getattr(cfg, k):g}" for k in ("r1", "r2", "wgan_gp", "consensus") if getattr(cfg, k))
    if cfg.optimizer == "ode":
        h = f"h={cfg.h:g}" + (f" h_g={cfg.h_g:g}" if cfg.h_g is not None else "")
        return f"ode {cfg.method} {h} reg={cfg.reg:g}{penalties}"
    name = f"{cfg.optimizer} lr={cfg.lr:g}" + (f" betas={tuple(cfg.betas)}" if cfg.optimizer == "adam" else "")
    if cfg.reg > 0:
        return f"{name} + ODE-GAN's regulariser reg={cfg.reg:g}{penalties}"
    return f"{name} reg=0 (plain {cfg.optimizer}){penalties}"


def check_applies(cfg: Config, given) -> None:
    """Refuse options given explicitly that this run's optimiser never reads (a silent no-op otherwise)."""
    unread = unread_options(cfg.optimizer)
    ignored = [k for k in given if k in unread]
    if ignored:
        uses = "h, method, coupling, reg_at and schedule" if cfg.optimizer == "ode" else "lr (and betas: adam)"
        raise ValueError(
            f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to optimizer={cfg.optimizer!r}, "
            f"which reads {uses}; drop {'it' if len(ignored) == 1 else 'them'} or choose another optimizer"
        )


def load_config(path, **overrides) -> Config:
    """A Config from a JSON file (a run's own config.json round-trips; one written by 0.1 or 0.2 is read with
    today's names: legacy.migrate_options), with ``overrides`` on top, validated."""
    import json
    from pathlib import Path

    from .legacy import migrate_options

    if Path(path).is_dir():
        raise ValueError(f"--config {path} is a folder; give the JSON file (a run's config.json works)")
    try:
        text = Path(path).read_bytes().decode("utf-8")
        options = json.loads(text)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): give a JSON file") from None
    except RecursionError:
        raise ValueError(f"{path} nests its JSON too deeply to read: a config file is a flat object") from None
    except ValueError as exc:  # a JSONDecodeError, or a number past Python's digit limit
        raise ValueError(f"{path} is not a JSON file of options ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{path} must hold a JSON object of options, not {type(options).__name__}")
    options = migrate_options(options)
    why = unknown_options(options)
    if why is not None:
        raise ValueError(f"{path}: {why}")
    why = unknown_options(overrides)
    if why is not None:
        raise ValueError(why)
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = Config(**{**options, **given})
    cfg.validate()
    check_applies(cfg, given)
    return cfg


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_environment(cfg: Config) -> None:
    """Refuse, before anything is built or written, what this machine cannot run: a CUDA device that is not
    there, a kernel backend that is unavailable, CUDA-graph capture off a GPU. ValueError names the option."""
    from .. import ops

    device = resolve_device(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but torch sees no CUDA device here; use --device cpu (or auto)")
    if cfg.backend != "auto":
        why = ops.why_unavailable(cfg.backend)
        if why is not None:
            raise ValueError(f"backend={cfg.backend!r} is unavailable here: {why}; use --backend auto")
        if not ops.supports(cfg.backend, torch.device(device)):
            raise ValueError(f"backend={cfg.backend!r} does not run on {device} tensors; use --backend auto")
    if cfg.cuda_graph and not device.startswith("cuda"):
        raise ValueError(f"cuda_graph=True needs a CUDA device, and this run is on {device}; leave cuda_graph off")
    if cfg.backend == "auto":
        try:  # ODEGAN_BACKEND, when set, picks auto's backend: refuse a bad one before the run folder is made
            ops.resolve("auto", torch.device(device), "stage")
        except (ValueError, RuntimeError) as exc:
            raise ValueError(str(exc)) from None
    from pathlib import Path

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={cfg.out!r} is a file, not a folder: give --out a folder (new or a run's)")
