"""``Plan``: how a step is spread over processes. A frozen value: printable, comparable, stored with
checkpoints and metrics."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The mesh axes a parameter dimension may be split over (evo.sharding.mesh.AXIS_ORDER has them
# all): data-parallel axes belong to ZeRO and ``pp`` to pipeline stages. The planner implements
# ``tp`` today; a rule naming another is valid here and rejected by ``shard``.
MESH_AXES = ("tp", "ep", "cp", "sp")

# A rule maps a logical axis to a mesh axis, a tuple of mesh axes (the dimension split over their
# product, the first one major) or None (replicated).
Rule = tuple[str, "str | tuple[str, ...] | None"]

# Weights are [in, out]: splitting an output axis ("qkv", "mlp", "vocab" of the head) makes a
# column-parallel matmul, splitting an input axis ("heads", "mlp" of w2) a row-parallel one, and
# "vocab" of the embedding a vocab-parallel lookup. A logical axis with no rule (the hidden size
# "embed", a norm weight's axis) is replicated.
DEFAULT_RULES: tuple[Rule, ...] = (("vocab", "tp"), ("qkv", "tp"), ("heads", "tp"), ("mlp", "tp"))


@dataclass(frozen=True)
class Plan:
    """``dp``: data-parallel degree (-1: whatever the world size leaves after ``tp``). ``tp``:
    tensor-parallel degree. ``zero``: ZeRO stage 0-3 over the data-parallel ranks. ``zero_group``:
    shard the ZeRO state inside groups of this many data-parallel ranks and replicate across groups
    (-1: the whole data-parallel group). ``sequence_parallel``: split norm regions on the sequence
    inside the tensor-parallel group. ``rules``: logical axis → mesh axis, tuple of mesh axes, or
    None (replicated). ``bucket_mb``: data-parallel gradients are reduced in buckets of this many
    MiB, each started while backward still runs (0: one collective per parameter after
    backward)."""
    dp: int = -1
    tp: int = 1
    zero: int = 0
    zero_group: int = -1
    sequence_parallel: bool = False
    rules: tuple[Rule, ...] = DEFAULT_RULES
    bucket_mb: float = 25.0

    def __post_init__(self):
        for name in ("dp", "tp", "zero_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or (v <= 0 and v != -1) or \
                    (name == "tp" and v == -1):
                allowed = "a positive integer" + (" or -1" if name != "tp" else "")
                raise ValueError(f"plan.{name} must be {allowed}, got {v!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"plan.zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(f"plan.sequence_parallel must be true or false, got "
                             f"{self.sequence_parallel!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("plan.sequence_parallel needs plan.tp > 1")
        if self.dp != -1 and self.zero_group != -1 and self.dp % self.zero_group:
            raise ValueError(f"plan.zero_group={self.zero_group} must divide plan.dp={self.dp}")
        if not isinstance(self.bucket_mb, (int, float)) or isinstance(self.bucket_mb, bool) or \
                self.bucket_mb < 0:
            raise ValueError(f"plan.bucket_mb must be a number >= 0, got {self.bucket_mb!r}")
        _check_rules(self.rules)

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        """The mesh axes a logical axis is split over, major first (``()``: replicated)."""
        target = dict(self.rules).get(logical)
        return () if target is None else (target,) if isinstance(target, str) else tuple(target)

    @property
    def world_size(self) -> int:
        if self.dp == -1:
            raise ValueError("plan.dp=-1 is resolved against a world size first (Plan.resolve)")
        return self.dp * self.tp

    def resolve(self, world_size: int) -> "Plan":
        """This plan with ``dp`` and ``zero_group`` filled in for ``world_size`` processes."""
        if world_size % self.tp:
            raise ValueError(f"plan.tp={self.tp} must divide the world size {world_size}")
        dp = world_size // self.tp if self.dp == -1 else self.dp
        if dp * self.tp != world_size:
            raise ValueError(f"plan.dp={self.dp} × plan.tp={self.tp} = {dp * self.tp} processes, "
                             f"but the world size is {world_size}")
        zero_group = dp if self.zero_group == -1 else self.zero_group
        if dp % zero_group:
            raise ValueError(f"plan.zero_group={zero_group} must divide plan.dp={dp}")
        return dataclasses.replace(self, dp=dp, zero_group=zero_group)


def _check_rules(rules) -> None:
    if not isinstance(rules, tuple):
        raise ValueError(f"plan.rules must be a tuple of (logical_axis, mesh_axes) rules, got "
                         f"{rules!r}")
    seen = set()
    for rule in rules:
        if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"plan.rules: each rule must be (logical_axis, mesh_axes), got "
                             f"{rule!r}")
        logical, target = rule
        names = (target,) if isinstance(target, str) else target
        if target is not None and not (isinstance(names, tuple) and names and
                                       all(isinstance(a, str) for a in names)):
            raise ValueError(f"plan.rules: logical axis {logical!r} maps to {target!r}; a rule "
                             "maps to a mesh axis name, a non-empty tuple of them, or None")
        for a in names or ():
            if a not in MESH_AXES:
                raise ValueError(f"plan.rules: logical axis {logical!r} maps to unknown mesh "
                                 f"axis {a!r}; mesh axes are {MESH_AXES} or None")
        if names and len(set(names)) != len(names):
            raise ValueError(f"plan.rules: logical axis {logical!r} maps to {target!r}, which "
                             "names a mesh axis twice")
        if logical in seen:
            raise ValueError(f"plan.rules: logical axis {logical!r} has two rules")
        seen.add(logical)
