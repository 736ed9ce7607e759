"""Search every plan of a world size and rank them by predicted tokens/s per device.

``search(cfg, world, base, profile)`` enumerates dp × tp (+ sequence parallelism) × pp (and its
schedules) × sp × cp (+ weight parallel) × ep (MoE families) × ZeRO stage and group × micro-batch
size × recomputation, for the experiment's global batch (``base``: its rows of ``seq_len`` per
step stay fixed, so every plan trains the same thing). Pruning goes first by divisibility (no plan
object is built for a degree that does not divide the world, the heads, the sequence or the
batch), then by memory with the activations at their smallest (full recomputation, one row per
micro-batch), and only the plans that fit are timed. No process group is ever built.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from evo import models
from evo.sharding import cost, pipeline
from evo.sharding.plan import Plan

REMAT = (0.0, 0.5, 1.0)
MICRO_BATCH = (1, 2, 4, 8)
SCHEDULES = (("1f1b", 1), ("interleaved", 2), ("zbh1", 1), ("zbv", 2))


class NoPlanFits(ValueError):
    """No plan of the world fits: the message says why (divisibility, memory)."""


@dataclass(frozen=True)
class Base:
    """The experiment's step: ``rows`` sequences of ``seq_len`` tokens per step (global), in
    ``compute_dtype``."""
    rows: int
    seq_len: int
    compute_dtype: str = "bfloat16"


def _powers(limit: int) -> list[int]:
    out, d = [], 1
    while d <= limit:
        out.append(d)
        d *= 2
    return out


def _tp_degrees(cfg, world: int, profile: cost.Profile) -> list[int]:
    """tp inside a node, dividing every size the family splits."""
    sizes = list(models.family_of(cfg).tp_divisors(cfg).values())
    return [t for t in _powers(min(world, profile.cluster["devices_per_node"]))
            if all(s % t == 0 for s in sizes)]


def _model_splits(cfg, world: int, base: Base, profile: cost.Profile):
    """(pp, schedule, virtual, tp, sp, cp) that divide the world, the layers, the heads (tp · sp)
    and the sequence (cp: 2·cp chunks for causal balance). The groups that exchange activations
    inside every layer (tp · sp · cp) stay inside a node."""
    layers = sum(1 for b in models.blocks(cfg) if b.kind == "layer")
    heads, kv = cfg.num_heads, getattr(cfg, "num_kv_heads", None) or cfg.num_heads
    node = profile.cluster["devices_per_node"]
    for tp in _tp_degrees(cfg, world, profile):
        for sp in _powers(min(world, node) // tp):
            if heads % (tp * sp) or base.seq_len % sp or (kv % tp):
                continue
            for cp in _powers(min(world, node) // (tp * sp)):
                if base.seq_len % (2 * cp * sp) and cp > 1:
                    continue
                for pp in _powers(min(layers, world // (tp * sp * cp))):
                    if world % (tp * sp * cp * pp):
                        continue
                    for sched, v in (SCHEDULES if pp > 1 else (("1f1b", 1),)):
                        if pp * v <= layers:
                            yield pp, sched, v, tp, sp, cp


def _sharding(dp: int, tp: int, profile: cost.Profile):
    """(zero, zero_group): ZeRO 0, and 1-3 over all of dp or inside a node (hybrid)."""
    yield 0, dp
    node = max(1, profile.cluster["devices_per_node"] // tp)
    groups = sorted({dp} | ({node} if 1 < node < dp and dp % node == 0 else set()))
    for zero in (1, 2, 3):
        for g in groups:
            if dp > 1:
                yield zero, g


@functools.lru_cache(maxsize=256)
def stage_split(cfg, stages: int) -> tuple[int, ...] | None:
    """``plan.pp_layers`` for a schedule of ``stages`` > 1 stages per pipeline (interleaved,
    zbv): None when the blocks divide into equal stages (the pipeline's own split), else the
    contiguous split balancing the stages' parameters (the one 1F1B over as many stages uses)."""
    blocks = len(models.blocks(cfg))
    if blocks % stages == 0:
        return None
    return tuple(len(b) for b in pipeline.stage_blocks(cfg, Plan(pp=stages)))


def candidate_plans(cfg, world: int, base: Base, profile: cost.Profile):
    """Every resolved plan passing divisibility, with the rows per data-parallel rank."""
    experts = getattr(cfg, "num_experts", 0)
    for pp, sched, v, tp, sp, cp in _model_splits(cfg, world, base, profile):
        layers = stage_split(cfg, pp * v) if v > 1 else None
        dp = world // (pp * tp * sp * cp)
        if base.rows % dp:
            continue
        for zero, group in _sharding(dp, tp, profile):
            for seq_par in ((False, True) if tp > 1 else (False,)):
                for wp in ((False, True) if sp * cp > 1 else (False,)):
                    for ep in ([e for e in _powers(dp) if experts % e == 0] if experts else [1]):
                        yield Plan(dp=dp, tp=tp, zero=zero, zero_group=group,
                                   sequence_parallel=seq_par, pp=pp, pp_schedule=sched,
                                   pp_virtual=v, pp_layers=layers, sp=sp, cp=cp,
                                   weight_parallel=wp, ep=ep)


def _micro_batches(plan: Plan, base: Base):
    rows = base.rows // plan.dp
    for mb in MICRO_BATCH:
        if rows % mb:
            continue
        m = rows // mb
        if plan.pp_schedule == "zbv" and m < 2 * plan.pp or plan.pp > 1 and m < plan.pp:
            continue
        yield m, mb


def _fitting(cfg, plan: Plan, base: Base, profile: cost.Profile, capacity: float,
             every_remat: bool):
    """Per micro-batch size, the prediction with the least recomputation that fits (more
    recomputation only adds work), or every one that fits (``every_remat``)."""
    for m, mb in _micro_batches(plan, base):
        for remat in (REMAT if plan.zero < 3 else (0.0,)):
            wl = cost.Workload(m, mb, base.seq_len, base.compute_dtype, remat)
            memory = cost.memory_bytes(cfg, plan, wl, profile)
            if memory["total"] <= capacity:   # time only what fits
                yield cost.predict(cfg, plan, wl, profile, memory=memory)
                if not every_remat:
                    break


@dataclass
class SearchResult:
    ranked: list            # cost.Prediction, best first
    considered: int         # plans passing divisibility
    over_memory: int        # of those, plans whose smallest configuration does not fit
    smallest_gib: float     # the least peak memory of any plan (when none fits)


def search(cfg, world: int, base: Base, profile: cost.Profile, *, every_remat: bool = False
           ) -> SearchResult:
    """Every plan of ``world`` devices that fits memory, best predicted tokens/s per device
    first (per plan and micro-batch size, the least recomputation that fits, or every fraction
    of ``REMAT`` that fits with ``every_remat``). Raises ``NoPlanFits`` naming the reason when
    none does."""
    capacity = profile.device["memory_gib"] * 2**30
    ranked, considered, over, smallest = [], 0, 0, math.inf
    for plan in candidate_plans(cfg, world, base, profile):
        considered += 1
        lean = cost.Workload(base.rows // plan.dp, 1, base.seq_len, base.compute_dtype, 1.0)
        need = cost.memory_bytes(cfg, plan, lean, profile)["total"]
        smallest = min(smallest, need)
        if need > capacity:
            over += 1
            continue
        ranked.extend(_fitting(cfg, plan, base, profile, capacity, every_remat))
    if not ranked:
        raise NoPlanFits(_why_none(cfg, world, base, profile, considered, smallest))
    ranked.sort(key=lambda p: -p.tokens_per_second_per_device)
    return SearchResult(ranked, considered, over, smallest / 2**30)


def _why_none(cfg, world, base, profile, considered, smallest) -> str:
    if not considered:
        return (f"--world {world}: no plan divides it: every split pp · tp · sp · cp must divide "
                f"the world {world}, tp the model's heads, kv heads, ffn and vocabulary "
                f"({models.family_of(cfg).tp_divisors(cfg)}), and the data-parallel degree the "
                f"{base.rows} rows of a step (data.micro_batch × data.micro_num × dp)")
    return (f"--world {world}: no plan fits memory: {considered} plans divide the world, and the "
            f"leanest needs {smallest / 2**30:.1f} GiB per device, more than the "
            f"{profile.device['memory_gib']} GiB of profile {profile.name!r}")


def plan_fields(p: Plan) -> str:
    """A short spelling of a plan's non-default fields (``dp=8,tp=2,zero=1,...``)."""
    default = Plan()
    out = []
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        if f.name in ("rules", "bucket_mb", "pp_layers") or (v == getattr(default, f.name)
                                                              and f.name != "dp"):
            continue
        if f.name == "zero_group" and v == p.dp:
            continue
        if f.name in ("pp_schedule", "pp_virtual") and p.pp == 1:
            continue
        out.append(f"{f.name}={v}" if not isinstance(v, bool) else f.name)
    return ",".join(out)


def table(result: SearchResult, top: int = 10) -> str:
    """The best ``top`` plans as a text table (``model``: ``planner`` where the bytes and states
    are the planner's models, ``formula`` where the planner refuses the plan)."""
    rows = [f"{'#':>3} {'plan':<58}{'mb':>3}{'m':>5}{'remat':>6}{'step s':>9}{'tok/s/dev':>11}"
            f"{'GiB':>7}{'compute':>9}{'comm':>8}{'bubble':>8}  model"]
    for i, p in enumerate(result.ranked[:top], 1):
        w = p.workload
        rows.append(f"{i:>3} {plan_fields(p.plan):<58}{w.micro_batch:>3}{w.micro_num:>5}"
                    f"{w.remat:>6.1f}{p.step_seconds:>9.3f}{p.tokens_per_second_per_device:>11.0f}"
                    f"{p.peak_gib:>7.1f}{p.compute_seconds:>9.3f}{p.comm_seconds:>8.3f}"
                    f"{p.bubble_seconds:>8.3f}  {p.modelled}")
    return "\n".join(rows)
