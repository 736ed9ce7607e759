"""Functional AdamW: learning-rate and β2 schedules, global-norm clipping, non-finite skip.

Params, grads and the Adam moments are flat ``dict[str, Tensor]`` of fp32 tensors (master
weights). ``AdamW`` is a frozen config; ``update`` is a pure function of its inputs::

    opt = adamw(lr=warmup_cosine(peak=3e-4, warmup=0.01, floor=3e-5, total_steps=1000))
    state = opt.init(params)
    params, state, info = opt.update(grads, state, params, step)

Step convention, shared by every schedule: ``step`` t counts the optimizer steps already taken
(t = 0 for the first update), and a schedule's value at t is the value used by the update that
produces step t + 1.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from evo import tree

Step = int | Tensor  # a python int >= 0, or a 0-dim integer tensor


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _step_f64(step: Step, device: torch.device | None = None) -> Tensor:
    """``step`` as a 0-dim float64 tensor, the dtype every schedule formula is evaluated in."""
    if isinstance(step, Tensor):
        if step.ndim != 0 or step.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"step must be a 0-dim integer tensor, got shape "
                             f"{tuple(step.shape)} dtype {step.dtype}")
        return step.to(device=device, dtype=torch.float64)
    _require(isinstance(step, int) and not isinstance(step, bool) and step >= 0,
             "step", step, "an int >= 0 or a 0-dim integer tensor")
    return torch.tensor(float(step), dtype=torch.float64, device=device)


# ---------------------------------------------------------------------------------- schedules


class Schedule:
    """A hyperparameter as a function of the optimizer step.

    ``schedule(t)`` with a python int returns a python float; with a 0-dim integer tensor it
    returns a 0-dim fp32 tensor computed with torch ops only (no ``.item()``, so torch.compile can
    trace it). Both evaluate the same float64 formula, ``at``, so the tensor result is exactly the
    fp32 rounding of the int result.
    """

    def at(self, t: Tensor) -> Tensor:
        """The value at step ``t`` (0-dim float64 tensor), as a 0-dim float64 tensor."""
        raise NotImplementedError

    def __call__(self, step: Step) -> float | Tensor:
        if isinstance(step, Tensor):
            return self.at(_step_f64(step)).to(torch.float32)
        return self.at(_step_f64(step)).item()


@dataclass(frozen=True)
class Constant(Schedule):
    value: float

    def __post_init__(self):
        _require(_is_number(self.value), "Constant.value", self.value, "a finite number")

    def at(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.value)


@dataclass(frozen=True)
class WarmupCosine(Schedule):
    """InternEvo's learning-rate schedule (``FineTuneCosineAnnealingWarmupLR``).

    With I = ``init_steps``, W = warmup steps, T = ``total_steps``, at step t:

    - t < I:          0
    - I <= t < I + W: peak * (t + 1 - I) / W   (the first warmup update is not at lr 0)
    - I + W <= t:     floor + (peak - floor) * (1 + cos(pi * k / (T - I - W))) / 2 with
                      k = min(t - I - W, T - I - W), so ``floor`` from t = T on.

    ``warmup`` < 1 is a ratio of ``total_steps`` (W = int(T * warmup), as InternEvo), else a
    whole number of steps. ``total_steps=None`` means "filled in by the experiment from its
    ``steps``" (``with_total_steps``); calling the schedule before that is an error.
    """

    peak: float
    warmup: float = 0.0
    floor: float = 0.0
    total_steps: int | None = None
    init_steps: int = 0

    def __post_init__(self):
        _require(_is_number(self.peak) and self.peak >= 0, "WarmupCosine.peak", self.peak, ">= 0")
        _require(_is_number(self.floor) and 0 <= self.floor <= self.peak, "WarmupCosine.floor",
                 self.floor, f"in [0, peak={self.peak}]")
        _require(_is_number(self.warmup) and (0 <= self.warmup < 1 or self.warmup == int(self.warmup)),
                 "WarmupCosine.warmup", self.warmup, "a ratio in [0, 1) or a whole number of steps")
        _require(isinstance(self.init_steps, int) and self.init_steps >= 0,
                 "WarmupCosine.init_steps", self.init_steps, "an int >= 0")
        _require(self.total_steps is None or (isinstance(self.total_steps, int) and self.total_steps >= 1),
                 "WarmupCosine.total_steps", self.total_steps, "an int >= 1 or None")
        if self.total_steps is not None:
            _require(self.init_steps + self.warmup_steps <= self.total_steps, "WarmupCosine.total_steps",
                     self.total_steps, f">= init_steps + warmup steps = {self.init_steps + self.warmup_steps}")

    @property
    def warmup_steps(self) -> int:
        if self.warmup >= 1:
            return int(self.warmup)
        return int(self._total_steps() * self.warmup)

    def with_total_steps(self, n: int) -> WarmupCosine:
        return dataclasses.replace(self, total_steps=n)

    def _total_steps(self) -> int:
        if self.total_steps is None:
            raise ValueError("WarmupCosine.total_steps is None: fill it in with with_total_steps(n) "
                             "(an Experiment does this from its `steps`) before using the schedule")
        return self.total_steps

    def at(self, t: Tensor) -> Tensor:
        start, warmup = self.init_steps, self.warmup_steps
        decay = max(self._total_steps() - start - warmup, 1)
        ramp = self.peak * (t + 1 - start) / max(warmup, 1)
        progress = ((t - start - warmup) / decay).clamp(0.0, 1.0)
        cosine = self.floor + (self.peak - self.floor) * 0.5 * (1 + torch.cos(math.pi * progress))
        return torch.where(t < start, 0.0, torch.where(t < start + warmup, ramp, cosine))


@dataclass(frozen=True)
class Beta2Schedule(Schedule):
    """InternEvo's β2 schedule: β2(t) = max(init, 1 - t^(-c)), and β2(0) = init.

    t is the number of updates already taken, as in InternEvo's ``Beta2Scheduler`` (its counter
    starts at 0 and advances after each successful update), so the first update uses ``init`` and
    the schedule rises above ``init`` once 1 - t^(-c) > init (t > 42 for the defaults). ``c = 0``
    keeps β2 = init.
    """

    init: float = 0.95
    c: float = 0.8

    def __post_init__(self):
        _require(_is_number(self.init) and 0 <= self.init < 1, "Beta2Schedule.init", self.init, "in [0, 1)")
        _require(_is_number(self.c) and self.c >= 0, "Beta2Schedule.c", self.c, ">= 0")

    def at(self, t: Tensor) -> Tensor:
        return (1 - t.pow(-self.c)).clamp(min=self.init)  # t = 0: 1 - inf, clamped to init


def warmup_cosine(peak: float, warmup: float = 0.0, floor: float = 0.0,
                  total_steps: int | None = None, init_steps: int = 0) -> WarmupCosine:
    return WarmupCosine(peak=peak, warmup=warmup, floor=floor, total_steps=total_steps,
                        init_steps=init_steps)


def _at(value: float | Schedule, t: Tensor) -> Tensor:
    return value.at(t) if isinstance(value, Schedule) else torch.full_like(t, value)


# ----------------------------------------------------------------------------------- clipping


def clip_by_global_norm(grads: list[Tensor], clip_norm: float, *, inplace: bool = False,
                        norm: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
    """Grads scaled by min(1, clip_norm / (norm + 1e-6)) exactly as
    ``torch.nn.utils.clip_grad_norm_``; returns them and their global L2 norm before clipping
    (0-dim fp32). ``norm``: the norm when already known (e.g. summed over sharded grads)."""
    norm = tree.global_norm(grads) if norm is None else norm
    scale = torch.clamp(clip_norm / (norm + 1e-6), max=1.0)
    if inplace:
        torch._foreach_mul_(grads, scale)
        return grads, norm
    return torch._foreach_mul(grads, scale), norm


# -------------------------------------------------------------------------------------- AdamW


def decay_matrices(name: str, param: Tensor) -> bool:
    """The default weight-decay mask: matrices (ndim >= 2, embeddings included) decay; norm
    weights and biases (ndim 1) do not. InternEvo decays everything: ``lambda name, p: True``."""
    return param.ndim >= 2


class AdamState(NamedTuple):
    """AdamW's state. ``count``: 0-dim int64, updates applied; ``mu``, ``nu``: first and second
    moments, keyed, shaped and typed like params (fp32); ``skipped``: 0-dim int64, steps skipped for a
    non-finite grad norm."""

    count: Tensor
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]
    skipped: Tensor


@dataclass(frozen=True)
class AdamW:
    """AdamW with decoupled weight decay, computed as ``torch.optim.AdamW`` does.

    ``lr`` and ``b2`` are numbers or schedules evaluated at the ``step`` given to ``update``.
    ``clip_norm`` clips grads to that global L2 norm (None: no clipping). ``skip_nonfinite``: a
    step whose grad norm is inf/NaN changes nothing but ``skipped``. ``decay_mask(name, param)``
    picks the params that get weight decay.
    """

    lr: float | Schedule
    b1: float = 0.9
    b2: float | Schedule = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    skip_nonfinite: bool = True
    decay_mask: Callable[[str, Tensor], bool] = decay_matrices

    def __post_init__(self):
        _require(isinstance(self.lr, Schedule) or (_is_number(self.lr) and self.lr >= 0),
                 "AdamW.lr", self.lr, "a number >= 0 or a Schedule")
        _require(_is_number(self.b1) and 0 <= self.b1 < 1, "AdamW.b1", self.b1, "in [0, 1)")
        _require(isinstance(self.b2, Schedule) or (_is_number(self.b2) and 0 <= self.b2 < 1),
                 "AdamW.b2", self.b2, "in [0, 1) or a Schedule")
        _require(_is_number(self.eps) and self.eps > 0, "AdamW.eps", self.eps, "> 0")
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0, "AdamW.weight_decay",
                 self.weight_decay, ">= 0")
        _require(self.clip_norm is None or (_is_number(self.clip_norm) and self.clip_norm > 0),
                 "AdamW.clip_norm", self.clip_norm, "> 0 or None")
        _require(isinstance(self.skip_nonfinite, bool), "AdamW.skip_nonfinite", self.skip_nonfinite, "a bool")
        _require(callable(self.decay_mask), "AdamW.decay_mask", self.decay_mask, "callable(name, param)")

    def with_total_steps(self, n: int) -> AdamW:
        """A copy whose lr schedule gets ``total_steps=n`` if it left it None."""
        if getattr(self.lr, "total_steps", 0) is None:
            return dataclasses.replace(self, lr=self.lr.with_total_steps(n))
        return self

    def init(self, params: dict[str, Tensor]) -> AdamState:
        """Zero moments (dtype and shape of params) and zero counters on the params' device."""
        if not params:
            raise ValueError("AdamW.init: params is empty")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"AdamW needs params of one floating dtype (fp32 master weights), got "
                             f"{ {k: p.dtype for k, p in params.items()} }")
        zero = torch.zeros((), dtype=torch.int64, device=next(iter(params.values())).device)
        return AdamState(count=zero, mu=tree.zeros_like(params), nu=tree.zeros_like(params),
                         skipped=zero.clone())

    def update(self, grads: dict[str, Tensor], state: AdamState, params: dict[str, Tensor],
               step: Step, *, inplace: bool = False, grad_norm: Tensor | None = None
               ) -> tuple[dict[str, Tensor], AdamState, dict[str, Tensor]]:
        """One AdamW step; returns ``(new_params, new_state, info)``.

        params: one floating dtype, fp32 master weights (fp64 works, for precision tests).
        grads: same keys, shapes and dtype as params. step: the global optimizer step
        (python int or 0-dim int64 tensor) at which the lr and β2 schedules are read.
        info: ``lr`` (0-dim fp32), ``grad_norm`` (0-dim fp32, global L2 norm of all grads before
        clipping), ``skipped`` (0-dim bool, this step).

        ``inplace=False`` never modifies its inputs. ``inplace=True`` is the donating form: it
        updates params, mu, nu, count and skipped in place (and clips grads in place) and returns
        the same dicts, with results bitwise equal to ``inplace=False``. A skipped step returns
        the input params and moments themselves.

        ``grad_norm``: the global gradient norm when the caller knows it better than these grads
        do (a sharded step holds a slice of every gradient and passes the norm over all ranks).
        """
        _check_keys(grads, params)
        device = state.count.device
        t = _step_f64(step, device)
        lr, b2 = _at(self.lr, t), _at(self.b2, t)  # 0-dim float64

        names = list(params)
        g = [grads[k] for k in names]
        grad_norm = tree.global_norm(g) if grad_norm is None else grad_norm
        info = {"lr": lr.to(torch.float32), "grad_norm": grad_norm}
        # A python-level branch: it reads the norm back to the host once per step (a device sync,
        # and a graph break under torch.compile), so a skipped step touches no buffer at all.
        if self.skip_nonfinite and not torch.isfinite(grad_norm):
            skipped = state.skipped.add_(1) if inplace else state.skipped + 1
            info["skipped"] = torch.ones((), dtype=torch.bool, device=device)
            return params, state._replace(skipped=skipped), info
        info["skipped"] = torch.zeros((), dtype=torch.bool, device=device)

        if self.clip_norm is not None:
            g, _ = clip_by_global_norm(g, self.clip_norm, inplace=inplace, norm=grad_norm)
        if not inplace:  # the pure form: run the in-place math below on copies
            params, mu, nu = tree.clone(params), tree.clone(state.mu), tree.clone(state.nu)
        else:
            mu, nu = state.mu, state.nu
        p, m, v = [params[k] for k in names], [mu[k] for k in names], [nu[k] for k in names]

        # Scalars stay 0-dim tensors (float64, cast to the params' dtype where they meet the
        # buffers) so the step needs no host sync; this is torch.optim.Adam's `capturable` arithmetic.
        dtype = p[0].dtype
        cast = lambda x: x.to(dtype)  # noqa: E731
        n = state.count.to(torch.float64) + 1  # this update's number, for bias correction
        step_size = lr / (1 - self.b1 ** n)
        bias2_sqrt = (1 - b2 ** n).sqrt()

        decayed = [params[k] for k in names if self.decay_mask(k, params[k])]
        if self.weight_decay and decayed:
            torch._foreach_mul_(decayed, cast(1 - lr * self.weight_decay))
        torch._foreach_lerp_(m, g, 1 - self.b1)
        torch._foreach_mul_(v, cast(b2))
        if isinstance(self.b2, Schedule):  # _foreach_addcmul_ scales only by a python number
            torch._foreach_addcmul_(v, torch._foreach_mul(g, cast(1 - b2)), g)
        else:
            torch._foreach_addcmul_(v, g, g, value=1 - self.b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, cast(bias2_sqrt))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_div_(denom, cast(-step_size))  # p += mu / denom = -step_size * mu / (...)
        torch._foreach_addcdiv_(p, m, denom)

        count = state.count.add_(1) if inplace else state.count + 1
        return params, AdamState(count=count, mu=mu, nu=nu, skipped=state.skipped), info


def adamw(lr: float | Schedule, **kw) -> AdamW:
    return AdamW(lr=lr, **kw)


def _check_keys(grads: dict[str, Tensor], params: dict[str, Tensor]) -> None:
    if not params:
        raise ValueError("AdamW.update: params is empty")
    missing, extra = params.keys() - grads.keys(), grads.keys() - params.keys()
    if missing or extra:
        raise ValueError(f"grads must have the same keys as params; missing: {sorted(missing)}, "
                         f"extra: {sorted(extra)}")
    for k, p in params.items():
        if grads[k].shape != p.shape or grads[k].dtype != p.dtype:
            raise ValueError(f"grads[{k!r}] is {grads[k].dtype}{list(grads[k].shape)}, "
                             f"params[{k!r}] is {p.dtype}{list(p.shape)}")
