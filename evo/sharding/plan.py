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


SCHEDULES = ("1f1b", "interleaved", "zbh1", "zbv")


@dataclass(frozen=True)
class Plan:
    """How one training step is spread over ``pp · dp · cp · sp · tp`` processes.

    ``dp``: data-parallel degree (-1: whatever the world size leaves after ``pp · tp · sp · cp``).
    ``tp``: tensor-parallel degree. ``zero``: ZeRO stage 0-3 over the data-parallel ranks.
    ``zero_group``: shard the ZeRO state inside groups of this many data-parallel ranks and
    replicate across groups (-1: the whole data-parallel group; with ``ep > 1`` a group holds the
    same experts, so it divides ``dp / ep``, its default). ``sequence_parallel``: split norm
    regions on the sequence inside the tensor-parallel group. ``rules``: logical axis → mesh axis,
    tuple of mesh axes, or None (replicated). ``bucket_mb``: data-parallel gradients are reduced in
    buckets of this many MiB, each started while backward still runs (0: one collective per
    parameter after backward).

    Pipeline: ``pp`` stages over ranks (outermost), run by ``pp_schedule`` (``"1f1b"``,
    ``"interleaved"``, ``"zbh1"``, ``"zbv"``) with ``pp_virtual`` stages per rank (interleaved:
    ≥ 2; zbv: 2) and ``pp_layers`` blocks per stage (None: balanced by cost). Long context:
    ``sp`` Ulysses degree (the sequence split over the whole layer, all-to-all around attention),
    ``cp`` ring-attention degree; the ranks of an sp / cp group share one sequence.
    ``weight_parallel``: each block's weights sharded over the sequence group and gathered per
    block. Experts: ``ep`` expert-parallel degree, a factor of the data-parallel ranks (each
    still takes its own data)."""
    dp: int = -1
    tp: int = 1
    zero: int = 0
    zero_group: int = -1
    sequence_parallel: bool = False
    rules: tuple[Rule, ...] = DEFAULT_RULES
    bucket_mb: float = 25.0
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual: int = 1
    pp_layers: tuple[int, ...] | None = None
    sp: int = 1
    cp: int = 1
    weight_parallel: bool = False
    ep: int = 1

    def __post_init__(self):
        for name in ("dp", "tp", "zero_group", "pp", "pp_virtual", "sp", "cp", "ep"):
            v = getattr(self, name)
            minus_one = name in ("dp", "zero_group")
            if not isinstance(v, int) or isinstance(v, bool) or (v <= 0 and not
                                                                 (minus_one and v == -1)):
                allowed = "a positive integer" + (" or -1" if minus_one else "")
                raise ValueError(f"plan.{name} must be {allowed}, got {v!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"plan.zero must be 0, 1, 2 or 3, got {self.zero!r}")
        for name in ("sequence_parallel", "weight_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"plan.{name} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("plan.sequence_parallel needs plan.tp > 1")
        if self.weight_parallel and self.sp * self.cp == 1:
            raise ValueError("plan.weight_parallel needs a sequence group: plan.sp or plan.cp > 1")
        if self.dp != -1 and self.zero_group != -1 and self.dp % self.zero_group:
            raise ValueError(f"plan.zero_group={self.zero_group} must divide plan.dp={self.dp}")
        if self.dp != -1 and self.dp % self.ep:
            raise ValueError(f"plan.ep={self.ep} must divide plan.dp={self.dp} (expert-parallel "
                             "ranks are data-parallel ranks)")
        if not isinstance(self.bucket_mb, (int, float)) or isinstance(self.bucket_mb, bool) or \
                self.bucket_mb < 0:
            raise ValueError(f"plan.bucket_mb must be a number >= 0, got {self.bucket_mb!r}")
        self._check_pipeline()
        _check_rules(self.rules)

    def _check_pipeline(self) -> None:
        if self.pp_schedule not in SCHEDULES:
            raise ValueError(f"plan.pp_schedule must be one of {', '.join(SCHEDULES)}, got "
                             f"{self.pp_schedule!r}")
        if self.pp_schedule == "zbv" and self.pp_virtual != 2:
            raise ValueError(f"plan.pp_schedule='zbv' runs two stages per rank in a V: "
                             f"plan.pp_virtual must be 2, got {self.pp_virtual}")
        if self.pp_schedule == "interleaved" and self.pp > 1 and self.pp_virtual < 2:
            raise ValueError("plan.pp_schedule='interleaved' needs plan.pp_virtual >= 2 stages "
                             f"per rank, got {self.pp_virtual}")
        if self.pp_schedule in ("1f1b", "zbh1") and self.pp_virtual != 1:
            raise ValueError(f"plan.pp_schedule={self.pp_schedule!r} runs one stage per rank: "
                             f"plan.pp_virtual must be 1, got {self.pp_virtual}")
        if self.pp_layers is None:
            return
        layers = self.pp_layers
        if isinstance(layers, list):
            layers = tuple(layers)
            object.__setattr__(self, "pp_layers", layers)
        if not (isinstance(layers, tuple) and layers and
                all(isinstance(n, int) and not isinstance(n, bool) for n in layers)):
            raise ValueError(f"plan.pp_layers must be a tuple of block counts, one per stage, "
                             f"got {layers!r}")
        if len(layers) != self.stages:
            raise ValueError(f"plan.pp_layers has {len(layers)} entries, but plan.pp × "
                             f"plan.pp_virtual = {self.stages} stages")
        if min(layers) < 1:
            raise ValueError(f"plan.pp_layers={layers}: stage {layers.index(min(layers))} has no "
                             "block")

    @property
    def stages(self) -> int:
        """Pipeline stages: ``pp · pp_virtual``."""
        return self.pp * self.pp_virtual

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        """The mesh axes a logical axis is split over, major first (``()``: replicated)."""
        target = dict(self.rules).get(logical)
        return () if target is None else (target,) if isinstance(target, str) else tuple(target)

    @property
    def sequence_tp(self) -> int:
        """The tensor-parallel degree a layer's sequence is split over outside its attention and
        MLP: ``tp`` under sequence parallelism, else 1."""
        return self.tp if self.sequence_parallel else 1

    @property
    def sequence_split(self) -> int:
        """Processes one micro-batch's sequence is split over: ``sp · cp · sequence_tp``."""
        return self.sp * self.cp * self.sequence_tp

    @property
    def model_parallel(self) -> int:
        """Processes that share one data shard: ``pp · cp · sp · tp``."""
        return self.pp * self.cp * self.sp * self.tp

    @property
    def world_size(self) -> int:
        if self.dp == -1:
            raise ValueError("plan.dp=-1 is resolved against a world size first (Plan.resolve)")
        return self.dp * self.model_parallel

    def resolve(self, world_size: int) -> "Plan":
        """This plan with ``dp`` and ``zero_group`` filled in for ``world_size`` processes."""
        mp = self.model_parallel
        if world_size % mp:
            raise ValueError(f"plan.pp={self.pp} × plan.cp={self.cp} × plan.sp={self.sp} × "
                             f"plan.tp={self.tp} = {mp} must divide the world size {world_size}")
        dp = world_size // mp if self.dp == -1 else self.dp
        if dp * mp != world_size:
            raise ValueError(f"plan.dp={self.dp} × plan.pp × plan.cp × plan.sp × plan.tp = "
                             f"{dp * mp} processes, but the world size is {world_size}")
        if dp % self.ep:
            raise ValueError(f"plan.ep={self.ep} must divide plan.dp={dp} (expert-parallel "
                             "ranks are data-parallel ranks)")
        # ZeRO groups are ranks holding the same experts: zero_group · ep divides dp
        zero_group = dp // self.ep if self.zero_group == -1 else self.zero_group
        if dp % zero_group:
            raise ValueError(f"plan.zero_group={zero_group} must divide plan.dp={dp}")
        if (dp // self.ep) % zero_group:
            raise ValueError(f"plan.zero_group={zero_group} must divide plan.dp / plan.ep = "
                             f"{dp // self.ep} (a ZeRO group holds the same experts)")
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
