"""Predict a plan's step time and peak memory per rank before launching it.

Three pieces, each a pure function of a model config, a resolved ``Plan``, a ``Workload`` (the
micro-batches one data-parallel rank runs per step) and a ``Profile`` (what the hardware does):

- **bytes** come from one place: ``planner.expected_comm_bytes`` (the analytic model the measured
  ``comm_bytes`` of every swept plan equal) for every plan the planner accepts
  (``planner.check_plan``, ``pipeline.check``): dp, tp, ZeRO, pipeline stages (the critical pp
  rank's), Ulysses and ring attention (``context.count_comm``) and experts (balanced routing); and
  ``planner.per_rank_bytes`` for weights, gradients and AdamW state (the largest pp rank's). Plans
  the planner refuses (``weight_parallel``, axis combinations not yet proven) keep the published
  formulas in the functions named ``pipeline_*``, ``ulysses_*``, ``ring_*``, ``expert_*`` and
  ``weight_parallel_*`` below (``modelled(cfg, plan)`` says which).
- **time**: compute from ``models.flops_per_token`` at the profile's achieved efficiency, a fixed
  cost per block and pass, AdamW per parameter; each collective from its bytes, its group's
  placement (inside a node or across nodes, from ``mesh_shape(plan)``) and the profile, exposed
  where the planner does not overlap it; the pipeline bubble of the schedule; recomputation.
- **memory**: weights, gradients (the full accumulation buffer while backward runs; on a
  pipeline, each stage's running sum from its first full or weight backward on), AdamW state,
  and the largest of backward's activations (by recomputation and sequence split, the schedule's
  in-flight micro-batches) with its gather and bucket buffers, the update's temporaries, and a
  micro-batch's gradients beside their running sum when its backward ends.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from evo import models
from evo.sharding import context, pipeline, planner
from evo.sharding.layout import model_layouts
from evo.sharding.mesh import mesh_shape
from evo.sharding.plan import Plan

PROFILE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "profiles")
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


class ProfileError(ValueError):
    """A profile file that is missing a field or holds a bad value (the message names it)."""


# ------------------------------------------------------------------------------------ profiles

# The schema: every required field with its type ("number": > 0 unless it is an efficiency or a
# fraction in [0, 1]). ``cluster.collectives`` is optional: measured (latency, bandwidth) fits per
# collective kind and group size, which replace the link model for groups of that size.
SCHEMA = {
    "name": str,
    "device.name": str,
    "device.matmul_tflops": dict,            # dtype name -> dense matmul TFLOP/s
    "device.compute_efficiency": "fraction",  # achieved / matmul_tflops on a layer's matmuls
    "device.attention_efficiency": "fraction",
    "device.block_overhead_us": "number0",   # fixed cost of one block's forward or backward
    "device.optimizer_ns_per_param": "number",  # AdamW update of one fp32 parameter
    "device.memory_gib": "number",
    "device.memory_bandwidth_gbs": "number",
    "device.memory_overhead": "fraction",    # allocator / runtime slack on top of tensors
    "cluster.devices_per_node": int,
    "cluster.intra_node.bandwidth_gbs": "number",
    "cluster.intra_node.latency_us": "number0",
    "cluster.inter_node.bandwidth_gbs": "number",   # per node: all of its NICs
    "cluster.inter_node.latency_us": "number0",
    "cluster.overlap": "fraction",           # share of overlappable communication hidden
    "sources": dict,                         # field -> where its value comes from
}
# Optional fields, checked when present: the attention of plans splitting the sequence (Ulysses,
# ring: log-sum-exp attention and its gradients), ``device.attention_efficiency`` when absent.
# ``device.norm_ns_per_value``: a layer's two RMSNorms and two residual adds, forward + backward,
# per hidden value (token × hidden) — charged apart from the matmuls, split only where the
# sequence is (tensor parallelism without sequence parallelism runs them whole on every rank);
# when absent, 0: folded into ``compute_efficiency``, as the bundled profiles measure it.
# ``device.attention_overhead_us``: the fixed cost of one layer's attention call, forward +
# backward (SDPA / flash; the intercept of its fit over token counts), charged per layer and
# micro-batch beside ``attention_efficiency``'s flops; when absent, 0.
# ``device.logit_ns_per_value``: the loss's log-softmax and cross-entropy over the head's fp32
# logits, forward + backward, per logit (token × vocabulary entry) — charged to the rank running
# the head, split over tp (vocabulary-parallel) and the sequence's split; when absent, 0.
OPTIONAL = {"device.context_attention_efficiency": "fraction",
            "device.norm_ns_per_value": "number0",
            "device.attention_overhead_us": "number0",
            "device.logit_ns_per_value": "number0"}


@dataclass(frozen=True)
class Link:
    bandwidth_gbs: float   # GB/s one rank sees
    latency_us: float


@dataclass(frozen=True)
class Profile:
    """A device and cluster, as ``SCHEMA`` describes (``load_profile`` checks every field)."""
    name: str
    device: dict
    cluster: dict
    sources: dict
    collectives: dict = field(default_factory=dict)  # kind -> {size: Link} (measured fits)

    def tflops(self, dtype: str) -> float:
        if dtype not in self.device["matmul_tflops"]:
            raise ProfileError(f"profile {self.name!r}: device.matmul_tflops has no {dtype!r} "
                               f"(it has {sorted(self.device['matmul_tflops'])})")
        return float(self.device["matmul_tflops"][dtype])


def _get(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            raise KeyError(path)
        d = d[part]
    return d


def _check_field(where: str, path: str, value, kind) -> None:
    if kind in (str, dict, int):
        ok = isinstance(value, kind) and not isinstance(value, bool)
        ok = ok and (kind is not int or value >= 1)
        what = {str: "a string", dict: "an object", int: "a positive integer"}[kind]
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value)
        lo_ok = value >= 0 if kind in ("number0", "fraction") else value > 0 if ok else False
        ok = ok and lo_ok and (kind != "fraction" or value <= 1)
        what = {"number": "a number > 0", "number0": "a number >= 0",
                "fraction": "a number in [0, 1]"}[kind]
    if not ok:
        raise ProfileError(f"{where}: {path} must be {what}, got {value!r}")


def profile_from_dict(d: dict, where: str = "profile") -> Profile:
    """A ``Profile`` from its JSON object; a missing or bad field is one ``ProfileError`` naming
    it."""
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: a profile is a JSON object, got {type(d).__name__}")
    for path, kind in SCHEMA.items():
        try:
            value = _get(d, path)
        except KeyError:
            raise ProfileError(f"{where}: missing field {path}") from None
        _check_field(where, path, value, kind)
    for path, kind in OPTIONAL.items():
        try:
            _check_field(where, path, _get(d, path), kind)
        except KeyError:
            pass
    for dtype, v in d["device"]["matmul_tflops"].items():
        _check_field(where, f"device.matmul_tflops.{dtype}", v, "number")
    measured = {}
    for kind, by_size in d["cluster"].get("collectives", {}).items():
        if kind not in KINDS:
            raise ProfileError(f"{where}: cluster.collectives.{kind} is not a collective kind "
                               f"({', '.join(KINDS)})")
        measured[kind] = {}
        for size, fit in by_size.items():
            p = f"cluster.collectives.{kind}.{size}"
            for name, k in (("bandwidth_gbs", "number"), ("latency_us", "number0")):
                if not isinstance(fit, dict) or name not in fit:
                    raise ProfileError(f"{where}: missing field {p}.{name}")
                _check_field(where, f"{p}.{name}", fit[name], k)
            measured[kind][int(size)] = Link(float(fit["bandwidth_gbs"]), float(fit["latency_us"]))
    return Profile(d["name"], d["device"], d["cluster"], d["sources"], measured)


def bundled_profiles() -> list[str]:
    """Names of the profiles shipped in ``evo/profiles`` (file names without ``.json``)."""
    return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".json"))


def load_profile(name_or_path: str) -> Profile:
    """A bundled profile by name (``a800-80gb-roce``) or a profile JSON file."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(PROFILE_DIR, f"{name_or_path}.json")
        if not os.path.exists(path):
            raise ProfileError(f"--profile {name_or_path}: no such file, and not a bundled "
                               f"profile ({', '.join(bundled_profiles())})")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON ({e})") from None
    return profile_from_dict(d, path)


# ---------------------------------------------------------------------------- the workload

@dataclass(frozen=True)
class Workload:
    """What one data-parallel rank runs per step: ``micro_num`` micro-batches of ``micro_batch``
    rows of ``seq_len`` tokens, in ``compute_dtype`` (fp32 master), with ``remat`` of the layers
    recomputed in backward."""
    micro_num: int
    micro_batch: int
    seq_len: int
    compute_dtype: str = "bfloat16"
    remat: float = 0.0

    @property
    def tokens_per_micro(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def act_bytes(self) -> int:
        return _element_size(self.compute_dtype)


@functools.lru_cache(maxsize=16)
def _element_size(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


# --------------------------------------------------------------------- collectives and links

def _ring(kind: str, n: int) -> tuple[float, int]:
    """(bytes on the wire per byte handed to the collective, latency steps) of ring algorithms;
    ``all_gather`` is handed its shard, the others the whole buffer."""
    return {"all_reduce": (2 * (n - 1) / n, 2 * (n - 1)),
            "reduce_scatter": ((n - 1) / n, n - 1),
            "all_gather": (n - 1, n - 1),
            "all_to_all": ((n - 1) / n, n - 1),
            "send_recv": (1.0, 1)}[kind]


@functools.lru_cache(maxsize=4096)
def group_placement(shape_key, axis: str, devices_per_node: int) -> tuple[int, int]:
    """(group size, members per node) of rank 0's group of ``axis``: a group inside one node talks
    over the intra-node links, one across nodes shares its node's NICs with the other groups."""
    from evo.sharding.mesh import MeshShape
    shape = MeshShape(*shape_key)
    members = shape.members(0, axis)
    per_node = sum(1 for r in members if r // devices_per_node == 0)
    return len(members), per_node


def link(profile: Profile, n: int, per_node: int) -> Link:
    """The bandwidth and latency one member of a group of ``n`` sees (``per_node`` members in each
    node): intra-node links inside a node; across nodes the node's NICs, shared by the
    ``devices_per_node / per_node`` groups of the node that cross at once."""
    c = profile.cluster
    intra = Link(c["intra_node"]["bandwidth_gbs"], c["intra_node"]["latency_us"])
    if per_node >= n:
        return intra
    share = c["inter_node"]["bandwidth_gbs"] * per_node / c["devices_per_node"]
    return Link(min(intra.bandwidth_gbs, share), c["inter_node"]["latency_us"])


def collective_seconds(profile: Profile, kind: str, nbytes: float, calls: int, n: int,
                       per_node: int) -> float:
    """Seconds for ``calls`` collectives of ``kind`` handing ``nbytes`` in all, in a group of
    ``n``."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    measured = profile.collectives.get(kind, {}).get(n)
    if measured is not None and per_node >= n:   # measured in one node
        return calls * measured.latency_us * 1e-6 + nbytes / (measured.bandwidth_gbs * 1e9)
    wire, steps = _ring(kind, n)
    lk = link(profile, n, per_node)
    return calls * steps * lk.latency_us * 1e-6 + nbytes * wire / (lk.bandwidth_gbs * 1e9)


# ------------------------------------------------------------------------ bytes: one place

@functools.lru_cache(maxsize=65536)
def base_plan(plan: Plan) -> Plan:
    """The plan with the axes the planner does not run yet set to 1 (same dp, tp, ZeRO): the part
    whose bytes ``planner.expected_comm_bytes`` knows exactly."""
    import dataclasses
    return dataclasses.replace(plan, pp=1, pp_schedule="1f1b", pp_virtual=1, pp_layers=None,
                               sp=1, cp=1, weight_parallel=False, ep=1)


# Pipeline plans of models with more layers than this keep the formulas: the planner counts a
# pp rank's bytes over the whole model per call (~0.05 s for 7B), per rank, micro-batch size and
# recomputation — minutes for a search at 1024 devices, whose answer must take seconds.
PLANNER_PP_MAX_LAYERS = 16


@functools.lru_cache(maxsize=65536)
def modelled(cfg, plan: Plan) -> str:
    """``"planner"`` when the planner accepts ``plan`` for the model (``planner.check_plan`` and
    ``pipeline.check``): its bytes and states are the planner's own models; ``"formula"`` when it
    refuses it (``weight_parallel``, axes not yet proven together), or for pipeline plans of
    models of more than ``PLANNER_PP_MAX_LAYERS`` layers: the published formulas."""
    if plan.pp > 1 and _layers(cfg) > PLANNER_PP_MAX_LAYERS:
        return "formula"
    try:
        planner.check_plan(plan, cfg)
        _pipeline_check(cfg, _pp_key(plan), plan.zero == 3)
    except ValueError:
        return "formula"
    return "planner"


def _pp_key(plan: Plan) -> tuple:
    return plan.pp, plan.pp_schedule, plan.pp_virtual, plan.pp_layers


@functools.lru_cache(maxsize=4096)
def _pp_plan(key: tuple, zero3: bool = False) -> Plan:
    """A plan with only the pipeline fields of ``key`` (what ``pipeline``'s splits and schedules
    read), so that plans differing elsewhere share the caches below."""
    pp, schedule, virtual, layers = key
    return Plan(dp=2 if zero3 else 1, zero=3 if zero3 else 0, pp=pp, pp_schedule=schedule,
                pp_virtual=virtual, pp_layers=layers)


@functools.lru_cache(maxsize=4096)
def _pipeline_check(cfg, key: tuple, zero3: bool) -> None:
    pipeline.check(cfg, _pp_plan(key, zero3))


@functools.lru_cache(maxsize=4096)
def _rank_signatures(cfg, key: tuple, redo: int) -> tuple:
    """Per pp rank: (its non-layer blocks, its layers, its recomputed layers — among the model's
    first ``redo`` —, its stage boundaries to other ranks). Of a model of identical layers, two
    ranks of one signature hand the same bytes and hold the same state."""
    plan = _pp_plan(key)
    split = _split(cfg, key)
    seen, out = 0, {}
    for s, blocks in enumerate(split):
        r = pipeline.stage_rank(plan, s)
        names, layers, redone, cross = out.get(r, ((), 0, 0, 0))
        for b in blocks:
            if b.kind == "layer":
                layers, redone, seen = layers + 1, redone + (seen < redo), seen + 1
            else:
                names += (f"{b.kind}:{b.name}",)
        cross += sum(1 for nb in (s - 1, s + 1) if 0 <= nb < len(split)
                     and pipeline.stage_rank(plan, nb) != r)
        out[r] = (names, layers, redone, cross)
    return tuple(out[r] for r in range(plan.pp))


@functools.lru_cache(maxsize=4096)
def _split(cfg, key: tuple) -> tuple:
    return tuple(tuple(b) for b in pipeline.stage_blocks(cfg, _pp_plan(key)))


@functools.lru_cache(maxsize=65536)
def _fixed_split(cfg, plan: Plan) -> Plan:
    """The plan with its stages' block counts spelled out (``pp_layers``): the same split as
    the balanced one, so the planner does not balance it again on every call."""
    import dataclasses
    if plan.pp == 1 or plan.pp_layers is not None:
        return plan
    return dataclasses.replace(plan, pp_layers=tuple(len(b) for b in _split(cfg, _pp_key(plan))))


def pp_ranks(cfg, plan: Plan, remat: float = 0.0) -> list[int]:
    """The pp ranks whose bytes and states to compare for the critical one: every rank, or of a
    model of identical layers one rank per ``_rank_signatures`` signature."""
    if plan.pp == 1:
        return [0]
    if not _layered(cfg):
        return list(range(plan.pp))
    redo = recomputed_layers(plan, _layers(cfg), remat)
    first = {}
    for r, sig in enumerate(_rank_signatures(cfg, _pp_key(plan), redo)):
        first.setdefault(sig, r)
    return sorted(first.values())


@functools.lru_cache(maxsize=65536)
def canonical(plan: Plan) -> Plan:
    """A plan whose byte counts equal ``plan``'s: ``planner.expected_comm_bytes`` and
    ``per_rank_bytes`` read ``dp`` only through which of the dp / zero / replica groups have more
    than one member, and the ZeRO shards through ``zero_group`` (expert parallelism reads ``dp``
    itself: kept). Plans differing only in ``dp`` share one entry of the caches below."""
    import dataclasses
    if plan.ep > 1:
        return plan
    if plan.zero == 0:  # no shards: only whether there is a data-parallel group counts
        return dataclasses.replace(plan, dp=min(plan.dp, 2), zero_group=min(plan.dp, 2))
    g = plan.zero_group
    return dataclasses.replace(plan, dp=g * (2 if plan.dp > g else 1), zero_group=g)


@functools.lru_cache(maxsize=65536)
def _with_layers(cfg, n: int):
    import dataclasses
    return dataclasses.replace(cfg, num_layers=n)


@functools.lru_cache(maxsize=65536)
def _layered(cfg) -> bool:
    """Large models of identical layers are counted on one- and two-layer copies: every count
    below is affine in the number of layers (and of recomputed layers), so two or three small
    evaluations give the large model's exact answer in a fraction of the time."""
    return getattr(cfg, "num_layers", 0) > 4 and all(
        b.kind != "layer" or b.name.startswith("layers.") for b in models.blocks(_with_layers(
            cfg, 1)))


CALLS = "#"   # prefix of the call counts among ``_planner_bytes``' keys


@functools.lru_cache(maxsize=65536)
def _planner_bytes(cfg, plan: Plan, micro_num: int, tokens_per_micro: int, dtype: str,
                   remat: float, pp_index: int = 0) -> tuple:
    """``expected_comm_bytes`` and, under ``CALLS + key``, its call counts."""
    from collections import Counter
    calls: Counter = Counter()
    b = planner.expected_comm_bytes(cfg, plan, micro_num=micro_num,
                                    tokens_per_micro=tokens_per_micro,
                                    compute_dtype=getattr(torch, dtype), remat=remat,
                                    pp_index=pp_index, calls=calls)
    return tuple(sorted(b.items())) + tuple(sorted((CALLS + k, v) for k, v in calls.items()))


def planner_comm_bytes(cfg, plan: Plan, micro_num: int, tokens_per_micro: int, dtype: str,
                       remat: float, pp_index: int = 0) -> dict[str, int]:
    """``planner.expected_comm_bytes`` of a plan the planner runs, for pp rank ``pp_index``. A
    large model's answer comes from ``_coefficients``, exactly (without pipeline stages or
    experts)."""
    return {k: v for k, v in _planner_counts(cfg, plan, micro_num, tokens_per_micro, dtype,
                                             remat, pp_index).items() if k[0] != CALLS}


def planner_comm_calls(cfg, plan: Plan, micro_num: int, tokens_per_micro: int, dtype: str,
                       remat: float, pp_index: int = 0) -> dict[str, int]:
    """How many collectives of each key ``planner_comm_bytes``' bytes go in (the planner's
    ``calls``)."""
    return {k[1:]: v for k, v in _planner_counts(cfg, plan, micro_num, tokens_per_micro, dtype,
                                                 remat, pp_index).items() if k[0] == CALLS}


@functools.lru_cache(maxsize=65536)
def _planner_counts(cfg, plan: Plan, micro_num: int, tokens_per_micro: int, dtype: str,
                    remat: float, pp_index: int = 0) -> dict[str, int]:
    """Bytes and (``CALLS`` + key) calls (cached: do not modify the answer)."""
    plan = _fixed_split(cfg, canonical(plan))
    if not _layered(cfg) or plan.pp > 1 or plan.ep > 1:
        return dict(_planner_bytes(cfg, plan, micro_num, tokens_per_micro, dtype, remat,
                                   pp_index))
    coeffs = _coefficients(cfg, plan, dtype)
    layers, redo = cfg.num_layers, math.floor(remat * cfg.num_layers)
    t = Fraction(tokens_per_micro, _token_unit(plan))
    out = {}
    for k, (step, micro, token) in coeffs.items():
        x = [step, micro, token]
        a, b, c = (v[0] + (layers - 1) * v[1] + redo * v[2] for v in x)
        total = a + micro_num * b + micro_num * t * c
        if total:
            out[k] = int(total)
    return out


@functools.lru_cache(maxsize=4096)
def _coefficients(cfg, plan: Plan, dtype: str) -> dict:
    """``expected_comm_bytes`` as ``step + m · (micro + t/tp · token)`` per key, each term
    ``v0 + (layers − 1) · v1 + recomputed · v2``: every count the planner makes is affine in the
    micro-batches ``m``, their tokens ``t`` and the (recomputed) layers. Nine evaluations on one-
    and two-layer copies of the model determine the terms exactly (integers; ``t`` a multiple of
    tp · sp · cp, ``_token_unit``, keeps the sequence-parallel pieces whole)."""
    t0 = _token_unit(plan)
    points = {}
    for layers, remat in ((1, 0.0), (2, 0.0), (1, 1.0)):
        small = _with_layers(cfg, layers)
        e = [dict(_planner_bytes(small, plan, m, t, dtype, remat))
             for m, t in ((1, t0), (2, t0), (1, 2 * t0))]
        points[layers, remat] = e
    keys = {k for e in points.values() for d in e for k in d}
    out = {}
    for k in keys:
        terms = []
        for layers, remat in ((1, 0.0), (2, 0.0), (1, 1.0)):
            e1, e2, e3 = (d.get(k, 0) for d in points[layers, remat])
            token = e3 - e1                        # t0 · per-token bytes
            micro = e2 - e3                        # per micro-batch, token-free
            terms.append((2 * e1 - e2, micro, token))
        out[k] = tuple((x10, x20 - x10, x11 - x10) for x10, x20, x11 in zip(*terms))
    return out


def _token_unit(plan: Plan) -> int:
    return plan.tp * plan.sp * plan.cp


@functools.lru_cache(maxsize=65536)
def _state_bytes(cfg, plan: Plan, pp_index: int = 0) -> tuple:
    return tuple(sorted(planner.per_rank_bytes(cfg, plan, pp_index=pp_index).items()))


@functools.lru_cache(maxsize=65536)
def state_bytes(cfg, plan: Plan) -> dict[str, int]:
    """``planner.per_rank_bytes`` of the pp rank holding the most (cached: do not modify the
    answer; large models without pipeline stages or experts through ``_layered``, exactly)."""
    plan = _fixed_split(cfg, canonical(plan))
    if plan.pp > 1:
        return max((dict(_state_bytes(cfg, plan, r)) for r in pp_ranks(cfg, plan)),
                   key=lambda b: b["total"])
    if not _layered(cfg) or plan.ep > 1:
        return dict(_state_bytes(cfg, plan))
    a = dict(_state_bytes(_with_layers(cfg, 1), plan))
    b = dict(_state_bytes(_with_layers(cfg, 2), plan))
    return {k: a[k] + (cfg.num_layers - 1) * (b[k] - a[k]) for k in a}


def rank_state(cfg, plan: Plan) -> dict[str, float]:
    """Weights, gradients and AdamW state of the busiest rank: ``state_bytes`` for a plan the
    planner models; for one it refuses, the dp × tp × ZeRO part's divided over the pipeline
    stages (and the sequence group under weight parallelism)."""
    if modelled(cfg, plan) == "planner":
        return state_bytes(cfg, plan)
    shrink = plan.pp * (plan.sp * plan.cp if plan.weight_parallel else 1)
    return {k: v / shrink for k, v in state_bytes(cfg, base_plan(plan)).items()}


def comm_bytes(cfg, plan: Plan, wl: Workload) -> dict[str, float]:
    """Bytes one rank hands to each collective (``"{kind}/{axis}"``) per step. For a plan the
    planner accepts (``modelled``): exactly ``planner.expected_comm_bytes``, with pipeline stages
    of the critical pp rank — the one handing the most bytes in all (the step waits for its
    slowest stage; ranks differ by the embedding, the head and the tied gradients' sum). For a
    plan it refuses: that function's answer for the plan's dp × tp × ZeRO part on the rank's share
    of the sequence, scaled to one pipeline stage, plus the formulas of the pipeline, Ulysses,
    ring, expert and weight-parallel axes."""
    if modelled(cfg, plan) == "planner":
        return planner_comm_bytes(cfg, plan, wl.micro_num, wl.tokens_per_micro,
                                  wl.compute_dtype, wl.remat, _critical_rank(cfg, plan, wl))
    seq_split = plan.sp * plan.cp
    out = planner_comm_bytes(cfg, base_plan(plan), wl.micro_num,
                             wl.tokens_per_micro // seq_split, wl.compute_dtype, wl.remat)
    out = {k: v / plan.pp for k, v in out.items()}
    for extra in (pipeline_bytes(cfg, plan, wl), ulysses_bytes(cfg, plan, wl),
                  ring_bytes(cfg, plan, wl), expert_bytes(cfg, plan, wl),
                  weight_parallel_bytes(cfg, plan, wl)):
        for k, v in extra.items():
            out[k] = out.get(k, 0) + v
    return out


def _critical_rank(cfg, plan: Plan, wl: Workload) -> int:
    """The pp rank handing the most bytes in all (0 without pipeline stages)."""
    return max(pp_ranks(cfg, plan, wl.remat), key=lambda r: sum(planner_comm_bytes(
        cfg, plan, wl.micro_num, wl.tokens_per_micro, wl.compute_dtype, wl.remat, r).values()))


@functools.lru_cache(maxsize=256)
def _facts(cfg) -> tuple[int, int, int, int]:
    """(layers, blocks, parameters, tensor-parallel region crossings per micro-batch)."""
    blocks = models.blocks(cfg)
    crossings = sum(b.enters + b.exits for b in blocks) * 2 + 3
    return (sum(1 for b in blocks if b.kind == "layer"), len(blocks),
            len(models.param_specs(cfg)), crossings)


def _layers(cfg) -> int:
    return _facts(cfg)[0]


def pipeline_bytes(cfg, plan: Plan, wl: Workload) -> dict[str, float]:
    """Activations sent to the next stage in forward and gradients back in backward, per
    micro-batch and stage boundary (``pp_virtual`` boundaries per rank when interleaved)."""
    if plan.pp == 1:
        return {}
    act = wl.tokens_per_micro // plan.sequence_split
    return {"send_recv/pp": 2.0 * wl.micro_num * plan.pp_virtual * act * cfg.hidden_size
            * wl.act_bytes}


def ulysses_bytes(cfg, plan: Plan, wl: Workload) -> dict[str, float]:
    """Ulysses: q, k, v and the attention output all-to-all'd per layer (4·N·h / sp per rank,
    forward; twice again in backward, and once more per recomputed layer)."""
    if plan.sp == 1:
        return {}
    layers = _layers(cfg) / plan.pp
    passes = 3 + (1 if plan.zero == 3 else wl.remat)
    per_layer = 4 * wl.tokens_per_micro * cfg.hidden_size * wl.act_bytes / plan.sp / plan.tp
    return {"all_to_all/sp": passes * layers * wl.micro_num * per_layer}


def _head_dim(cfg) -> int:
    return getattr(cfg, "dim_per_head", None) or cfg.hidden_size // cfg.num_heads


def _kv_dim(cfg) -> int:
    return (getattr(cfg, "num_kv_heads", None) or cfg.num_heads) * _head_dim(cfg)


def ring_bytes(cfg, plan: Plan, wl: Workload) -> dict[str, float]:
    """Ring attention (``context.count_comm``'s pattern): each rank passes its k and v block
    (2·N_local·d_kv elements) around the ring, cp − 1 shifts in forward and again in backward,
    whose dk, dv accumulators (fp32 at least) travel with their block and go home: cp shifts."""
    if plan.cp == 1:
        return {}
    layers = _layers(cfg) / plan.pp
    local = wl.tokens_per_micro / (plan.cp * plan.sp)
    block = 2 * local * _kv_dim(cfg) / plan.tp
    per_layer = block * (2 * (plan.cp - 1) * wl.act_bytes + plan.cp * max(wl.act_bytes, 4))
    return {"send_recv/cp": layers * wl.micro_num * per_layer}


def expert_bytes(cfg, plan: Plan, wl: Workload) -> dict[str, float]:
    """Expert parallelism (MoE families): tokens dispatched to and combined from their top-k
    experts by all-to-all, forward and twice in backward."""
    experts = getattr(cfg, "num_experts", 0)
    if plan.ep == 1 or not experts:
        return {}
    topk = getattr(cfg, "experts_per_token", 2)
    layers = _layers(cfg) / plan.pp
    per_layer = 2 * wl.tokens_per_micro / (plan.sp * plan.cp) * topk * cfg.hidden_size \
        * wl.act_bytes
    return {"all_to_all/ep": 3 * layers * wl.micro_num * per_layer}


def weight_parallel_bytes(cfg, plan: Plan, wl: Workload) -> dict[str, float]:
    """Weight parallel (ISP): each block's weights all-gathered over the sequence group in forward
    and backward, their gradients reduce-scattered."""
    if not plan.weight_parallel:
        return {}
    g = plan.sp * plan.cp
    local = state_bytes(cfg, base_plan(plan))["params"] / plan.pp
    act = local / 4 * wl.act_bytes
    return {"all_gather/sp": 2 * wl.micro_num * act / g,
            "reduce_scatter/sp": wl.micro_num * act}


# ------------------------------------------------------------------------------- step time

def gradient_sync_calls(cfg, plan: Plan) -> dict[str, int]:
    """The keys of the data-parallel gradient synchronisation (which ``planner_comm_calls``
    counts as one collective each) and how many collectives each takes: one per bucket of
    ``plan.bucket_mb`` where the planner buckets (``_bucketed``), else one per parameter."""
    keys = {0: ("all_reduce/dp",), 1: ("all_reduce/dp",),
            2: ("reduce_scatter/zero", "all_reduce/replica"), 3: ("all_reduce/replica",)}
    n = _buckets(cfg, plan.tp, plan.bucket_mb) if _bucketed(plan) else _facts(cfg)[2]
    return {k: n for k in keys[plan.zero]}


@functools.lru_cache(maxsize=4096)
def _buckets(cfg, tp: int, bucket_mb: float) -> int:
    """How many buckets ``planner.BucketedReduction`` cuts the tp pieces of ``cfg``'s gradients
    into."""
    layouts = model_layouts(Plan(tp=tp).resolve(tp), cfg)
    return len(planner.bucket_assignment(layouts, list(layouts), int(bucket_mb * 2**20)))


def collective_calls(cfg, plan: Plan, wl: Workload, step_bytes: dict[str, float]
                     ) -> dict[str, int]:
    """How many collectives of each ``"{kind}/{axis}"`` of ``step_bytes`` (``comm_bytes``) a step
    launches (for the latency term only). For a plan the planner runs: the planner's own count
    (``planner_comm_calls``, the critical pp rank's), with the gradient synchronisation split
    into its buckets (or one reduction per parameter, unbucketed). Otherwise per axis: region
    crossings per block and micro-batch, the sequence group's exchanges per layer, one gather
    per parameter and block under ZeRO-3 and weight parallelism."""
    _, _, params, crossings = _facts(cfg)
    if modelled(cfg, plan) == "planner":
        calls = dict(planner_comm_calls(cfg, plan, wl.micro_num, wl.tokens_per_micro,
                                        wl.compute_dtype, wl.remat,
                                        _critical_rank(cfg, plan, wl)))
        for key, n in gradient_sync_calls(cfg, plan).items():
            if key in calls:
                calls[key] += n - 1
        return calls
    reductions = gradient_sync_calls(cfg, plan)["all_reduce/dp" if plan.zero < 2 else
                                                "all_reduce/replica"]
    by_axis = {"tp": wl.micro_num * crossings, "dp": reductions + 3, "replica": params,
               "zero": params + 2, "pp": 2 * wl.micro_num * plan.pp_virtual,
               "sp": 4 * wl.micro_num * _layers(cfg), "cp": 3 * wl.micro_num * _layers(cfg)
               * max(plan.cp - 1, 1), "ep": 6 * wl.micro_num * _layers(cfg),
               "seq": wl.micro_num * params * 3}
    if plan.zero == 3:
        by_axis["zero"] = wl.micro_num * params * 3 + 2
    return {k: by_axis.get(k.split("/")[1], 1) for k in step_bytes}


def _placement(plan: Plan, axis: str, profile: Profile) -> tuple[int, int]:
    return _placement_of(plan, axis, profile.cluster["devices_per_node"])


@functools.lru_cache(maxsize=65536)
def _placement_of(plan: Plan, axis: str, dpn: int) -> tuple[int, int]:
    if axis == "ep":  # a factor of the data-parallel ranks (innermost of them)
        inner = plan.tp * plan.sp * plan.cp
        return plan.ep, max(1, min(plan.ep, dpn // inner))
    shape = mesh_shape(plan)
    return group_placement((shape.base, shape.derived), axis, dpn)


def pipeline_bubble_fraction(plan: Plan, micro_num: int) -> float:
    """Idle share of a pipeline step relative to its compute: the pipeline module's own
    ``pipeline.bubble_fraction`` of the schedule — (p−1)/m for 1F1B, (p−1)/(v·m) interleaved
    (Megatron arXiv 2104.04473), 0 for the zero-bubble schedules ``zbh1`` and ``zbv`` (torch's
    ``ScheduleInterleavedZeroBubble`` and ``ScheduleZBVZeroBubble``, arXiv 2401.10241) with equal
    forward, input- and weight-backward times."""
    return pipeline.bubble_fraction(plan, micro_num)


def recomputed_layers(plan: Plan, layers: int, remat: float) -> int:
    """Layers run forward twice: every layer under ZeRO-3 and weight parallelism (the planner
    recomputes a gathered block: ``ShardedRegions.checkpoint_layers``), else the first
    ``floor(remat · layers)``."""
    return layers if planner.stored_shard_axis(plan) else math.floor(remat * layers)


@functools.lru_cache(maxsize=1024)
def _attention_flops_per_token(cfg, seq_len: int) -> float:
    """Forward + backward flops per token of causal attention's scores and weighted sums: half
    of what ``models.flops_per_token`` counts (the MFU convention takes every query against
    every key) — causal kernels skip the masked half, and the calibration (``calibrate``) and
    the bundled flash-attention figures rate ``attention_efficiency`` by the half."""
    return (models.flops_per_token(cfg, seq_len) - models.flops_per_token(cfg, 0)) / 2


@functools.lru_cache(maxsize=1024)
def _flops_per_token(cfg, seq_len: int) -> float:
    """What a token costs the cost model: the matmuls and causal attention."""
    return models.flops_per_token(cfg, 0) + _attention_flops_per_token(cfg, seq_len)


def compute_seconds(cfg, plan: Plan, wl: Workload, profile: Profile) -> dict[str, float]:
    """Forward + backward (+ recomputation) seconds of one rank per step, and of the attention
    and one micro-batch's backward (what overlaps can hide behind): the matmuls and the
    attention split over every axis that splits a layer's work (tp, sp, cp; a pipeline rank's
    share), the norms and residual adds (``device.norm_ns_per_value``) only over the axes that
    split the sequence — whole on each rank of tensor parallelism without sequence
    parallelism —, the attention call's fixed cost (``device.attention_overhead_us``, SDPA /
    flash) once per layer and micro-batch on every rank."""
    layers = _layers(cfg)
    attn_per_token = _attention_flops_per_token(cfg, wl.seq_len)
    total_per_token = _flops_per_token(cfg, wl.seq_len)
    share = pp_compute_share(cfg, plan, wl)
    split = plan.tp * plan.sp * plan.cp / share
    tokens = wl.micro_num * wl.tokens_per_micro
    redo = 1 + recomputed_layers(plan, layers, wl.remat) / layers / 3
    peak = profile.tflops(wl.compute_dtype) * 1e12
    dev = profile.device
    matmul = (total_per_token - attn_per_token) * tokens / split / (peak
                                                                   * dev["compute_efficiency"])
    attention = attn_per_token * tokens / split / (peak * attention_efficiency(plan, profile))
    if plan.sp * plan.cp == 1:
        attention += wl.micro_num * layers * share * dev.get("attention_overhead_us", 0.0) * 1e-6
    norms = dev.get("norm_ns_per_value", 0.0) * 1e-9 * layers * cfg.hidden_size * tokens \
        * share / plan.sequence_split
    blocks = _facts(cfg)[1] / plan.pp
    overhead = wl.micro_num * blocks * (3 + wl.remat) * dev["block_overhead_us"] * 1e-6
    passes = (matmul + attention + norms) * redo + overhead     # the blocks' forward + backward
    total = passes + logit_seconds(cfg, plan, wl, profile) \
        + accumulation_seconds(cfg, plan, wl, profile)
    return {"total": total, "attention": attention * redo,
            "backward_micro": passes * 2 / 3 / wl.micro_num, "forward": passes / 3}


def logit_seconds(cfg, plan: Plan, wl: Workload, profile: Profile) -> float:
    """The loss over the head's logits (``device.logit_ns_per_value`` per logit): every token's
    vocabulary, split over tp (vocabulary-parallel cross-entropy) and the axes splitting the
    sequence; on a pipeline, only where the busiest rank runs the head."""
    ns = profile.device.get("logit_ns_per_value", 0.0)
    if not ns or not _head_on_busiest_rank(cfg, plan, wl):
        return 0.0
    tokens = wl.micro_num * wl.tokens_per_micro
    return ns * 1e-9 * tokens * cfg.vocab_size / (plan.tp * plan.sp * plan.cp)


def _head_on_busiest_rank(cfg, plan: Plan, wl: Workload) -> bool:
    if plan.pp == 1 or modelled(cfg, plan) != "planner":
        return True
    redo = recomputed_layers(plan, _layers(cfg), wl.remat)
    return _pipeline_timeline(cfg, _pp_key(plan), wl.micro_num, wl.seq_len, redo)[3]


def accumulation_seconds(cfg, plan: Plan, wl: Workload, profile: Profile) -> float:
    """Summing the micro-batches' gradients (``train.Accumulator.add_grads``; a pipeline stage's
    the same): ``micro_num − 1`` passes over the rank's gradients as its backward hands them —
    whole, ZeRO shards them after —, each reading the running sum and the new gradients and
    writing the sum, at the device's memory bandwidth."""
    if wl.micro_num < 2:
        return 0.0
    grads = rank_state(cfg, _unsharded(plan))["grads"]
    return (wl.micro_num - 1) * 3 * grads / (profile.device["memory_bandwidth_gbs"] * 1e9)


def pp_compute_share(cfg, plan: Plan, wl: Workload) -> float:
    """The busiest pipeline rank's compute against the whole model's (1 without stages): the
    forward, backward and recomputation of its stages' actions (``_pipeline_timeline``) — stages
    split the blocks by parameters (``pipeline.stage_blocks``), so ranks differ. A formula plan:
    ``1 / pp`` of the model, ``zero_bubble_factor`` of it under the zero-bubble schedules (every
    rank but the first has a stage with an input)."""
    if plan.pp == 1:
        return 1.0
    layers = _layers(cfg)
    redo = recomputed_layers(plan, layers, wl.remat)
    if modelled(cfg, plan) != "planner":
        zb = plan.pp_schedule in ("zbh1", "zbv")
        return (zero_bubble_factor(redo / layers) if zb else 1.0) / plan.pp
    busy, _, whole, _ = _pipeline_timeline(cfg, _pp_key(plan), wl.micro_num, wl.seq_len, redo)
    return busy / whole


def zero_bubble_factor(recomputed: float) -> float:
    """A stage with an input under ZB-H1 / ZB-V against 1F1B: forward ``f``, then ``I`` the
    gradient to the stage's input alone (``f``: each matmul's input gradient; plus the
    recomputation ``r``), then ``W`` the weights' gradients through the stage's whole backward
    again (``2f + r``: ``autograd.grad`` to the weights evaluates every backward function anew,
    measured as twice 1F1B's backward nodes): ``(4f + 2r) / (3f + r)``, ``recomputed`` = r / f —
    ``_action_flops``' costs, which the replayed schedules use."""
    def cost(kinds: str) -> float:
        return sum(_action_flops(k, 1, 1.0, recomputed) for k in kinds)
    return cost("FIW") / cost("FB")


def _action_flops(kind: str, stage: int, forward: float, recompute: float) -> float:
    """One pipeline action's flops per token: ``F`` the forward; ``B`` the backward (twice the
    forward) with the recomputation; ``I`` (zero-bubble) the input's gradient with the
    recomputation — nothing on the first stage, which has no input —; ``W`` the whole backward
    again (``zero_bubble_factor``)."""
    if kind == "F":
        return forward
    if kind == "I":
        return forward + recompute if stage > 0 else 0.0
    return 2 * forward + recompute


@functools.lru_cache(maxsize=4096)
def _stage_parts(cfg, key: tuple, redo: int) -> tuple:
    """Per pipeline stage: (its layers run once, its recomputed layers — among the model's first
    ``redo`` —, its heads)."""
    seen, out = 0, []
    for blocks in _split(cfg, key):
        layers = sum(b.kind == "layer" for b in blocks)
        redone = max(0, min(layers, redo - seen))
        seen += layers
        out.append((layers - redone, redone, sum(b.kind == "head" for b in blocks)))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _pipeline_timeline(cfg, key: tuple, micro_num: int, seq_len: int,
                       redo: int) -> tuple[float, float, float, bool]:
    """(the busiest pp rank's flops per token of one micro-batch over a step, the step's span in
    the same unit, the whole model's step, whether that rank runs the head): the schedule's
    action lists
    (``pipeline.action_lists``) replayed (``pipeline.replay``) with each action's flops
    (``_action_flops``) of its stage — a layer's forward a third of its flops, the head's
    ``2·h·V``, the embedding none; the model's first ``redo`` layers recomputed. The span holds
    the bubble of unequal stages (the embedding's light, the head's heavy) and of the zero-bubble
    schedules' unequal ``I`` and ``W``, which the closed forms of ``pipeline.bubble_fraction``
    (equal stages and passes) leave out."""
    plan = _pp_plan(key)
    head = 6.0 * cfg.hidden_size * cfg.vocab_size
    layer = (_flops_per_token(cfg, seq_len) - head) / _layers(cfg)
    passes = [((kept + redone) * layer / 3 + heads * head / 3, redone * layer / 3)
              for kept, redone, heads in _stage_parts(cfg, key, redo)]
    lists = pipeline.action_lists(plan, micro_num)
    seconds = {rank: [_action_flops(a.kind, a.stage, *passes[a.stage]) for a in actions]
               for rank, actions in lists.items()}
    span = pipeline.replay(lists, seconds, plan.stages).span
    whole = micro_num * sum(3 * f + r for f, r in passes)
    busiest = max(seconds, key=lambda rank: sum(seconds[rank]))
    parts = _stage_parts(cfg, key, redo)
    head_here = any(parts[a.stage][2] for a in lists[busiest])
    return sum(seconds[busiest]), span, whole, head_here


def bubble_fraction(cfg, plan: Plan, wl: Workload) -> float:
    """The pipeline step's idle time over its busiest rank's compute: of the replayed schedule
    (``_pipeline_timeline``) for a plan the planner runs, else the schedule's closed form
    (``pipeline_bubble_fraction``)."""
    if plan.pp == 1 or modelled(cfg, plan) != "planner":
        return pipeline_bubble_fraction(plan, wl.micro_num)
    busy, span, _, _ = _pipeline_timeline(cfg, _pp_key(plan), wl.micro_num, wl.seq_len,
                                          recomputed_layers(plan, _layers(cfg), wl.remat))
    return span / busy - 1


def attention_efficiency(plan: Plan, profile: Profile) -> float:
    """The profile's attention efficiency for the kernel ``plan`` runs: with the sequence split
    (Ulysses, ring) evo's log-sum-exp attention (``context._Ring``), else SDPA / flash."""
    dev = profile.device
    if plan.sp * plan.cp > 1:
        return dev.get("context_attention_efficiency", dev["attention_efficiency"])
    return dev["attention_efficiency"]


def optimizer_seconds(cfg, plan: Plan, profile: Profile) -> float:
    """AdamW over the parameters this rank updates (all of its pieces, or its ZeRO shard)."""
    params = rank_state(cfg, plan)["optimizer"] / 8
    return params * profile.device["optimizer_ns_per_param"] * 1e-9


def _exposed(key: str, t: float, plan: Plan, c: dict, profile: Profile, last: float) -> float:
    """The part of a collective's time the step waits for: bucketed data-parallel reductions
    hide behind the last micro-batch's backward (all but the last bucket), ZeRO-3's forward
    gathers behind the previous block (backward gathers on demand), ring steps behind attention."""
    ov = profile.cluster["overlap"]
    kind, axis = key.split("/")
    bucketed = plan.bucket_mb > 0 and plan.dp > 1 and plan.zero < 3 and not \
        (plan.sequence_parallel and plan.tp > 1)
    if bucketed and (key == "all_reduce/dp" or (plan.zero == 2 and key == "reduce_scatter/zero")):
        return max(t - ov * c["backward_micro"], last)
    if plan.zero == 3 and key == "all_gather/zero":
        return t / 2 + max(0.0, t / 2 - ov * c["forward"])
    if axis == "cp":
        return max(0.0, t - ov * c["attention"])
    return t


def comm_seconds(cfg, plan: Plan, wl: Workload, profile: Profile, c: dict
                 ) -> tuple[float, float]:
    """(total, exposed) seconds of the step's collectives."""
    step_bytes = comm_bytes(cfg, plan, wl)
    calls = collective_calls(cfg, plan, wl, step_bytes)
    total = exposed = 0.0
    for key, nbytes in step_bytes.items():
        kind, axis = key.split("/")
        if kind == "recv":        # arrives while the matching send leaves (full duplex)
            continue
        kind = "send_recv" if kind == "send" else kind
        n, per_node = _placement(plan, axis, profile)
        k = max(1, calls.get(key, 1))
        t = collective_seconds(profile, kind, nbytes, k, n, per_node)
        last = collective_seconds(profile, kind, min(nbytes, plan.bucket_mb * 2**20), 1, n,
                                  per_node)
        total += t
        exposed += _exposed(key, t, plan, c, profile, last)
    return total, exposed


# ------------------------------------------------------------------------------------ memory

def layer_activation_bytes(cfg, plan: Plan, wl: Workload) -> tuple[float, float]:
    """(bytes a layer keeps for backward per token, bytes a recomputed layer keeps) on one rank:
    what evo's decoder layer saves. Per half (attention, MLP): its input and the norm's normalised
    input (hidden-sized; split over tp with sequence parallelism), and the normed, weighted input
    of the projections (whole: gathered under sequence parallelism). Attention: the qkv
    projection's output (v is a view of it), q and k after rotary, the attention output; MLP:
    its two projections, the activation and the product (all split over tp). SDPA and flash
    attention keep no attention matrix. A recomputed layer keeps its input."""
    h, kv = cfg.hidden_size, _kv_dim(cfg)
    ffn = getattr(cfg, "intermediate_size", 4 * h)
    seq_tp = plan.sequence_tp
    full = (4 * h / seq_tp + 2 * h + (3 * h + 3 * kv + 4 * ffn) / plan.tp) * wl.act_bytes
    return full, h / seq_tp * wl.act_bytes


def head_activation_bytes(cfg, plan: Plan, wl: Workload) -> tuple[float, float]:
    """(bytes per token the head keeps from its forward to its backward, bytes its backward
    adds while it runs): the final norm's input, normalised and weighted input (as a layer
    half's) and the fp32 log-softmax of the logits; the logits' gradient and softmax (split over
    tp)."""
    seq_tp = plan.sequence_tp
    logits = cfg.vocab_size / plan.tp * 4
    return (2 * cfg.hidden_size / seq_tp + cfg.hidden_size) * wl.act_bytes + logits, 2 * logits


def _held(layers: int, redo: int, full: float, kept: float, head: float) -> float:
    """Bytes per token at backward's peak: when it starts, every layer's saved tensors (a
    recomputed layer's input only) and the head's; later, while a recomputed layer runs again,
    the kept inputs and that one layer's full set (the head's are freed by then)."""
    return redo * kept + max((layers - redo) * full + head, full if redo else 0.0)


def activation_bytes(cfg, plan: Plan, wl: Workload) -> float:
    """Activations of the micro-batches in flight on the busiest rank. For a plan the planner
    accepts: with pipeline stages, each pp rank's micro-batches in flight under its schedule,
    stage by stage (``_stage_activations``, as ``pipeline.stage_report`` counts); with a sequence
    group, ``context.activation_bytes``. Otherwise (and for plain dp × tp): ``_held`` of the
    layers and the head, on the sequence split over sp · cp; 1F1B's first stage holds ``pp``
    micro-batches (interleaved: × (1 + (p−1)/(p·v)), Megatron's factor)."""
    planned = modelled(cfg, plan) == "planner"
    if planned and plan.pp > 1:
        return max(_stage_activations(cfg, plan, wl, r) for r in pp_ranks(cfg, plan, wl.remat))
    if planned and plan.sp * plan.cp > 1 and hasattr(cfg, "kv_heads"):
        return _context_activations(cfg, plan, wl)
    layers = _layers(cfg)
    tokens = wl.tokens_per_micro / (plan.sp * plan.cp)
    full, kept = layer_activation_bytes(cfg, plan, wl)
    redo = recomputed_layers(plan, layers, wl.remat)
    head = sum(head_activation_bytes(cfg, plan, wl))
    if plan.pp == 1:
        return tokens * _held(layers, redo, full, kept, head)
    in_flight = min(plan.pp, wl.micro_num)
    if plan.pp_schedule == "interleaved":
        in_flight *= 1 + (plan.pp - 1) / (plan.pp * plan.pp_virtual)
    per_micro = tokens * ((layers - redo) * full + redo * kept) / plan.pp
    return per_micro * in_flight + tokens * (full if redo else 0) + tokens * head


@functools.lru_cache(maxsize=4096)
def _pipeline_held(cfg, key: tuple, micro_num: int, redo: int, tp: int) -> tuple:
    """Per pp rank, the distinct moments of its action list (``pipeline.held_moments``) as
    (layers holding their whole set, recomputed layers holding their input, heads, recomputed
    layers running again, heads running backward, fp32 bytes of weight gradients, fp32 bytes of
    summed weight gradients): each stage's forward in flight holds its own layers and head —
    the model's first ``redo`` layers recomputed — until its full or weight backward (a
    zero-bubble input backward retains the graph); while a stage runs backward, the head's
    gradients, and later one recomputed layer's whole set, besides; when its full or weight
    backward ends, the gradients of its weights (tensor-parallel pieces: ``_block_bytes``)
    before they are summed into the earlier ones, and from then on their running sum."""
    plan = _pp_plan(key)
    sizes = dict(zip((b.name for b in models.blocks(cfg)), _block_bytes(cfg, tp)))
    per_stage = _stage_parts(cfg, key, redo)
    grads = [sum(sizes[b.name] for b in blocks) for blocks in _split(cfg, key)]
    lists = pipeline.action_lists(plan, micro_num)
    out = []
    for r in range(key[0]):
        stages = pipeline.rank_stages(plan, r)
        out.append(_undominated(pipeline.held_moments(
            lists[r], {s: per_stage[s] + (0, 0, 0, 0) for s in stages},
            {s: ((0, 0, 0, int(per_stage[s][1] > 0), 0, 0, 0),
                 (0, 0, 0, 0, per_stage[s][2], 0, 0)) for s in stages},
            {s: (0, 0, 0, 0, 0, grads[s], 0) for s in stages},
            {s: (0, 0, 0, 0, 0, 0, grads[s]) for s in stages})))
    return tuple(out)


def _undominated(moments: set[tuple]) -> tuple:
    """The moments no other one holds at least as much of in every part: the only ones whose
    bytes (non-negative weights of the parts) can be the most."""
    kept: list[tuple] = []
    for m in sorted(moments, key=sum, reverse=True):
        if not any(all(a >= b for a, b in zip(k, m)) for k in kept):
            kept.append(m)
    return tuple(kept)


def _stage_activations(cfg, plan: Plan, wl: Workload, r: int, summed: bool = False
                       ) -> float:
    """Pipeline rank ``r``: the most its stages' micro-batches in flight hold at once
    (``_pipeline_held``), each stage's own layers (``layer_activation_bytes``, a recomputed
    layer its input) and head (``head_activation_bytes``); while a stage runs backward the
    head's gradients, then a recomputed layer's whole set, besides; when it ends, its weights'
    gradients in the compute dtype. ``summed``: with the running sum of the weights' gradients
    (fp32) where it exists at that moment — the rank's peak beside its weights and optimizer
    state."""
    redo = recomputed_layers(plan, _layers(cfg), wl.remat)
    full, kept = layer_activation_bytes(cfg, plan, wl)
    head, grads = head_activation_bytes(cfg, plan, wl)
    moments = _pipeline_held(cfg, _pp_key(plan), wl.micro_num, redo, plan.tp)[r]
    return max(wl.tokens_per_micro * (n * full + k * kept + h * head + again * full
                                      + back * grads) + weights * wl.act_bytes / 4
               + (total if summed else 0)
               for n, k, h, again, back, weights, total in moments)


def _context_activations(cfg, plan: Plan, wl: Workload) -> float:
    """``context.activation_bytes`` per row, times the rows of a micro-batch, with the head as
    ``_held`` counts it; a recomputed layer keeps its input alone (one layer recomputed at a
    time, after the head's backward)."""
    one = context.activation_bytes(_with_layers(cfg, 1), plan, wl.seq_len, wl.act_bytes)["total"]
    two = context.activation_bytes(_with_layers(cfg, 2), plan, wl.seq_len, wl.act_bytes)["total"]
    layer, layers = two - one, _layers(cfg)
    redo = recomputed_layers(plan, layers, wl.remat)
    local = wl.seq_len // (plan.sp * plan.cp)
    kept = local * cfg.hidden_size * wl.act_bytes
    # the head as ``_held`` counts it (its forward's tensors and, while its backward runs, the
    # logits' gradient and softmax) in place of ``context``'s forward-only count; freed before
    # a recomputed layer runs again
    base = one - layer - local * (cfg.hidden_size + cfg.vocab_size // plan.tp) * wl.act_bytes
    head = local * sum(head_activation_bytes(cfg, plan, wl))
    row = redo * kept + max(base + head + (layers - redo) * layer, base + layer if redo else 0)
    return wl.micro_batch * row


def memory_bytes(cfg, plan: Plan, wl: Workload, profile: Profile) -> dict[str, float]:
    """Peak bytes per rank: weights, AdamW state, the compute-dtype copy of the weights, and the
    largest of four moments' gradients and transients: backward (the gradients accumulated so
    far — the whole buffer below ZeRO-3 —, the activations, the block ZeRO-3 or weight
    parallelism has gathered, the gradient buckets); the one bucket's reduction after backward;
    the update (the gradients and AdamW's temporaries, once backward has freed the
    activations); the end of a micro-batch's backward (``_accumulation_bytes``: the running sum
    and that micro-batch's gradients). Times the profile's allocator overhead."""
    b = rank_state(cfg, plan)
    params, opt = b["params"], b["optimizer"]
    local = rank_state(cfg, _unsharded(plan))["params"]
    grads = b["grads"] if plan.zero == 3 else local
    cast = (params if plan.zero < 3 else 0) * wl.act_bytes / 4 if wl.act_bytes < 4 else 0
    update = opt / 2 + (opt / 2 if plan.zero in (1, 2) else 0)   # sqrt(v) and the shard copy
    # ZeRO-3, weight parallelism: the gathered weights of the block backward runs (gathered on
    # demand: the next block's are prefetched in forward only, when the activations are fewer)
    largest = _largest_block_bytes(cfg, plan) / plan.pp
    gather = largest * wl.act_bytes / 4 if planner.stored_shard_axis(plan) else 0
    # a bucket's gradients concatenated, and the reduction's result (at most all of them)
    bucketed = _bucketed(plan)
    buckets = 2 * min(plan.bucket_mb * 2**20, local) if bucketed else 0
    out = {"params": params, "grads": grads, "optimizer": opt, "compute_copy": cast,
           "update": update, "activations": activation_bytes(cfg, plan, wl),
           "buffers": gather + buckets}
    # backward starts with the accumulated gradients of the earlier micro-batches (none with one
    # micro-batch: its gradients — ZeRO-3's and weight parallelism's reduce-scattered shards —
    # appear as its activations are freed)
    accumulated = grads if wl.micro_num > 1 else 0
    during, after = out["activations"] + out["buffers"], 0.0
    if plan.pp > 1 and modelled(cfg, plan) == "planner":   # each stage's sum, when it exists
        accumulated = 0
        during = out["buffers"] + max(_stage_activations(cfg, plan, wl, r, summed=True)
                                      for r in pp_ranks(cfg, plan, wl.remat))
    if bucketed and local <= plan.bucket_mb * 2**20:
        # one bucket holds every gradient: complete, and reduced, once backward is done, with
        # the gradients alive once more when they were accumulated (the running sum and the
        # last micro-batch's total) and under ZeRO-2 (the rows padded for the reduce-scatter),
        # beside the bucket, its reduction and ZeRO-2's shard (measured by the sweep's live peak)
        copies = 1 + (wl.micro_num > 1) + (plan.zero == 2)
        during -= buckets
        after = copies * grads + buckets + (b["grads"] if plan.zero == 2 else 0)
    first = _first_block_bytes(cfg, plan) / plan.pp
    moments = (accumulated + during, after, grads + update,   # backward, its bucket, the update
               _accumulation_bytes(plan, wl, grads, first))   # and a micro-batch's end
    out["total"] = (params + opt + cast + max(moments)) * (1 + profile.device["memory_overhead"])
    return out


def _bucketed(plan: Plan) -> bool:
    """Whether the planner reduces the gradients in buckets during backward: not under ZeRO-3,
    which reduces per block, nor with sequence parallelism over tp, whose norm gradients
    complete over tp first."""
    return plan.bucket_mb > 0 and plan.dp > 1 and plan.zero < 3 and \
        not (plan.sequence_parallel and plan.tp > 1)


def _accumulation_bytes(plan: Plan, wl: Workload, grads: float, first: float) -> float:
    """Gradient bytes when a micro-batch's backward ends and its gradients are not yet summed
    into the earlier ones' (``train.Accumulator.add_grads`` adds them once
    ``torch.autograd.grad`` has returned them all): the running sum and the micro-batch's
    gradients, ``2 · grads``. Under ZeRO-3 and weight parallelism the block backward ends with
    (the first: ``first`` fp32 bytes of tensor-parallel pieces) holds two whole copies
    besides, in the compute dtype: its gathered weights and its gradient (the copy gloo's
    coalesced reduce-scatter makes of its input is freed on gloo's thread by then: 55.7 MiB
    measured for the 55.7 of two copies, on the CPU sweep's model). Only where a micro-batch
    other than the last runs backward without a gradient sink: ``micro_num >= 2`` without
    gradient buckets, ``>= 3`` with them (the last one hands its gradients to the buckets);
    pipeline schedules accumulate in their own order (``_stage_activations``)."""
    if plan.pp > 1 or wl.micro_num < 2 + _bucketed(plan):
        return 0.0
    gathered = planner.stored_shard_axis(plan) is not None
    return 2 * grads + (2 * first * wl.act_bytes / 4 if gathered else 0.0)


@functools.lru_cache(maxsize=65536)
def _unsharded(plan: Plan) -> Plan:
    """The plan without ZeRO: every data-parallel rank holds its whole tensor-parallel pieces."""
    import dataclasses
    return dataclasses.replace(plan, zero=0)


def _largest_block_bytes(cfg, plan: Plan) -> float:
    """fp32 bytes of the largest block's tensor-parallel pieces (what ZeRO-3 gathers at once)."""
    return _largest_block(cfg if not _layered(cfg) else _with_layers(cfg, 1), plan.tp)


def _first_block_bytes(cfg, plan: Plan) -> float:
    """fp32 bytes of the first block's tensor-parallel pieces (the embedding: the block a
    micro-batch's backward ends with)."""
    return _block_bytes(cfg if not _layered(cfg) else _with_layers(cfg, 1), plan.tp)[0]


def _largest_block(cfg, tp: int) -> float:
    return max(_block_bytes(cfg, tp))


@functools.lru_cache(maxsize=1024)
def _block_bytes(cfg, tp: int) -> tuple[float, ...]:
    """fp32 bytes of each block's tensor-parallel pieces, in the model's order."""
    layouts = model_layouts(Plan(tp=tp).resolve(tp), cfg)
    return tuple(sum(math.prod(layouts[k].local_shape) * 4 for k in b.params)
                 for b in models.blocks(cfg))


# -------------------------------------------------------------------------------- prediction

@dataclass(frozen=True)
class Prediction:
    plan: Plan
    workload: Workload
    step_seconds: float
    compute_seconds: float
    comm_seconds: float          # exposed
    comm_total_seconds: float    # including what overlaps hide
    bubble_seconds: float
    optimizer_seconds: float
    tokens_per_second_per_device: float
    memory: dict
    modelled: str = "planner"    # or "formula": see ``modelled``

    @property
    def peak_gib(self) -> float:
        return self.memory["total"] / 2**30

    def as_dict(self) -> dict:
        import dataclasses
        p = {k: v for k, v in dataclasses.asdict(self.plan).items() if k != "rules"}
        return {"plan": p, "micro_batch": self.workload.micro_batch,
                "micro_num": self.workload.micro_num, "remat": self.workload.remat,
                "modelled": self.modelled,
                "step_seconds": self.step_seconds,
                "tokens_per_second_per_device": self.tokens_per_second_per_device,
                "peak_gib": self.peak_gib,
                "time": {"compute": self.compute_seconds, "exposed_comm": self.comm_seconds,
                         "bubble": self.bubble_seconds, "optimizer": self.optimizer_seconds,
                         "comm_total": self.comm_total_seconds},
                "memory_gib": {k: v / 2**30 for k, v in self.memory.items()}}


def predict(cfg, plan: Plan, wl: Workload, profile: Profile, *, memory: dict | None = None
            ) -> Prediction:
    """Step time and peak memory per rank of a resolved ``plan`` running ``wl`` on ``profile``
    (``memory``: ``memory_bytes`` of the same, when the caller has it)."""
    c = compute_seconds(cfg, plan, wl, profile)
    comm_total, exposed = comm_seconds(cfg, plan, wl, profile, c)
    tp_comm = exposed if plan.pp > 1 else 0.0
    bubble = bubble_fraction(cfg, plan, wl) * (c["total"] + tp_comm)
    opt = optimizer_seconds(cfg, plan, profile)
    step = c["total"] + exposed + bubble + opt
    tokens = wl.micro_num * wl.tokens_per_micro * plan.dp
    return Prediction(plan, wl, step, c["total"], exposed, comm_total, bubble, opt,
                      tokens / step / plan.world_size,
                      memory or memory_bytes(cfg, plan, wl, profile), modelled(cfg, plan))
