"""``Plan``: how a step is spread over processes. A frozen value: printable, comparable, stored with
checkpoints and metrics."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MESH_AXES = ("tp",)  # the mesh axes a logical axis may map to; data-parallel axes are ZeRO's

# Logical axis -> mesh axis (None: replicated). Weights are [in, out]: splitting an output axis
# ("qkv", "mlp", "vocab" of the head) makes a column-parallel matmul, splitting an input axis
# ("heads", "mlp" of w2) a row-parallel one, and "vocab" of the embedding a vocab-parallel lookup.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tp"), ("qkv", "tp"), ("heads", "tp"), ("mlp", "tp"), ("embed", None), ("norm", None))


@dataclass(frozen=True)
class Plan:
    """``dp``: data-parallel degree (-1: whatever the world size leaves after ``tp``). ``tp``:
    tensor-parallel degree. ``zero``: ZeRO stage 0-3 over the data-parallel ranks. ``zero_group``:
    shard the ZeRO state inside groups of this many data-parallel ranks and replicate across groups
    (-1: the whole data-parallel group). ``sequence_parallel``: split norm regions on the sequence
    inside the tensor-parallel group. ``rules``: logical axis → mesh axis (None: replicated).
    ``bucket_mb``: data-parallel gradients are reduced in buckets of this many MiB, each started
    while backward still runs (0: one collective per parameter after backward)."""
    dp: int = -1
    tp: int = 1
    zero: int = 0
    zero_group: int = -1
    sequence_parallel: bool = False
    rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES
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
        seen = set()
        for rule in self.rules:
            if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
                raise ValueError(f"plan.rules: each rule must be (logical_axis, mesh_axis), got "
                                 f"{rule!r}")
            if rule[1] is not None and rule[1] not in MESH_AXES:
                raise ValueError(f"plan.rules: logical axis {rule[0]!r} maps to unknown mesh axis "
                                 f"{rule[1]!r}; mesh axes are {MESH_AXES} or None")
            if rule[0] in seen:
                raise ValueError(f"plan.rules: logical axis {rule[0]!r} has two rules")
            seen.add(rule[0])

    def mesh_axis(self, logical: str) -> str | None:
        """The mesh axis a logical axis is split over (None: replicated)."""
        return dict(self.rules).get(logical)

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
