"""``Plan``: how a step is spread over processes. A frozen value: printable, comparable, stored with
checkpoints and metrics."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """``dp``: data-parallel degree (-1: whatever the world size leaves after ``tp``). ``tp``:
    tensor-parallel degree. ``zero``: ZeRO stage 0-3 over the data-parallel ranks. ``zero_group``:
    shard the ZeRO state inside groups of this many data-parallel ranks and replicate across groups
    (-1: the whole data-parallel group). ``sequence_parallel``: split norm regions on the sequence
    inside the tensor-parallel group."""
    dp: int = -1
    tp: int = 1
    zero: int = 0
    zero_group: int = -1
    sequence_parallel: bool = False

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
