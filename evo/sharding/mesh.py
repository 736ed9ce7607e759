"""A ``Mesh``: this process's coordinates under a plan, and the process groups of its axes.

A mesh is an ordered list of named **base axes** with sizes, outermost first; a rank is the
mixed-radix number of its base coordinates (the last axis varies fastest). A **derived axis** spans
several base axes: its coordinate is the mixed-radix number of theirs, in mesh order. Every axis's
process groups are the sets of ranks that agree on every base coordinate outside that axis.

Base axes appear in the order of ``AXIS_ORDER``. Today a plan uses ``replica``, ``zero`` and
``tp``, so ``rank = dp_index · tp + tp_index`` (tensor parallelism innermost, inside a node) with
the derived ``dp = (replica, zero)``: ``dp_index = replica · zero_group + zero_index`` (hybrid ZeRO
shards inside groups of ``zero_group`` consecutive data-parallel ranks and replicates across
them). ``pp``, ``ep``, ``cp`` and ``sp`` are reserved where pipeline stages (outermost), expert
parallelism (a factor of the data-parallel ranks), ring context parallelism and Ulysses sequence
parallelism (inside, next to ``tp``) take their place, so that ``dp = world / (pp·tp·sp·cp)``.
With ``ep = 1`` the mesh has no ``ep`` axis (``expert_mesh_shape`` places it when ``ep > 1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.distributed as dist

from evo.sharding.plan import Plan

AXIS_ORDER = ("pp", "replica", "zero", "ep", "cp", "sp", "tp")   # base axes, outermost first


@dataclass(frozen=True)
class MeshShape:
    """Named axes and sizes. ``base``: ``(name, size)`` outermost first, names in the order of
    ``AXIS_ORDER``. ``derived``: ``(name, base axis names)`` for axes spanning several base axes.
    Pure arithmetic: a world of any size costs nothing until its groups are listed."""
    base: tuple[tuple[str, int], ...]
    derived: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self):
        names = [n for n, _ in self.base]
        order = [a for a in AXIS_ORDER if a in names]
        if names != order:
            raise ValueError(f"mesh axes {names} must be distinct names from {AXIS_ORDER}, in "
                             "that order (outermost first)")
        for n, s in self.base:
            if not isinstance(s, int) or isinstance(s, bool) or s < 1:
                raise ValueError(f"mesh axis {n!r} must have a positive integer size, got {s!r}")
        for n, parts in self.derived:
            if n in names or not parts or len(set(parts)) != len(parts) or \
                    any(p not in names for p in parts):
                raise ValueError(f"derived mesh axis {n!r} = {parts!r} must be a new name over "
                                 f"distinct base axes of {names}")

    @property
    def world_size(self) -> int:
        return math.prod(s for _, s in self.base)

    @property
    def sizes(self) -> dict[str, int]:
        """Every axis's size, base and derived."""
        base = dict(self.base)
        return {**base, **{n: math.prod(base[p] for p in parts) for n, parts in self.derived}}

    def parts(self, axis: str) -> tuple[str, ...]:
        """The base axes ``axis`` spans, in mesh order."""
        derived = dict(self.derived)
        if axis in derived:
            return tuple(a for a, _ in self.base if a in derived[axis])
        if axis in dict(self.base):
            return (axis,)
        raise ValueError(f"unknown mesh axis {axis!r}; axes are {tuple(self.sizes)}")

    def coords(self, rank: int) -> dict[str, int]:
        """Every axis's coordinate of ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a mesh of {self.world_size} processes")
        base, rest = {}, rank
        for name, size in reversed(self.base):
            rest, base[name] = divmod(rest, size)
        return {**{n: base[n] for n, _ in self.base},
                **{n: self._number(base, self.parts(n)) for n, _ in self.derived}}

    def rank(self, coords: dict[str, int]) -> int:
        """The rank at these base coordinates (inverse of ``coords``)."""
        return self._number(coords, tuple(n for n, _ in self.base))

    def members(self, rank: int, axis: str) -> list[int]:
        """The ranks sharing every base coordinate of ``rank`` outside ``axis``, ordered by their
        ``axis`` coordinate."""
        parts, c, sizes = self.parts(axis), self.coords(rank), dict(self.base)
        out = []
        for i in range(math.prod(sizes[p] for p in parts)):
            for p in reversed(parts):
                i, c[p] = divmod(i, sizes[p])
            out.append(self.rank(c))
        return out

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ``axis``: a partition of the ranks, in order of their first rank."""
        return [self.members(r, axis) for r in range(self.world_size)
                if all(self.coords(r)[p] == 0 for p in self.parts(axis))]

    def _number(self, coords: dict[str, int], parts: tuple[str, ...]) -> int:
        sizes, n = dict(self.base), 0
        for p in parts:
            n = n * sizes[p] + coords[p]
        return n


def mesh_shape(plan: Plan) -> MeshShape:
    """The mesh of a resolved plan: ``pp × replica × zero × cp × sp × tp`` with the derived
    ``dp = (replica, zero)`` (and ``seq = (cp, sp)`` under ``plan.weight_parallel``); with
    ``plan.ep > 1``, ``pp × replica × zero × ep × cp × sp × tp``
    (see ``expert_mesh_shape``)."""
    if plan.ep > 1:
        return expert_mesh_shape(plan)
    return MeshShape(base=(("pp", plan.pp), ("replica", plan.dp // plan.zero_group),
                           ("zero", plan.zero_group), ("cp", plan.cp), ("sp", plan.sp),
                           ("tp", plan.tp)),
                     derived=(("dp", ("replica", "zero")), *sequence_axis(plan)))


def sequence_axis(plan: Plan) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """With ``plan.weight_parallel``, the derived ``seq = (cp, sp)``: the ranks sharing one
    sequence, over which each block's weights are sharded (``seq`` index ``cp · sp_size + sp``)."""
    return (("seq", ("cp", "sp")),) if plan.weight_parallel else ()


def expert_mesh_shape(plan: Plan) -> MeshShape:
    """Expert parallelism splits the data-parallel ranks: ``ep`` (innermost of them, so an
    expert-parallel group is ``ep`` consecutive data-parallel ranks) × ``zero`` (``zero_group``
    ranks holding the same experts) × ``replica``. Derived axes: ``dp = (replica, zero, ep)``,
    every data-parallel rank, over which non-expert gradients are summed; ``edp = (replica,
    zero)``, the ranks holding the same experts, over which expert gradients are summed."""
    return MeshShape(base=(("pp", plan.pp),
                           ("replica", plan.dp // (plan.zero_group * plan.ep)),
                           ("zero", plan.zero_group), ("ep", plan.ep), ("cp", plan.cp),
                           ("sp", plan.sp), ("tp", plan.tp)),
                     derived=(("dp", ("replica", "zero", "ep")), ("edp", ("replica", "zero"))))


@dataclass(frozen=True)
class Mesh:
    plan: Plan                                 # resolved: dp and zero_group filled in
    rank: int                                  # this process's rank inside the mesh
    groups: dict = field(default_factory=dict, compare=False)   # axis -> ProcessGroup (size > 1)

    @property
    def shape(self) -> MeshShape:
        return mesh_shape(self.plan)

    @property
    def sizes(self) -> dict[str, int]:
        return self.shape.sizes

    @property
    def coords(self) -> dict[str, int]:
        return self.shape.coords(self.rank)


def coords(plan: Plan, rank: int) -> dict[str, int]:
    return mesh_shape(plan).coords(rank)


def members(plan: Plan, rank: int, axis: str) -> list[int]:
    """Mesh ranks sharing every coordinate of ``rank`` except ``axis`` (``dp`` spans both
    ``zero`` and ``replica``)."""
    return mesh_shape(plan).members(rank, axis)


def build_mesh(plan: Plan, ranks: list[int] | None = None) -> Mesh | None:
    """The mesh of ``plan`` over ``ranks`` (default: every process), or None for a process not in
    ``ranks``. With no process group initialised, a mesh of one process. Every process of the
    world calls it (creating a process group is collective over the world), members or not.
    """
    if not dist.is_initialized():
        return Mesh(plan.resolve(1), 0)
    ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
    plan = plan.resolve(len(ranks))
    me, shape = dist.get_rank(), mesh_shape(plan)
    groups = {}
    for axis, size in shape.sizes.items():
        if size == 1:
            continue
        for g in shape.groups(axis):  # every group of this axis, in the same order everywhere
            group = [ranks[m] for m in g]
            pg = dist.new_group(group)
            if me in group:
                groups[axis] = pg
    return Mesh(plan, ranks.index(me), groups) if me in ranks else None
