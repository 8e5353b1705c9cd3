"""A population's game gradients: K members of one pair evaluated in one batched pass over the member axis.

The players' [K, ...] parameters (flat.PopulationParams.stacked) go through torch.func's functional_call under vmap
for any nn.Module pair (PopulationAutograd), or through the hand-derived MLP engine's formulas written with batched
matrix products (PopulationMLP). Each member's losses are its own batch means ([K] tensors); one backward of their
sum gives every member exactly its own gradient, because members never interact; every penalty's value is the sum
of the members' values, so its gradient is each member's own too. A population Batch holds [K, B, ...] tensors.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .. import ops
from ..contract import PenaltyTerm, StageResult
from ..flat import place, view_at
from .autograd import _accumulate
from .batch import Batch, checked_players, penalty_names
from .losses import ZERO_SUM, d_loss, g_loss, get_loss
from .mlp import _checked_layers, checked_request
from .penalties import _wide

_LAYOUT = "grad and param do not obey the gradient layout contract"  # the [K, ...] leaves are strided views


def _check_population(flat, batch: Batch) -> None:
    if not hasattr(flat, "stacked"):
        raise TypeError("a population engine needs a population's FlatParams (FlatParams(..., members=K))")
    if not isinstance(batch, Batch):
        raise TypeError(f"the engine takes a game.Batch, got {type(batch).__name__}")
    for name in ("real", "z"):
        v = getattr(batch, name)
        if v.dim() < 3 or v.shape[0] != flat.members:
            raise ValueError(
                f"a population's Batch.{name} is [members, batch, ...] with members={flat.members}, got "
                f"{tuple(v.shape)}"
            )
    if batch.conditional:
        for name, v in (("y_real", batch.y_real), ("y_fake", batch.y_fake)):
            n = (batch.real if name == "y_real" else batch.z).shape[:2]
            if v.shape != n or v.dtype != torch.long:
                raise ValueError(
                    f"a population's Batch.{name} is [members, batch] class indices (torch.long) shaped {tuple(n)}, "
                    f"got {tuple(v.shape)} {v.dtype}"
                )
    for v in batch.noise or ():
        if v is not None and v.shape != batch.real.shape:
            raise ValueError(
                f"a population's instance noise is shaped as Batch.real {tuple(batch.real.shape)}, got {tuple(v.shape)}"
            )


class PopulationAutograd:
    """The population's game gradients through autograd, for any pair of nn.Modules: the members' forward is
    ``vmap(functional_call)`` over their [K, ...] parameters and buffers (BatchNorm's running statistics per member,
    updated in place), the AutogradEngine's evaluation otherwise (g_reg by double backward; r1, r2, wgan_gp and
    consensus per member). ``autocast``: the passes in bfloat16 where the AutogradEngine's autocast puts them
    (float32 parameters; their gradients and the stage math stay float32)."""

    name = "population-autograd"

    def __init__(
        self, flat, D: nn.Module, G: nn.Module, loss: str = "ns", weights=None, autocast: bool = False
    ) -> None:
        get_loss(loss)
        if not hasattr(flat, "stacked"):
            raise TypeError("PopulationAutograd needs a population's FlatParams (FlatParams(..., members=K))")
        if not isinstance(autocast, bool):
            raise TypeError(f"autocast must be True or False, got {autocast!r}")
        if autocast and flat.dtype != torch.float32:
            raise ValueError(
                f"autocast (bf16 passes over float32 parameters) needs float32 parameters, not {flat.dtype}"
            )
        self.flat, self.D, self.G, self.loss, self.autocast = flat, D, G, loss, autocast
        # a class-conditional pair (G(z, y), D(x, y)) needs a Batch with labels, an unconditional one one without
        self.needs_labels, self.takes_labels = _label_arity(G)
        self.num_classes = getattr(G, "num_classes", None) if self.takes_labels else None
        self.pD, self.pG = flat.stacked(0), flat.stacked(1)
        self.bD, self.bG = flat.stacked_buffers(0), flat.stacked_buffers(1)
        self.weights = member_weights(weights, flat)

    def _check_labels(self, batch: Batch) -> None:
        """The Batch fits the pair: labels for a class-conditional G, none for an unconditional one; on the CPU (no
        host sync to pay) the labels' classes in [0, num_classes), before any pass moves BN statistics."""
        if self.needs_labels and not batch.conditional:
            raise ValueError("this pair is class-conditional (G(z, y)): the Batch needs y_real and y_fake")
        if batch.conditional and not self.takes_labels:
            raise ValueError(
                "this pair is unconditional: a Batch with labels (y_real, y_fake) is for a class-conditional one"
            )
        if batch.conditional and isinstance(self.num_classes, int):
            for name, y in (("y_real", batch.y_real), ("y_fake", batch.y_fake)):
                if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                    raise ValueError(
                        f"Batch.{name} holds classes outside [0, {self.num_classes}): {int(y.min())}..{int(y.max())}"
                    )

    def _term(self, name: str, per_member, summed) -> torch.Tensor:
        """A penalty's value: the members' sum (``summed()``, through ops.sqnorm), or with per-member weights
        (``weights[name]``) the weighted sum of ``per_member()``, the members' own values ([K])."""
        w = self.weights.get(name)
        return summed() if w is None else torch.dot(w, per_member())

    def _d(self, x, *c):
        return vmap(lambda p, b, x, *c: functional_call(self.D, (p, b), (x, *c)))(self.pD, self.bD, x, *c)

    def __call__(
        self, batch: Batch, players: Sequence[int] = (0, 1), penalties: Iterable[str] = (), losses: bool = True
    ) -> StageResult:
        _check_population(self.flat, batch)
        self._check_labels(batch)
        players, pens = checked_players(players), penalty_names(penalties)
        loss = self.loss
        need_d, need_g = 0 in players, 1 in players
        greg, consensus = "g_reg" in pens, "consensus" in pens
        run_d, run_g = need_d or consensus, need_g or consensus
        if greg and not need_g:
            raise ValueError("g_reg needs the generator's gradient (players must include 1)")
        fake = batch.fake
        if fake is not None and run_g:
            raise ValueError("batch.fake can only be reused when the generator's gradient is not needed")
        real, nb = batch.real, batch.real.shape[1]
        c_real = () if batch.y_real is None else (batch.y_real,)  # a class-conditional pair's labels, per member
        c_fake = () if batch.y_fake is None else (batch.y_fake,)
        noise_r, noise_f = batch.noise if batch.noise is not None else (None, None)
        terms: dict[str, PenaltyTerm] = {}
        # autocast where the AutogradEngine has it: the forwards and the penalties' values (its backward passes and
        # the squared norms of gradients do not cast: they run in the dtypes their inputs have)
        amp = torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=self.autocast)
        with amp, AutocastUnderVmap() if self.autocast else contextlib.nullcontext():
            if fake is None:
                with torch.set_grad_enabled(run_g):
                    g = lambda p, b, z, *c: functional_call(self.G, (p, b), (z, *c))  # noqa: E731
                    fake = vmap(g)(self.pG, self.bG, batch.z, *c_fake)
            x_fake = fake if run_g else fake.detach()
            if noise_f is not None:  # instance noise on what D sees, as the AutogradEngine adds it
                x_fake = x_fake + noise_f
            if "r2" in pens and not x_fake.requires_grad:
                x_fake.requires_grad_()
            d_fake = self._d(x_fake, *c_fake)
            lg = vmap(lambda o: g_loss(o, loss))(d_fake) if run_g else None
            ld = None
            x_real = real if noise_r is None else real + noise_r
            if run_d:
                if "r1" in pens:
                    x_real = x_real.detach().requires_grad_()
                d_real = self._d(x_real, *c_real)
                ld = vmap(lambda r, f: d_loss(r, f, loss))(d_real, d_fake)
            for name in ("r1", "r2"):
                if name in pens:
                    out_, x = (d_real, x_real) if name == "r1" else (d_fake, x_fake)
                    (g,) = torch.autograd.grad(out_.sum(), x, create_graph=True)
                    g = _wide(g)  # (the fakes' gradient is bf16 under autocast: the squared norms reduce fp32)
                    value = self._term(name, lambda g=g: _rowwise_sqnorm(g), lambda g=g: ops.sqnorm([g]))
                    terms[name] = PenaltyTerm((0,), value * (0.5 / nb))
            if "wgan_gp" in pens:
                mix = batch.mix
                if mix is None:
                    raise ValueError(
                        "a population's WGAN-GP takes its interpolation weights from the batch (Batch.mix)"
                    )
                u = mix.to(real.dtype).reshape(*mix.shape, *([1] * (real.dim() - 2)))
                x_hat = (u * x_real.detach() + (1 - u) * x_fake.detach()).requires_grad_()
                (g,) = torch.autograd.grad(self._d(x_hat, *c_real).sum(), x_hat, create_graph=True)
                dev = torch.linalg.vector_norm(g.flatten(2), dim=2) - 1
                value = self._term("wgan_gp", lambda: _rowwise_sqnorm(dev), lambda: ops.sqnorm([dev]))
                terms["wgan_gp"] = PenaltyTerm((0,), value / nb)
        d_par, gp = list(self.pD.values()), list(self.pG.values()) if run_g else []
        keep = bool(pens)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LAYOUT)
            if consensus:
                g_theta = torch.autograd.grad(ld.sum(), d_par, create_graph=True)
                g_phi = torch.autograd.grad(lg.sum(), gp, create_graph=True)
                v = [*g_theta, *g_phi]
                value = self._term("consensus", lambda: sum(map(_rowwise_sqnorm, v)), lambda: ops.sqnorm(v))
                terms["consensus"] = PenaltyTerm((0, 1), value * 0.5)
                if need_d:
                    _accumulate(d_par, g_theta)
                if need_g:
                    _accumulate(gp, g_phi)
                if greg:
                    terms["g_reg"] = PenaltyTerm((0,), ops.sqnorm(g_phi))
            elif loss in ZERO_SUM and need_d and need_g and not pens:
                torch.autograd.backward(ld.sum(), inputs=d_par + gp)
                torch._foreach_neg_([p.grad for p in gp])
            else:
                if need_d:
                    torch.autograd.backward(ld.sum(), inputs=d_par, retain_graph=need_g or keep)
                if need_g and greg:
                    g_phi = torch.autograd.grad(lg.sum(), gp, create_graph=True)
                    _accumulate(gp, g_phi)
                    terms["g_reg"] = PenaltyTerm((0,), ops.sqnorm(g_phi))
                elif need_g:
                    torch.autograd.backward(lg.sum(), inputs=gp, retain_graph=keep)
        out = StageResult(fake=fake.detach(), terms=terms)
        if need_d:
            out.loss_d = ld.detach().float()
        if need_g:
            out.loss_g = lg.detach().float()
        return out


class AutocastUnderVmap(TorchFunctionMode):
    """Autocast's dtypes under vmap as outside it, for the layers autocast alone gets wrong there. vmap's batching
    rules run before autocast sees a call: conv2d (and the other convolutions) becomes aten.convolution, which the
    CPU's autocast does not cast (CUDA's does), so a population's convolutions would stay float32 on the CPU; a
    linear layer becomes a bf16 product plus a float32 bias add, so its output would be float32 where a solo run's
    is bf16. Both are called here with their float32 tensors cast to autocast's dtype first (float64 ones are left
    alone, as autocast leaves them), where autocast is on for their device. And vmap's BatchNorm refuses a bf16
    input with float32 statistics, which outside vmap is computed in float32 and returned in the input's dtype:
    here too."""

    CAST = frozenset(
        (torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
         torch.conv_transpose3d, F.linear)
    )  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
            return func(*args, **kwargs)
        if func in self.CAST:
            dt = torch.get_autocast_dtype(x.device.type)
            args, kwargs = tuple(_cast(a, dt) for a in args), {k: _cast(v, dt) for k, v in kwargs.items()}
        elif func is F.batch_norm and x.dtype in (torch.bfloat16, torch.float16):
            if args:
                return func(x.float(), *args[1:], **kwargs).to(x.dtype)
            return func(**{**kwargs, "input": x.float()}).to(x.dtype)
        return func(*args, **kwargs)


def _cast(t, dtype):
    """A float32 tensor in ``dtype`` (what autocast casts); anything else as it is."""
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t


def _label_arity(module: nn.Module) -> tuple[bool, bool]:
    """(whether ``module``'s forward needs a second argument, the labels; whether it can take one at all)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False, True
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in params if p.kind in kinds]
    needs = sum(p.default is inspect.Parameter.empty for p in positional) >= 2
    return needs, needs or len(positional) >= 2 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _rowwise_sqnorm(t: torch.Tensor) -> torch.Tensor:
    """Each member's squared norm of its slice of ``t`` ([K, ...] -> [K])."""
    return t.flatten(1).square().sum(1)


WEIGHTED = ("r1", "r2", "wgan_gp", "consensus")  # the penalties a population's members may weigh differently


def member_weights(weights, flat) -> dict[str, torch.Tensor]:
    """{penalty: [K] weights} from {penalty: K numbers}: member k's value of that penalty enters the term times
    weights[k] (the optimiser's weight for the penalty multiplies the whole term, so give it 1)."""
    if weights is None:
        return {}
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict {{penalty: one weight per member}}, got {type(weights).__name__}")
    out = {}
    for name, ws in weights.items():
        if name not in WEIGHTED:
            raise ValueError(
                f"weights: {name!r} is not a penalty a population weighs per member; choose from {WEIGHTED} "
                "(g_reg's per-member lambda is the stepper's reg=[...])"
            )
        if isinstance(ws, torch.Tensor):
            ws = ws.detach().cpu().reshape(-1).tolist() if ws.dim() == 1 else None
        elif isinstance(ws, (str, bytes)) or not isinstance(ws, Iterable):
            ws = None
        ws = None if ws is None else list(ws)
        if ws is None or len(ws) != flat.members:
            raise ValueError(f"weights[{name!r}] must be a sequence of one weight per member ({flat.members})")
        for w in ws:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
                raise ValueError(f"weights[{name!r}] must be finite numbers >= 0, got {w!r}")
        t = torch.tensor([float(w) for w in ws], dtype=flat.dtype, device=flat.device)
        if not torch.isfinite(t).all():
            raise ValueError(f"weights[{name!r}] overflow the parameters' dtype {flat.dtype}: {ws}")
        out[name] = t
    return out


# -- the hand-derived engine, batched ------------------------------------------------------------------------------
# Activations are feature-major, [K, features, batch]: every product has the batch as its long side (W @ h, not
# h @ W^T). MKL's batched GEMM runs D's one-unit output layer ~3x faster this way ([16, 1, 25] x [16, 25, 1024]:
# 73 us against 210 us for [16, 1024, 25] x [16, 25, 1]; one thread, AMD EPYC) and the whole K = 16 toy step ~1.1x
# faster (a paired run of both engines, 12 rounds: 0.98-1.47, median 1.11); docs/RESULTS.md has the population figures.
def _wt_times(w, delta):
    """w^T @ delta over the member axis; for a one-unit layer (w [K, 1, n]) the outer product as a broadcast
    multiply (64 us against bmm's 183 us, whose inner dimension would be 1)."""
    return w.transpose(1, 2) * delta if w.shape[1] == 1 else torch.bmm(w.transpose(1, 2), delta)


def _forward(ws, bs, x):
    hs = [x]
    for i, (w, b) in enumerate(zip(ws, bs)):
        a = torch.baddbmm(b.unsqueeze(2), w, hs[-1])
        if i == len(ws) - 1:
            return a, hs
        hs.append(a.relu_())
    raise AssertionError("unreachable")


def _backward(ws, hs, delta, into, need_input=False, deltas=None):
    for i in range(len(ws) - 1, -1, -1):
        if deltas is not None:
            deltas.append(delta)
        if into is not None:
            gw, gb = into[i]
            gw.baddbmm_(delta, hs[i].transpose(1, 2))
            gb.add_(delta.sum(2))
        if i == 0 and not need_input:
            return None
        up = _wt_times(ws[i], delta)
        delta = torch.ops.aten.threshold_backward(up, hs[i], 0) if i > 0 else up
    return delta


class PopulationMLP:
    """game/mlp.py's hand-derived gradients of a ReLU MLP pair, for all members at once: every ``addmm`` a
    ``baddbmm`` over the member axis. g_reg's exact gradient by the same forward-over-reverse."""

    name = "population-mlp"

    def __init__(self, flat, D: nn.Module, G: nn.Module, loss: str = "ns") -> None:
        get_loss(loss)
        if not hasattr(flat, "stacked"):
            raise TypeError("PopulationMLP needs a population's FlatParams (FlatParams(..., members=K))")
        layers, why = _checked_layers(D, G)
        if why is not None:
            raise ValueError(f"the hand-derived gradients cannot run here: {why}")
        self.flat, self.loss = flat, loss
        pD, pG = flat.stacked(0), flat.stacked(1)
        names = {id(p): n for n, p in D.named_parameters()} | {id(p): n for n, p in G.named_parameters()}
        # where each layer's [K, ...] weight and bias lie in the flat buffers (D's, then G's): the evaluation reads
        # and writes views it makes there (of the parameters, of the gradients) rather than the leaves and their
        # .grad, so that a traced step reads no tensor that aliases another (strided member views cannot be told
        # apart from overlapping ones)
        self.places = [
            [place(stacked[names[id(getattr(lin, attr))]]) for lin in lins]
            for lins, stacked in ((layers[0], pD), (layers[1], pG))
            for attr in ("weight", "bias")
        ]

    def attach_grads(self) -> None:
        """Make (or find again) the [K, ...] leaves' .grad views the evaluation accumulates into, now: a traced step
        starts from them (game/compiled.py's prepare_trace)."""
        self.flat.attach_grads()

    @torch.no_grad()
    def __call__(
        self, batch: Batch, players: Sequence[int] = (0, 1), penalties: Iterable[str] = (), losses: bool = True
    ) -> StageResult:
        _check_population(self.flat, batch)
        if batch.conditional:
            raise ValueError("the hand-derived engine runs unconditional MLP pairs (class labels: PopulationAutograd)")
        players, greg, need_d, need_g = checked_request(batch, players, penalties, "PopulationAutograd")
        loss, values = self.loss, losses
        real, z, fake = batch.real, batch.z, batch.fake
        dw, db, gw_, gb_ = ([view_at(self.flat.params, w) for w in ws] for ws in self.places)
        gdw, gdb, ggw, ggb = ([view_at(self.flat.grads, w) for w in ws] for ws in self.places)
        into_d, into_g = list(zip(gdw, gdb)), list(zip(ggw, ggb))
        if fake is None:
            fake_t, g_hs = _forward(gw_, gb_, z.transpose(1, 2))
            fake = fake_t.transpose(1, 2).contiguous()
        out = StageResult(fake=fake)
        noise_r, noise_f = batch.noise if batch.noise is not None else (None, None)
        if noise_r is not None:  # constant: the gradients and g_reg's tangent pass through it unchanged (mlp.py)
            real = real + noise_r
        x_fake = fake if noise_f is None else fake + noise_f
        nr = real.shape[1]
        if need_d:
            logits, d_hs = _forward(dw, db, torch.cat([real, x_fake], 1).transpose(1, 2))
            logits = logits.squeeze(1)
            lr, lf = logits[:, :nr], logits[:, nr:]
            lo = get_loss(loss)
            ld = lo.d_real(lr).mean(1) + lo.d_fake(lf).mean(1) if values else None
            dr, df = lo.d_real_grad(lr).mul_(1.0 / nr), lo.d_fake_grad(lf).mul_(1.0 / lf.shape[1])
            _backward(dw, d_hs, torch.cat([dr, df], 1).unsqueeze(1), into_d)
            if values:
                out.loss_d = ld.float()
            if need_g:
                f_hs = [h[:, :, nr:] for h in d_hs]
        elif need_g:
            lf, f_hs = _forward(dw, db, x_fake.transpose(1, 2))
            lf = lf.squeeze(1)
        if not need_g:
            return out
        lg = get_loss(loss).g(lf).mean(1)
        dg, curv = get_loss(loss).g_grads(lf, greg)
        dg = dg.mul_(1.0 / lf.shape[1])
        curv = None if curv is None else curv.mul_(1.0 / lf.shape[1])
        out.loss_g = lg.float()
        d_deltas: list[torch.Tensor] = []
        dfake = _backward(dw, f_hs, dg.unsqueeze(1), None, need_input=True, deltas=d_deltas)
        if not greg:
            _backward(gw_, g_hs, dfake, into_g)
            return out
        g_phi = [(torch.zeros_like(w), torch.zeros_like(b)) for w, b in zip(gw_, gb_)]
        _backward(gw_, g_hs, dfake, g_phi)
        for (a, b), (iw, ib) in zip(g_phi, into_g):
            iw.add_(a)
            ib.add_(b)
        value = ops.sqnorm([t for pair in g_phi for t in pair])
        out.terms["g_reg"] = PenaltyTerm((0,), value, _g_reg_grad(dw, gw_, g_hs, f_hs, d_deltas, curv, g_phi))
        return out


def _g_reg_grad(dw, gw, g_hs, f_hs, d_deltas, curv, g_phi) -> list[torch.Tensor]:
    """game/mlp.py's forward-over-reverse for g_reg, batched over the member axis (feature-major, as above)."""
    tangent = None
    for i, (w, (tw, tb)) in enumerate(zip(gw, g_phi)):
        a = torch.baddbmm(tb.unsqueeze(2), tw, g_hs[i])
        if tangent is not None:
            a.baddbmm_(w, tangent)
        tangent = torch.ops.aten.threshold_backward(a, g_hs[i + 1], 0) if i + 1 < len(gw) else a
    f_tangents = [tangent]
    for i, w in enumerate(dw[:-1]):
        up = torch.bmm(w, f_tangents[-1])
        f_tangents.append(torch.ops.aten.threshold_backward(up, f_hs[i + 1], 0))
    delta_t = torch.bmm(dw[-1], f_tangents[-1]).mul_(curv.unsqueeze(1))
    out: list[torch.Tensor] = []
    for i in range(len(dw) - 1, -1, -1):
        delta = d_deltas[len(dw) - 1 - i]
        g = torch.bmm(delta_t, f_hs[i].transpose(1, 2)).baddbmm_(delta, f_tangents[i].transpose(1, 2)).mul_(2.0)
        out[:0] = [g, delta_t.sum(2).mul_(2.0)]
        if i > 0:
            delta_t = torch.ops.aten.threshold_backward(_wt_times(dw[i], delta_t), f_hs[i], 0)
    return out
