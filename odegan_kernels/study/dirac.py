"""DiracGAN (Mescheder et al. 2018): which training methods converge, run through the library's own optimisers.

Real data is the point 0, G is the point theta, D(x) = psi x; the equilibrium is (psi, theta) = (0, 0). With the
minimax loss the field near it is a rotation of frequency f'(0) = 1/2, so every claim has a closed form. Each
method runs from the same start: simultaneous gradient descent is the ODE stepper's Euler step, alternating
descent a D step then a G step at the new D, each evaluation through game_gradients and apply_penalties (the
trainer's path). The field's Jacobian at the equilibrium is taken with autograd from the same losses and
penalties; the step map's spectral radius by central differences of one step of the method itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from .. import ops
from ..contract import Stage, apply_penalties, due, penalty_specs
from ..flat import FlatParams
from ..game import Batch, game_gradients
from ..game.losses import d_loss, g_loss
from ..game.penalties import consensus_penalty, input_grad_penalty, interpolates, wgan_gp_penalty
from ..models.dirac import dirac_pair
from ..ode.stepper import ODEStepper

START = (1.0, 1.0)  # (psi, theta)
H, STEPS, TOL = 0.1, 1000, 1e-3  # step size, steps, "converged": distance to (0, 0) at most TOL after STEPS
NOISE_POINTS = 256  # instance noise: a fixed grid of normal quantiles, so the run follows the expected field


@dataclass(frozen=True)
class Method:
    """One training method on DiracGAN: how the players update, the loss, and the regularisers."""

    name: str
    update: str  # simultaneous | alternating (gradient descent) | an RK method of the ODE stepper
    loss: str = "minimax"
    penalties: dict[str, float] = field(default_factory=dict)  # r1, r2, wgan_gp, consensus
    reg: float = 0.0  # ODE-GAN's g_reg
    clip: float | None = None  # WGAN: psi clipped to [-clip, clip] after each D update
    noise: float = 0.0  # instance noise std

    @property
    def label(self) -> str:
        return f"{self.name} ({self.update})"


def methods(gamma: float = 0.3, consensus: float = 1.0, gp: float = 1.0, sigma: float = 1.0, lam: float = 1.0):
    """The study's methods: each regulariser under simultaneous and alternating descent, then ODE-GAN."""
    regs = [
        ("unregularised", {}),
        ("WGAN", dict(loss="wasserstein", clip=1.0)),
        ("WGAN-GP", dict(loss="wasserstein", penalties={"wgan_gp": gp})),
        ("instance noise", dict(noise=sigma)),
        ("R1", dict(penalties={"r1": gamma})),
        ("R2", dict(penalties={"r2": gamma})),
        ("consensus", dict(penalties={"consensus": consensus})),
    ]
    out = [Method(name, update, **kw) for name, kw in regs for update in ("simultaneous", "alternating")]
    for rk in ("euler", "heun", "rk4"):
        out += [Method("ODE-GAN", rk), Method("ODE-GAN + g_reg", rk, reg=lam)]
    return out


# -- running a method ---------------------------------------------------------------------------------------------
class Run:
    """A method's players, inputs and closure on DiracGAN in float64, from (psi, theta)."""

    def __init__(self, method: Method, psi: float, theta: float, h: float = H) -> None:
        self.method, self.h = method, h
        self.D, self.G = dirac_pair(psi, theta, dtype=torch.float64)
        self.flat = FlatParams([self.D, self.G], names=["D", "G"], dtype=torch.float64)
        with torch.no_grad():  # exactly: dirac_pair builds its parameters in float32 first
            self.D.psi.fill_(psi)
            self.G.theta.fill_(theta)
        n = NOISE_POINTS if method.noise else 1
        self.real = torch.zeros(n, 1, dtype=torch.float64)
        self.z = torch.zeros(n, 1, dtype=torch.float64)
        self.noise = None
        if method.noise:
            q = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n).unsqueeze(1)
            self.noise = (method.noise * q, method.noise * q)
        self.gen = torch.Generator().manual_seed(0)  # WGAN-GP's interpolation weights
        self.specs = penalty_specs(method.penalties)
        self.stepper = None
        if method.update != "alternating":
            rk = "euler" if method.update == "simultaneous" else method.update
            self.stepper = ODEStepper(self.flat, rk, h=h, reg=method.reg, penalties=self.specs)
        self.steps = 0

    def closure(self, stage: Stage):
        m = self.method
        batch = Batch(self.real, self.z, noise=self.noise)
        return game_gradients(self.D, self.G, batch, m.loss, stage.players, stage.penalties, generator=self.gen)

    def point(self) -> tuple[float, float]:
        return self.D.psi.item(), self.G.theta.item()

    def step(self) -> None:
        if self.stepper is not None:
            self.stepper.step(self.closure)
            self._clip()
        else:  # alternating: D moves, then G at the new D
            for q in (0, 1):
                self.flat.zero_grad()
                stage = Stage(0, self.steps, (q,), due(self.specs, self.steps, (q,)))
                apply_penalties(self.closure(stage), self.flat, stage.penalties, stage.players)
                lo, hi = self.flat.segments[q]
                with torch.no_grad():
                    self.flat.params[lo:hi] -= self.h * self.flat.grads[lo:hi]
                if q == 0:
                    self._clip()
        self.steps += 1

    def _clip(self) -> None:
        if self.method.clip is not None:
            with torch.no_grad():
                self.D.psi.clamp_(-self.method.clip, self.method.clip)


def trajectory(method: Method, steps: int = STEPS, h: float = H, start=START) -> list[tuple[float, float]]:
    """(psi, theta) at the start and after every step."""
    run = Run(method, *start, h=h)
    points = [run.point()]
    for _ in range(steps):
        run.step()
        points.append(run.point())
        if not all(map(math.isfinite, points[-1])) or max(map(abs, points[-1])) > 1e6:
            break  # diverged: the rest is overflow
    return points


def step_map_radius(method: Method, h: float = H, eps: float = 1e-6) -> float:
    """The spectral radius of one step's map at the equilibrium, by central differences of the method's own step
    (< 1: locally convergent; > 1: divergent; = 1: neither)."""
    cols = []
    for j in range(2):
        ends = []
        for sign in (1.0, -1.0):
            start = [0.0, 0.0]
            start[j] = sign * eps
            run = Run(method, *start, h=h)
            run.step()
            ends.append(torch.tensor(run.point(), dtype=torch.float64))
        cols.append((ends[0] - ends[1]) / (2 * eps))
    return _radius(torch.stack(cols, 1))


def _radius(m: torch.Tensor) -> float:
    return torch.linalg.eigvals(m).abs().max().item() if torch.isfinite(m).all() else math.nan


# -- the field ----------------------------------------------------------------------------------------------------
def field(method: Method, x: torch.Tensor, run: Run | None = None) -> torch.Tensor:
    """The method's regularised field -[dl_D/dpsi + sum w grad P, dl_G/dtheta + ...] at x = (psi, theta), written
    with the library's losses and penalty definitions, differentiable in x (for the Jacobian). ``run``: a Run of
    the method to take the players and inputs from (made when not given)."""
    run = run or Run(method, 0.0, 0.0)
    if not x.requires_grad:  # a plain evaluation (the figure's arrows)
        x = x.detach().requires_grad_()
    psi, theta = x[0:1], x[1:2]
    D = lambda inp: functional_call(run.D, {"psi": psi}, (inp,))  # noqa: E731
    fake = functional_call(run.G, {"theta": theta}, (run.z,))
    x_real, x_fake = run.real, fake
    if run.noise is not None:
        x_real, x_fake = x_real + run.noise[0], x_fake + run.noise[1]
    x_real = x_real.detach().requires_grad_()
    d_real, d_fake = D(x_real), D(x_fake)
    ld, lg = d_loss(d_real, d_fake, method.loss), g_loss(d_fake, method.loss)
    (g_psi,) = torch.autograd.grad(ld, psi, create_graph=True)
    (g_theta,) = torch.autograd.grad(lg, theta, create_graph=True)
    gd, gg = g_psi, g_theta
    w = method.penalties
    pens = []  # (weight, value) regularising D
    if "r1" in w:
        pens.append((w["r1"], input_grad_penalty(d_real, x_real)))
    if "r2" in w:
        pens.append((w["r2"], input_grad_penalty(d_fake, x_fake)))
    if "wgan_gp" in w:
        x_hat = interpolates(x_real, x_fake, torch.full((len(x_real),), 0.5, dtype=x.dtype))
        pens.append((w["wgan_gp"], wgan_gp_penalty(D(x_hat), x_hat)))
    if method.reg:
        pens.append((method.reg, ops.sqnorm([g_theta])))
    for weight, value in pens:
        gd = gd + weight * torch.autograd.grad(value, psi, create_graph=True)[0]
    if "consensus" in w:
        c = consensus_penalty([g_psi, g_theta])
        c_psi, c_theta = torch.autograd.grad(c, (psi, theta), create_graph=True)
        gd, gg = gd + w["consensus"] * c_psi, gg + w["consensus"] * c_theta
    return -torch.cat([gd, gg])


def jacobian(method: Method, at=(0.0, 0.0)) -> torch.Tensor:
    """The field's Jacobian d(psi', theta')/d(psi, theta) at ``at``, by autograd."""
    x = torch.tensor(at, dtype=torch.float64)
    return torch.autograd.functional.jacobian(lambda y: field(method, y), x)


def closed_form(method: Method) -> tuple[complex, complex] | None:
    """The Jacobian's eigenvalues at the equilibrium from the linearised game (f'(0) = 1/2 for minimax, 1 for
    the Wasserstein loss), or None where the field is not differentiable there (WGAN-GP: |psi| at psi = 0)."""
    f1 = 1.0 if method.loss == "wasserstein" else 0.5
    damping = 0.0  # the Jacobian is [[-damping, -f'], [f', -g_damping]]
    g_damping = 0.0
    w = method.penalties
    if "wgan_gp" in w:
        return None
    damping += w.get("r1", 0.0) + w.get("r2", 0.0)  # grad_psi gamma/2 psi^2
    damping += method.reg * 2 * f1**2  # grad_psi ||dl_G/dtheta||^2 = grad_psi (f' psi)^2
    damping += method.noise**2 * 2 * 0.25 if method.noise else 0.0  # -f''(0) 2 sigma^2 with f''(0) = -1/4
    c = w.get("consensus", 0.0) * f1**2  # gamma grad 1/2 |J x|^2 = gamma f'^2 x
    damping, g_damping = damping + c, g_damping + c
    tr, det = -(damping + g_damping), damping * g_damping + f1**2
    disc = complex(tr * tr / 4 - det) ** 0.5
    return (tr / 2 + disc, tr / 2 - disc)
