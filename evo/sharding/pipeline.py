"""Pipeline parallelism: the model's blocks split into stages over the ``pp`` ranks, and a
schedule that runs the micro-batches of one step through them.

- **Stages**: ``plan.pp · plan.pp_virtual`` contiguous slices of the family's ``blocks(cfg)`` (the
  embedding on the first stage, head and loss on the last): ``plan.pp_layers`` blocks each, or
  balanced by parameter count (interleaved schedules: the same number of blocks per stage). Stage
  ``s`` runs on pp rank ``s mod pp`` (a loop), or for ``zbv`` in a V: rank ``r`` holds stages ``r``
  and ``2·pp − 1 − r``. A rank holds only its stages' parameters; a tied embedding lives on the
  first and the last stage, its gradient summed over the pp ranks.
- **Schedules**: each rank's list of actions ``F`` (forward), ``B`` (full backward), ``I``
  (backward to the stage input), ``W`` (backward to the weights) on (stage, micro-batch). 1F1B is
  generated here; interleaved, ZB-H1 and ZB-V are the ``pipeline_order`` of
  ``torch.distributed.pipelining``'s ``ScheduleInterleaved1F1B``,
  ``ScheduleInterleavedZeroBubble`` (one stage per rank) and ``ScheduleZBVZeroBubble``, built from
  stage descriptors (no module).
- **Executor**: evo's own (``PipelineSchedule``, a ``train.Schedule``): a stage is the pure block
  functions over its slice of the flat params; activations and their gradients travel by
  ``isend`` / ``irecv`` on the pp group (counted as ``send/pp``, ``recv/pp``); the time spent
  waiting in receives over the whole is the step's measured idle fraction.
- **Replay**: ``replay`` lays the action lists out in time from given durations (each action as
  soon as its rank is free and its inputs exist): with the executor's measured per-action costs
  it is the schedule's own idle fraction, free of how the machine shares its cores.
"""
from __future__ import annotations

import math
import time
import types
from typing import NamedTuple

import torch
import torch.distributed as dist

from evo import models, train
from evo.models import family as family_mod
from evo.sharding.layout import model_layouts

# ------------------------------------------------------------------------------ stage split


def stage_blocks(cfg, plan) -> list[list]:
    """The family's blocks cut into ``plan.stages`` contiguous stages. ValueError naming the
    field when a stage would have no block or the split does not fit the schedule."""
    blocks = models.blocks(cfg)
    n, stages = len(blocks), plan.stages
    if plan.pp_layers is not None:
        if sum(plan.pp_layers) != n:
            raise ValueError(f"plan.pp_layers={plan.pp_layers} counts {sum(plan.pp_layers)} "
                             f"blocks, but the model has {n} (embedding, layers, head)")
        counts = list(plan.pp_layers)
    elif n < stages:
        raise ValueError(f"plan.pp × plan.pp_virtual = {stages} stages, but the model has only "
                         f"{n} blocks (embedding, layers, head): a stage would have no block")
    elif plan.pp_virtual > 1:
        if n % stages:
            raise ValueError(f"plan.pp_schedule={plan.pp_schedule!r}: the model's {n} blocks do "
                             f"not divide into plan.pp × plan.pp_virtual = {stages} equal stages "
                             "(set plan.pp_layers)")
        counts = [n // stages] * stages
    else:
        counts = _balanced([_cost(cfg, b) for b in blocks], stages)
    out, i = [], 0
    for c in counts:
        out.append(blocks[i:i + c])
        i += c
    return out


def _cost(cfg, block) -> int:
    specs = models.param_specs(cfg)
    return sum(math.prod(specs[k].shape) for k in block.params)


def _balanced(costs: list[int], parts: int) -> list[int]:
    """Contiguous counts (each ≥ 1) minimising the largest part's cost (dynamic programming)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    best = {(0, 0): (0, [])}
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            options = [(max(best[(k - 1, i)][0], prefix[j] - prefix[i]), best[(k - 1, i)][1] +
                        [j - i]) for i in range(k - 1, j) if (k - 1, i) in best]
            best[(k, j)] = min(options)
    return best[(parts, n)][1]


def stage_rank(plan, stage: int) -> int:
    """The pp rank running ``stage``."""
    if plan.pp_schedule == "zbv":
        return stage if stage < plan.pp else 2 * plan.pp - 1 - stage
    return stage % plan.pp


def rank_stages(plan, pp_index: int) -> list[int]:
    return [s for s in range(plan.stages) if stage_rank(plan, s) == pp_index]


def rank_blocks(cfg, plan, pp_index: int) -> list:
    """The blocks pp rank ``pp_index`` runs (every block without pipeline), in model order."""
    split = stage_blocks(cfg, plan) if plan.pp > 1 else [models.blocks(cfg)]
    return [b for s, blocks in enumerate(split) for b in blocks
            if plan.pp == 1 or stage_rank(plan, s) == pp_index]


def count_pp(add, cfg, plan, pp_index: int, *, micro_num: int, sources: int,
             act_bytes: int) -> None:
    """What ``expected_comm_bytes`` adds for pp rank ``pp_index``: per micro-batch, each stage
    boundary crossing ranks sends the activation forward and its gradient back (``act_bytes``
    each); per step, the tied gradients' sum, the norm's square and the loss and per-source sums
    reduced over ``pp``."""
    last = plan.stages - 1
    for s in rank_stages(plan, pp_index):
        for nb in (s - 1, s + 1):
            if 0 <= nb <= last and stage_rank(plan, nb) != pp_index:
                add("send", "pp", act_bytes, micro_num)
                add("recv", "pp", act_bytes, micro_num)
    full = model_layouts(plan, cfg)
    for k in tied_params(cfg, plan):
        add("all_reduce", "pp", math.prod(_grad_shape(full[k], plan)) * 4)
    add("all_reduce", "pp", 4, 3)                                  # norm², loss, idle
    add("all_reduce", "pp", 4 * sources, 2 if sources else 0)      # per-source loss, tokens


def owners(cfg, plan) -> dict[str, list[int]]:
    """Every parameter's holders: the pp ranks whose stages' blocks read it, in order (two for a
    tied embedding read by the first and the last stage)."""
    split = stage_blocks(cfg, plan)
    out: dict[str, list[int]] = {k: [] for k in models.param_specs(cfg)}
    for s, blocks in enumerate(split):
        r = stage_rank(plan, s)
        for b in blocks:
            for k in b.params:
                if r not in out[k]:
                    out[k] = sorted(out[k] + [r])
    return out


def local_layouts(layouts: dict, cfg, plan, pp_index: int, *, primary: bool = False) -> dict:
    """``layouts`` restricted to what pp rank ``pp_index`` holds (with ``primary``: only those of
    which it is the first holder, the one that writes them). Unchanged without pipeline."""
    if plan.pp == 1:
        return layouts
    own = owners(cfg, plan)
    return {k: v for k, v in layouts.items()
            if pp_index in own[k] and (not primary or own[k][0] == pp_index)}


def tied_params(cfg, plan) -> list[str]:
    """Parameters held by more than one pp rank (a tied embedding)."""
    return [k for k, r in owners(cfg, plan).items() if len(r) > 1] if plan.pp > 1 else []


def _grad_shape(lay, plan) -> tuple[int, ...]:
    return lay.shard_shape if plan.zero in (1, 2) else lay.local_shape


def sum_tied(cfg, grads: dict, layouts: dict, mesh, comm) -> dict:
    """The synchronised gradients with those of a parameter held by several stages (a tied
    embedding) summed over the pp ranks (zeros from the ranks not holding it)."""
    full = model_layouts(mesh.plan, cfg)
    for k in tied_params(cfg, mesh.plan):
        g = grads.get(k)
        if g is None:
            device = next(iter(grads.values())).device
            g = torch.zeros(_grad_shape(full[k], mesh.plan), device=device)
        total = comm.all_reduce(g, "pp")
        if k in grads:
            grads[k] = total
    return grads


def grad_norm(cfg, grads: dict, mesh, comm, local_norm) -> torch.Tensor:
    """The global norm over the stages: ``local_norm`` of the gradients this rank writes (a tied
    parameter counted on its first holder only), squares summed over pp."""
    own = owners(cfg, mesh.plan)
    mine = {k: g for k, g in grads.items() if own[k][0] == mesh.coords["pp"]}
    return comm.all_reduce(local_norm(mine) ** 2, "pp").sqrt()


def gather_stages(cfg, params: dict, layouts: dict, mesh, comm) -> dict:
    """Every parameter's piece on every pp rank (from its first holder): what ``gather_params``
    then gathers over the other axes."""
    own, pp_index = owners(cfg, mesh.plan), mesh.coords["pp"]
    device = next(iter(params.values())).device
    out = {}
    for k, lay in layouts.items():
        x = params[k] if own[k][0] == pp_index else \
            torch.zeros(lay.local_shape, dtype=next(iter(params.values())).dtype, device=device)
        out[k] = comm.all_reduce(x, "pp")
    return out


def check(cfg, plan, micro_num: int | None = None) -> None:
    """The pipeline fields against the model and the data, before any process group."""
    if plan.pp == 1:
        return
    if plan.zero == 3:
        raise ValueError("plan.zero=3 with plan.pp>1 is not supported: ZeRO-3 gathers every "
                         "block's weights per micro-batch; use plan.zero ≤ 2 with pipelines")
    stage_blocks(cfg, plan)
    if micro_num is not None and micro_num < plan.pp:
        raise ValueError(f"data.micro_num={micro_num} must be at least plan.pp={plan.pp}: the "
                         "pipeline's micro-batches are the step's micro-batches")


# ---------------------------------------------------------------------------------- schedules

class Action(NamedTuple):
    kind: str        # "F", "B" (full backward), "I" (backward input), "W" (backward weight)
    stage: int
    micro: int


def action_lists(plan, micro_num: int) -> dict[int, list[Action]]:
    """Every pp rank's ordered actions for one step of ``micro_num`` micro-batches."""
    p = plan.pp
    if plan.pp_schedule == "1f1b":
        return {r: _one_f_one_b(p, r, micro_num) for r in range(p)}
    from torch.distributed.pipelining import schedules as S
    cls = {"interleaved": S.ScheduleInterleaved1F1B, "zbh1": S.ScheduleInterleavedZeroBubble,
           "zbv": S.ScheduleZBVZeroBubble}[plan.pp_schedule]
    out = {}
    for r in range(p):
        stages = [types.SimpleNamespace(num_stages=plan.stages, group_size=p, group_rank=r,
                                        stage_index=s, is_first=s == 0,
                                        is_last=s == plan.stages - 1, submod=None,
                                        stage_index_to_group_rank=None)
                  for s in rank_stages(plan, r)]
        order = cls(stages, n_microbatches=micro_num).pipeline_order[r]
        out[r] = [Action(a.computation_type.value, a.stage_index, a.microbatch_index)
                  for a in order if a is not None]
    return out


def _one_f_one_b(p: int, r: int, m: int) -> list[Action]:
    warmup = min(p - r - 1, m)
    out = [Action("F", r, i) for i in range(warmup)]
    for i in range(m - warmup):
        out += [Action("F", r, warmup + i), Action("B", r, i)]
    return out + [Action("B", r, i) for i in range(m - warmup, m)]


def bubble_fraction(plan, micro_num: int) -> float:
    """The schedule's idle time as a fraction of the busy time, with equal forward, input- and
    weight-backward times: ``(p−1)/m`` (1F1B), ``(p−1)/(v·m)`` (interleaved), ``(p−1)/(3m)`` for
    ZB-H1 (arXiv 2401.10241: a third of 1F1B's, the weight passes filling the rest; ``replay`` of
    torch's order gives exactly this), 0 for ZB-V (the paper's ideal)."""
    if plan.pp == 1 or plan.pp_schedule == "zbv":
        return 0.0
    if plan.pp_schedule == "zbh1":
        return (plan.pp - 1) / (3 * micro_num)
    return (plan.pp - 1) / (plan.pp_virtual * micro_num)


def in_flight(plan, micro_num: int, pp_index: int) -> int:
    """The most micro-batches whose forward activations rank ``pp_index`` holds at once, summed
    over its stages (an action list's high-water mark)."""
    return high_water(action_lists(plan, micro_num)[pp_index])


def high_water(actions) -> int:
    """The most forwards of one rank's action list not yet released by a full (``B``) or weight
    (``W``) backward at any point of the list."""
    return max((n for n, in held_moments(actions, dict.fromkeys({a.stage for a in actions},
                                                                (1,)))), default=0)


def held_moments(actions, per_micro: dict, during: dict | None = None,
                 after: dict | None = None, summed: dict | None = None) -> set[tuple]:
    """What one rank's forwards in flight hold at every point of its action list, the distinct
    sums: a forward of stage ``s`` not yet released by a full (``B``) or weight (``W``) backward
    holds ``per_micro[s]`` (a tuple, its parts summed apart); while a backward (``B``, ``I`` or
    ``W``) of stage ``s`` runs, each of ``during[s]`` besides, one moment each (the head's
    gradients, then a recomputed layer's tensors); when a ``B`` or ``W`` has released its
    forward, ``after[s]`` besides (the stage's weight gradients, not yet summed into the
    earlier micro-batches'); from then on, ``summed[s]`` in every moment (the running sum those
    gradients become: none before a stage's first ``B`` or ``W`` ends — zero-bubble schedules
    defer their ``W`` past forwards and input backwards)."""
    live = dict.fromkeys(per_micro, 0)
    width = len(next(iter(per_micro.values()), ()))
    summing: set = set()

    def total(extra=None):
        out = [sum(live[s] * per_micro[s][i] for s in live)
               + sum(summed[s][i] for s in summing) for i in range(width)]
        return tuple(o + e for o, e in zip(out, extra)) if extra else tuple(out)
    moments = {total()}
    for a in actions:
        if during and a.kind in ("B", "I", "W"):
            moments.update(total(extra) for extra in during.get(a.stage, ()))
        live[a.stage] += 1 if a.kind == "F" else -1 if a.kind in ("B", "W") else 0
        if after and a.kind in ("B", "W"):
            moments.add(total(after.get(a.stage)))
        if summed and a.kind in ("B", "W"):
            summing.add(a.stage)
        moments.add(total())
    return moments


class Timeline(NamedTuple):
    idle: float                  # 1 − busy / (ranks · span): the schedule's bubble
    span: float                  # when the last action ends
    start: dict                  # Action -> when it starts


def replay(lists: dict[int, list[Action]], seconds: dict[int, list[float]],
           stages: int) -> Timeline:
    """The timeline of action lists with given durations (``seconds[r][j]``: rank ``r``'s
    ``j``-th action), messages taking no time: each rank runs its actions in order, each as soon
    as the rank is free and its inputs exist — ``F`` of (s, i) after ``F`` of (s−1, i); ``B`` or
    ``I`` of (s, i) after ``F`` of (s, i) and the input gradient (``B`` or ``I``) of (s+1, i);
    ``W`` after ``I`` of (s, i). ValueError on a deadlock."""
    done: dict = {}                              # (kind, stage, micro) -> end
    start, free, pos = {}, dict.fromkeys(lists, 0.0), dict.fromkeys(lists, 0)
    while any(pos[r] < len(lists[r]) for r in lists):
        moved = False
        for r, actions in lists.items():
            while pos[r] < len(actions):
                a = actions[pos[r]]
                need = _needs(a, stages - 1)
                if not all(n in done for n in need):
                    break
                start[a] = max([free[r]] + [done[n] for n in need])
                free[r] = start[a] + seconds[r][pos[r]]
                done[(a.kind, a.stage, a.micro)] = free[r]
                if a.kind == "I":                # the input gradient is what stage s−1 needs
                    done[("B", a.stage, a.micro)] = free[r]
                pos[r], moved = pos[r] + 1, True
        if not moved:
            raise ValueError(f"the action lists deadlock at {pos}")
    span = max(free.values())
    busy = sum(sum(v) for v in seconds.values())
    return Timeline(1 - busy / (len(lists) * span) if span > 0 else 0.0, span, start)


def _needs(a: Action, last: int) -> list[tuple]:
    if a.kind == "F":
        return [("F", a.stage - 1, a.micro)] if a.stage else []
    if a.kind == "W":
        return [("I", a.stage, a.micro)]
    return [("F", a.stage, a.micro)] + ([("B", a.stage + 1, a.micro)] if a.stage < last else [])


# ----------------------------------------------------------------------------------- executor

_KINDS = {"F": 0, "B": 1}


class PipelineSchedule:
    """A ``train.Schedule`` running this rank's stages by the plan's action list. After a call,
    ``idle`` holds the fraction of the call's time spent waiting in receives, and ``seconds``
    each action's compute cost: the CPU time of the calling thread (receives excluded), in the
    order of ``action_lists(plan, micro_num)[pp_index]`` (what ``replay`` takes)."""

    def __init__(self, cfg, mesh, comm):
        self.cfg, self.plan, self.comm = cfg, mesh.plan, comm
        self.pp_index = mesh.coords["pp"]
        self.split = stage_blocks(cfg, self.plan)
        self.group = mesh.groups.get("pp")
        self.idle, self.seconds = 0.0, []

    def __call__(self, step, leaves, batch, scale, regions, acc, on_ready) -> None:
        micros = list(train.micro_batches(batch))
        if len(micros) < self.plan.pp:
            raise ValueError(f"data.micro_num={len(micros)} must be at least plan.pp="
                             f"{self.plan.pp}: the pipeline's micro-batches are the step's")
        run = _Run(self, step, leaves, micros, scale, regions, acc)
        t0, self.seconds = time.perf_counter(), []
        for a in action_lists(self.plan, len(micros))[self.pp_index]:
            c0, w0 = time.thread_time(), run.waited_cpu
            getattr(run, a.kind)(a.stage, a.micro)
            self.seconds.append(time.thread_time() - c0 - (run.waited_cpu - w0))
        for w in run.sends:
            w.wait()
        total = time.perf_counter() - t0
        self.idle = run.waited / total if total > 0 else 0.0
        if on_ready is not None:
            for k, g in acc.grads.items():
                on_ready(k, g)

    def __eq__(self, other) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)


class _Run:
    """One step's execution state on this rank: saved stage inputs and outputs, the gradients of
    outputs awaiting a weight pass, the messages in flight."""

    def __init__(self, sched: PipelineSchedule, step, leaves, micros, scale, regions, acc):
        self.s, self.step, self.leaves, self.micros = sched, step, leaves, micros
        self.scale, self.regions, self.acc = scale, regions, acc
        self.saved: dict = {}          # (stage, micro) -> (input or None, output)
        self.douts: dict = {}          # (stage, micro) -> output gradient kept for W
        self.local: dict = {}          # messages between two stages of this rank
        self.sends: list = []
        self.waited = self.waited_cpu = 0.0   # wall-clock and thread CPU seconds in receives
        self.last = sched.plan.stages - 1

    # -- messages
    def _tag(self, kind: str, stage: int, micro: int) -> int:
        return (_KINDS[kind] * self.s.plan.stages + stage) * len(self.micros) + micro

    def _send(self, x: torch.Tensor, kind: str, to_stage: int, micro: int) -> None:
        peer = stage_rank(self.s.plan, to_stage)
        x = x.detach().contiguous()
        if peer == self.s.pp_index:
            self.local[(kind, to_stage, micro)] = x
            return
        self.s.comm.log.add("send", "pp", x)
        self.sends.append(dist.isend(x, group=self.s.group, group_dst=peer,
                                     tag=self._tag(kind, to_stage, micro)))

    def _recv(self, kind: str, stage: int, micro: int, from_stage: int) -> torch.Tensor:
        if (kind, stage, micro) in self.local:
            return self.local.pop((kind, stage, micro))
        tokens = self.micros[micro][0]
        seq = tokens.shape[1] // (self.s.plan.tp if self.regions.sp else 1)
        x = torch.empty((tokens.shape[0], seq, self.s.cfg.hidden_size),
                        dtype=self.step.compute_dtype, device=tokens.device)
        t0, c0 = time.perf_counter(), time.thread_time()
        dist.irecv(x, group=self.s.group, group_src=stage_rank(self.s.plan, from_stage),
                   tag=self._tag(kind, stage, micro)).wait()
        self.waited += time.perf_counter() - t0
        self.waited_cpu += time.thread_time() - c0
        self.s.comm.log.add("recv", "pp", x)
        return x

    def _params(self, stage: int) -> list[str]:
        return list(dict.fromkeys(k for b in self.s.split[stage] for k in b.params))

    # -- actions
    def F(self, stage: int, micro: int) -> None:
        tokens, labels, positions, cu = self.micros[micro]
        x = None if stage == 0 else self._recv("F", stage, micro, stage - 1).requires_grad_(True)
        fam, step = models.family_of(self.s.cfg), self.step
        params = {k: self.leaves[k] for k in self._params(stage)}
        if models.is_concrete(tokens):
            fam.check_inputs(self.s.cfg, tokens, positions, cu)
        out = family_mod.run_blocks(
            fam, self.s.cfg, params, tokens, family_mod.default_positions(tokens, positions, cu),
            family_mod.Attend(cu, step.attention), regions=self.regions,
            op=family_mod.ops(step.kernels), remat=step.remat, blocks=self.s.split[stage], x=x)
        if stage == self.last:
            losses = self.regions.cross_entropy(out, labels)
            self.acc.add_losses(micro, labels, losses, self.scale)
            out = self.acc.backward_loss(losses.sum() * self.scale)
        else:
            self._send(out, "F", stage + 1, micro)
        self.saved[(stage, micro)] = (x, out)

    def _dout(self, stage: int, micro: int):
        return None if stage == self.last else self._recv("B", stage, micro, stage + 1)

    def B(self, stage: int, micro: int) -> None:
        x, out = self.saved.pop((stage, micro))
        names = self._params(stage)
        inputs = ([x] if x is not None else []) + [self.leaves[k] for k in names]
        g = torch.autograd.grad(out, inputs, self._dout(stage, micro), allow_unused=True)
        if x is not None:
            self._send(g[0], "B", stage - 1, micro)
            g = g[1:]
        self._add(names, g)

    def I(self, stage: int, micro: int) -> None:  # noqa: E743
        x, out = self.saved[(stage, micro)]
        dout = self._dout(stage, micro)
        self.douts[(stage, micro)] = dout
        if x is not None:
            (gx,) = torch.autograd.grad(out, [x], dout, retain_graph=True)
            self._send(gx, "B", stage - 1, micro)

    def W(self, stage: int, micro: int) -> None:
        _, out = self.saved.pop((stage, micro))
        names = self._params(stage)
        g = torch.autograd.grad(out, [self.leaves[k] for k in names],
                                self.douts.pop((stage, micro)), allow_unused=True)
        self._add(names, g)

    def _add(self, names, grads) -> None:
        self.acc.add_grads({k: torch.zeros_like(self.leaves[k]) if g is None else g
                            for k, g in zip(names, grads)})


# ------------------------------------------------------------------------------ the arithmetic

def stage_report(cfg, plan, *, micro_num: int, tokens_per_micro: int,
                 compute_dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per pp rank of a resolved plan: its stages and blocks; bytes of its params, grads and
    AdamW state; the most micro-batches in flight under the schedule and the activation bytes
    they hold — per micro-batch in flight, each layer's input (``tokens · hidden``, split over
    tp with sequence parallelism) and the head's norm input and logits with their log-softmax
    (``tokens · (hidden + 2 · vocab / tp)``): what a stage keeps under full recomputation
    (``remat=1``; without it a layer keeps a family-dependent multiple); point-to-point bytes
    sent and received per step; the schedule's bubble fraction (``bubble_fraction``)."""
    from evo.sharding import planner
    size = torch.empty((), dtype=compute_dtype).element_size()
    act = tokens_per_micro * cfg.hidden_size * size
    act //= plan.sequence_tp
    head = tokens_per_micro * (cfg.hidden_size + 2 * cfg.vocab_size // plan.tp) * size
    split, lists = stage_blocks(cfg, plan), action_lists(plan, micro_num)
    out = []
    for r in range(plan.pp):
        per_micro = {s: (sum(act if b.kind == "layer" else head if b.kind == "head" else 0
                             for b in split[s]),) for s in rank_stages(plan, r)}
        held = max(n for n, in held_moments(lists[r], per_micro))
        p2p: dict = {}
        count_pp(lambda kind, axis, n, times=1: p2p.__setitem__(kind, p2p.get(kind, 0) + n * times),
                 cfg, plan, r, micro_num=micro_num, sources=0, act_bytes=act)
        out.append({"pp_index": r, "stages": rank_stages(plan, r),
                    "blocks": [b.name for s in rank_stages(plan, r) for b in split[s]],
                    **planner.per_rank_bytes(cfg, plan, pp_index=r),
                    "in_flight": in_flight(plan, micro_num, r), "activations": held,
                    "p2p": p2p.get("send", 0) + p2p.get("recv", 0),
                    "bubble": bubble_fraction(plan, micro_num)})
    return out


def format_report(rows: list[dict]) -> str:
    """``stage_report`` as a table (GiB, and the bubble as a fraction)."""
    gb = lambda x: f"{x / 2**30:9.3f}"  # noqa: E731
    lines = [f"{'pp':>3} {'stages':<8}{'blocks':>7}{'params':>9}{'grads':>9}{'adam':>9}"
             f"{'in flight':>10}{'activ.':>9}{'p2p GiB':>9}  bubble"]
    for r in rows:
        lines.append(f"{r['pp_index']:>3} {','.join(map(str, r['stages'])):<8}"
                     f"{len(r['blocks']):>7}{gb(r['params'])}{gb(r['grads'])}"
                     f"{gb(r['optimizer'])}{r['in_flight']:>10}{gb(r['activations'])}"
                     f"{gb(r['p2p'])}  {r['bubble']:.3f}")
    return "\n".join(lines)
