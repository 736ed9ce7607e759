"""A ``Mesh``: this process's coordinates under a plan, and the process groups of its axes.

Ranks are laid out ``rank = dp_index · tp + tp_index`` (tensor parallelism innermost, inside a
node), and the data-parallel index splits as ``dp_index = replica · zero_group + zero_index``
(hybrid ZeRO shards inside groups of ``zero_group`` consecutive data-parallel ranks and replicates
across them). Axes: ``tp``, ``dp``, ``zero``, ``replica``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from evo.sharding.plan import Plan

AXES = ("tp", "dp", "zero", "replica")


@dataclass(frozen=True)
class Mesh:
    plan: Plan                                 # resolved: dp and zero_group filled in
    rank: int                                  # this process's rank inside the mesh
    groups: dict = field(default_factory=dict, compare=False)   # axis -> ProcessGroup (size > 1)

    @property
    def sizes(self) -> dict[str, int]:
        p = self.plan
        return {"tp": p.tp, "dp": p.dp, "zero": p.zero_group, "replica": p.dp // p.zero_group}

    @property
    def coords(self) -> dict[str, int]:
        return coords(self.plan, self.rank)


def coords(plan: Plan, rank: int) -> dict[str, int]:
    tp_index, dp_index = rank % plan.tp, rank // plan.tp
    return {"tp": tp_index, "dp": dp_index, "zero": dp_index % plan.zero_group,
            "replica": dp_index // plan.zero_group}


def members(plan: Plan, rank: int, axis: str) -> list[int]:
    """Mesh ranks sharing every coordinate of ``rank`` except ``axis`` (``dp`` spans both
    ``zero`` and ``replica``)."""
    c = coords(plan, rank)
    if axis == "tp":
        return [c["dp"] * plan.tp + t for t in range(plan.tp)]
    if axis == "dp":
        return [d * plan.tp + c["tp"] for d in range(plan.dp)]
    if axis == "zero":
        base = c["replica"] * plan.zero_group
        return [(base + z) * plan.tp + c["tp"] for z in range(plan.zero_group)]
    if axis == "replica":
        return [(r * plan.zero_group + c["zero"]) * plan.tp + c["tp"]
                for r in range(plan.dp // plan.zero_group)]
    raise ValueError(f"unknown mesh axis {axis!r}; axes are {AXES}")


def build_mesh(plan: Plan, ranks: list[int] | None = None) -> Mesh | None:
    """The mesh of ``plan`` over ``ranks`` (default: every process), or None for a process not in
    ``ranks``. With no process group initialised, a mesh of one process. Every process of the
    world calls it (creating a process group is collective over the world), members or not.
    """
    if not dist.is_initialized():
        return Mesh(plan.resolve(1), 0)
    ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
    plan = plan.resolve(len(ranks))
    me = dist.get_rank()
    groups = {}
    for axis in AXES:
        seen = set()
        for r in range(len(ranks)):  # every group of this axis, in the same order on every process
            group = tuple(ranks[m] for m in members(plan, r, axis))
            if len(group) == 1 or group in seen:
                continue
            seen.add(group)
            pg = dist.new_group(list(group))
            if me in group:
                groups[axis] = pg
    return Mesh(plan, ranks.index(me), groups) if me in ranks else None
