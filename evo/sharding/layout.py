"""Where every parameter lives under a plan: pure functions of (plan, logical axes, shapes).

Two splits compose. Tensor parallelism splits the dimension whose logical axis the plan's rules map
to ``"tp"`` into ``tp`` contiguous chunks. ZeRO then splits that tensor-parallel piece on its first
dimension into ``zero_group`` chunks, padding the first dimension with zeros to a multiple of
``zero_group`` (padding rows get zero gradients and stay zero). Everything here is arithmetic on
shapes: it runs for a world of 16384 ranks without allocating anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evo.sharding.plan import DEFAULT_RULES, Plan


@dataclass(frozen=True)
class ParamLayout:
    shape: tuple[int, ...]            # global logical shape
    tp_dim: int | None                # the dimension split over tp, if any
    local_shape: tuple[int, ...]      # this tensor-parallel rank's piece
    shard_shape: tuple[int, ...]      # one ZeRO shard of the piece (first dim padded, then split)


def tp_dim(plan: Plan, axes: tuple[str, ...], name: str = "") -> int | None:
    dims = [i for i, a in enumerate(axes) if plan.mesh_axis(a) == "tp"]
    if len(dims) > 1:
        raise ValueError(f"plan.rules split {name} {axes} over tp on {len(dims)} dimensions; "
                         "at most one dimension of a parameter may be split over a mesh axis")
    return dims[0] if dims else None


def param_layout(plan: Plan, shape: tuple[int, ...], axes: tuple[str, ...], name: str = ""
                 ) -> ParamLayout:
    """``plan`` must be resolved (``Plan.resolve``)."""
    d = tp_dim(plan, axes, name)
    local = list(shape)
    if d is not None:
        if shape[d] % plan.tp:
            raise ValueError(f"plan.tp={plan.tp} must divide dimension {d} ({axes[d]!r}) of "
                             f"{name}, which has size {shape[d]}")
        local[d] //= plan.tp
    shard = list(local)
    if plan.zero > 0 and local:
        shard[0] = math.ceil(local[0] / plan.zero_group)
    return ParamLayout(tuple(shape), d, tuple(local), tuple(shard))


def check_rules(plan: Plan, model_axes: dict[str, tuple[str, ...]]) -> None:
    """Every rule names a logical axis the model uses, and every axis the model uses has a rule."""
    used = {a for ax in model_axes.values() for a in ax}
    ruled = {r[0] for r in plan.rules}
    unknown = sorted(ruled - used)
    if unknown:
        raise ValueError(f"plan.rules: logical axis {unknown[0]!r} is not used by the model "
                         f"(its axes are {sorted(used)})")
    missing = sorted(used - ruled)
    if missing:
        raise ValueError(f"plan.rules: the model's logical axis {missing[0]!r} has no rule")


def model_layouts(plan: Plan, cfg) -> dict[str, ParamLayout]:
    """Every parameter's layout for a LLaMA-family ``cfg``, after checking that the plan fits the
    model: tp divides the heads, the kv heads, the ffn size and the vocabulary."""
    from evo.models import llama  # sharding stands above models; imported here to keep it optional
    specs = llama.param_specs(cfg)
    check_rules(plan, {k: s.axes for k, s in specs.items()})
    if plan.tp > 1:
        for field, value in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.kv_heads),
                             ("intermediate_size", cfg.intermediate_size),
                             ("vocab_size", cfg.vocab_size)):
            if value % plan.tp:
                raise ValueError(f"plan.tp={plan.tp} must divide model.{field}={value}")
        # The tensor-parallel regions pair a column- with a row-parallel matmul and end in a
        # vocab-parallel head: another split would sum replicated results tp times.
        used = {a for s in specs.values() for a in s.axes}
        for axis, mesh_axis in DEFAULT_RULES:
            if axis in used and plan.mesh_axis(axis) != mesh_axis:
                raise ValueError(f"plan.rules: with plan.tp={plan.tp} logical axis {axis!r} must "
                                 f"map to {mesh_axis!r}, not {plan.mesh_axis(axis)!r}")
    return {k: param_layout(plan, s.shape, s.axes, k) for k, s in specs.items()}


def nbytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
