"""Dynamic loss scaling for float16 compute, with the schedule of InternEvo's ``grad_scaler``.

float16 holds magnitudes down to 6e-8 (subnormal) and up to 65504. Gradients of a mean over a
large global batch are small (the loss is divided by the number of labelled tokens of the whole
batch), and many fall below float16's range and flush to zero. The step therefore multiplies the
loss by ``scale`` before backward, so the float16 gradients are ``scale`` times larger, and divides
the fp32 gradients by ``scale`` before the gradient norm, clipping and the update. A scale too
large overflows: the global gradient norm is then not finite, the optimizer skips the step (and
counts it in ``opt_state.skipped``), and the schedule below lowers the scale. The global norm is
reduced over every rank by every plan, so every rank takes the same decision.

The schedule (``LossScale.update``), as InternEvo's ``DynamicGradScaler``:

- an overflow resets the growth counter and adds one to the hysteresis counter; once that counter
  reaches ``hysteresis``, this and every further overflow multiplies the scale by
  ``backoff_factor`` (not below ``min_scale``);
- ``growth_interval`` steps in a row without overflow multiply the scale by ``growth_factor`` (not
  above ``max_scale``) and reset both counters.

With power-of-two factors and scales, scaling and unscaling are exact in fp32, so a step with the
scaler computes the gradients of the unscaled loss, less only what float16 would have lost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


class ScalerState(NamedTuple):
    """The scaler's part of the train state (0-dim tensors, saved in checkpoints)."""
    scale: torch.Tensor            # fp32: the factor the loss is multiplied by
    growth_step: torch.Tensor      # int64: steps without overflow since the last change
    hysteresis_step: torch.Tensor  # int64: overflows since the scale last grew


def _positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"LossScale.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class LossScale:
    """Dynamic loss scaling; the defaults are InternEvo's ``grad_scaler`` defaults."""
    initial_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    min_scale: float = 1.0
    max_scale: float = 2.0 ** 24
    hysteresis: int = 2

    def __post_init__(self):
        for name in ("initial_scale", "growth_factor", "backoff_factor", "min_scale", "max_scale"):
            _positive(name, getattr(self, name))
        if self.growth_factor <= 1:
            raise ValueError(f"LossScale.growth_factor must be > 1, got {self.growth_factor!r}")
        if self.backoff_factor >= 1:
            raise ValueError(f"LossScale.backoff_factor must be in (0, 1), got "
                             f"{self.backoff_factor!r}")
        if not self.min_scale <= self.initial_scale <= self.max_scale:
            raise ValueError(f"LossScale.initial_scale must be in [min_scale={self.min_scale}, "
                             f"max_scale={self.max_scale}], got {self.initial_scale!r}")
        for name in ("growth_interval", "hysteresis"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LossScale.{name} must be an integer >= 1, got {v!r}")

    def init(self, device=None) -> ScalerState:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return ScalerState(torch.tensor(float(self.initial_scale), dtype=torch.float32,
                                        device=device), zero, zero.clone())

    def update(self, state: ScalerState, overflow: torch.Tensor) -> ScalerState:
        """The state after a step; ``overflow``: 0-dim bool, the step's gradient norm was not
        finite. Tensor ops only (no host sync)."""
        hysteresis = state.hysteresis_step + overflow.to(torch.int64)
        growth = torch.where(overflow, torch.zeros_like(state.growth_step), state.growth_step + 1)
        grow = growth >= self.growth_interval
        back = overflow & (hysteresis >= self.hysteresis)
        scale = torch.where(back, (state.scale * self.backoff_factor).clamp(min=self.min_scale),
                            torch.where(grow, (state.scale * self.growth_factor)
                                        .clamp(max=self.max_scale), state.scale))
        zero = torch.zeros_like(growth)
        return ScalerState(scale, torch.where(grow, zero, growth),
                           torch.where(grow, zero, hysteresis))


def unscale_(grads: dict[str, torch.Tensor], state: ScalerState) -> dict[str, torch.Tensor]:
    """Divide the (fp32) gradients by the scale in place; an inf or NaN stays one."""
    values = list(grads.values())
    if values:
        torch._foreach_mul_(values, (1.0 / state.scale.double()).to(values[0].dtype))
    return grads
