"""Where every parameter lives under a plan: pure functions of (plan, logical axes, shapes).

Two splits compose. The plan's rules split each dimension whose logical axis they map to mesh axes
(``"tp"`` today) into contiguous chunks, one per rank of those axes. ZeRO then splits that piece on
its first dimension into ``zero_group`` chunks, padding the first dimension with zeros to a
multiple of ``zero_group`` (padding rows get zero gradients and stay zero); under
``plan.weight_parallel`` (which takes no ZeRO) the piece is split so over the ``cp · sp`` ranks of
the sequence group instead. Everything here is arithmetic on
shapes: it runs for a world of 16384 ranks without allocating anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evo.sharding.mesh import mesh_shape
from evo.sharding.plan import DEFAULT_RULES, Plan


@dataclass(frozen=True)
class ParamLayout:
    shape: tuple[int, ...]               # global logical shape
    split: tuple[tuple[str, ...], ...]   # per dimension: the mesh axes splitting it, major first
    local_shape: tuple[int, ...]         # this rank's piece after every split
    shard_shape: tuple[int, ...]         # one ZeRO shard of the piece (first dim padded, then split)

    @property
    def tp_dim(self) -> int | None:
        """The dimension split over ``tp``, if any."""
        return next((d for d, axes in enumerate(self.split) if "tp" in axes), None)

    @property
    def ep_dim(self) -> int | None:
        """The dimension split over ``ep`` (the experts of an expert parameter), if any."""
        return next((d for d, axes in enumerate(self.split) if "ep" in axes), None)

    def offset(self, coords: dict[str, int], sizes: dict[str, int]) -> tuple[int, ...]:
        """Where the piece of the rank at mesh ``coords`` starts in the global array: along each
        dimension, the mixed-radix number of its coordinates on the splitting axes (major first)
        times the piece's size. Axes missing from ``coords``/``sizes`` have size 1."""
        out = []
        for d, axes in enumerate(self.split):
            index = 0
            for a in axes:
                index = index * sizes.get(a, 1) + coords.get(a, 0)
            out.append(index * self.local_shape[d])
        return tuple(out)


def param_layout(plan: Plan, shape: tuple[int, ...], axes: tuple[str, ...], name: str = "",
                 sizes: dict[str, int] | None = None) -> ParamLayout:
    """Dimension ``d`` is split over the mesh axes the plan's rules map ``axes[d]`` to, in
    contiguous chunks (``sizes``: mesh axis sizes, default the mesh of ``plan``, which must be
    resolved; an axis not in the mesh has size 1). A mesh axis splits one dimension at most."""
    sizes = mesh_shape(plan).sizes if sizes is None else sizes
    split = tuple(logical_mesh_axes(plan, a) for a in axes)
    seen = {}
    for d, mesh_axes in enumerate(split):
        for m in mesh_axes:
            if m in seen:
                raise ValueError(f"plan.rules split {name} {axes} over mesh axis {m!r} on "
                                 f"dimensions {seen[m]} and {d}; a mesh axis may split one "
                                 "dimension of a parameter")
            seen[m] = d
    local = list(shape)
    for d, mesh_axes in enumerate(split):
        n = math.prod(sizes.get(m, 1) for m in mesh_axes)
        if shape[d] % n:
            degrees = " × ".join(f"{m}={sizes.get(m, 1)}" for m in mesh_axes)
            what = f"plan.{degrees}" if len(mesh_axes) == 1 else f"mesh axes {degrees} = {n}"
            raise ValueError(f"{what} must divide dimension {d} ({axes[d]!r}) of {name}, which "
                             f"has size {shape[d]}")
        local[d] //= n
    shard = list(local)
    if plan.zero > 0 and local:
        shard[0] = math.ceil(local[0] / plan.zero_group)
    elif plan.weight_parallel and local:   # one shard per rank of the sequence group (``seq``)
        shard[0] = math.ceil(local[0] / (plan.cp * plan.sp))
    return ParamLayout(tuple(shape), split, tuple(local), tuple(shard))


EXPERT_AXIS = "expert"   # the logical axis of a parameter's experts: split over "ep" by default


def logical_mesh_axes(plan: Plan, logical: str) -> tuple[str, ...]:
    """The mesh axes ``logical`` is split over: the plan's rule, and for ``"expert"`` without a
    rule, ``("ep",)`` (a parameter holding every expert is sharded over expert parallelism)."""
    if logical == EXPERT_AXIS and logical not in dict(plan.rules):
        return ("ep",)
    return plan.mesh_axes(logical)


def check_rules(plan: Plan, model_axes: dict[str, tuple[str, ...]]) -> None:
    """Every rule names a logical axis the model uses (an axis with no rule is replicated)."""
    used = {a for ax in model_axes.values() for a in ax}
    ruled = {r[0] for r in plan.rules}
    unknown = sorted(ruled - used)
    if unknown:
        raise ValueError(f"plan.rules: logical axis {unknown[0]!r} is not used by the model "
                         f"(its axes are {sorted(used)})")


def model_layouts(plan: Plan, cfg) -> dict[str, ParamLayout]:
    """Every parameter's layout for the config of any registered model family, after checking
    that the plan fits the model: tp divides every size the family splits (heads, kv heads, ffn
    size, vocabulary, ...)."""
    from evo import models  # sharding stands above models; imported here to keep it optional
    fam = models.family_of(cfg)
    specs = fam.param_specs(cfg)
    check_rules(plan, {k: s.axes for k, s in specs.items()})
    if plan.tp > 1:
        for field, value in fam.tp_divisors(cfg).items():
            if value % plan.tp:
                raise ValueError(f"plan.tp={plan.tp} must divide {field}={value}")
        # The tensor-parallel regions pair a column- with a row-parallel matmul and end in a
        # vocab-parallel head: another split would sum replicated results tp times.
        used = {a for s in specs.values() for a in s.axes}
        for axis, mesh_axis in DEFAULT_RULES:
            want = () if mesh_axis is None else (mesh_axis,)
            if axis in used and plan.mesh_axes(axis) != want:
                raise ValueError(f"plan.rules: with plan.tp={plan.tp} logical axis {axis!r} must "
                                 f"map to {mesh_axis!r}, not {plan.mesh_axes(axis) or None!r}")
    _check_experts(plan, specs)
    return {k: param_layout(plan, s.shape, s.axes, k) for k, s in specs.items()}


def _check_experts(plan: Plan, specs) -> None:
    """With ``ep > 1``, experts are split over ``ep`` (the step's dispatch hands each rank the
    tokens of its own experts), and ``ep`` divides their number; a model without experts has
    nothing to split."""
    if plan.ep == 1:
        return
    experts = {k: s.shape[s.axes.index(EXPERT_AXIS)] for k, s in specs.items()
               if EXPERT_AXIS in s.axes}
    if not experts:
        raise ValueError(f"plan.ep={plan.ep}: the model has no experts (no parameter has the "
                         f"logical axis {EXPERT_AXIS!r})")
    if logical_mesh_axes(plan, EXPERT_AXIS) != ("ep",):
        raise ValueError(f"plan.rules: with plan.ep={plan.ep} logical axis {EXPERT_AXIS!r} must "
                         f"map to 'ep', not {plan.mesh_axes(EXPERT_AXIS) or None!r}")
    for name, n in experts.items():
        if n % plan.ep:
            raise ValueError(f"plan.ep={plan.ep} must divide the number of experts {n} "
                             f"(model.num_experts; parameter {name})")


def nbytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
