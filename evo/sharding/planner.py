"""``shard(step, plan, mesh)``: the same train step, distributed.

What each plan does, per step:

- data parallel: every data-parallel rank takes its own micro-batches; the loss is normalised by
  the global count of labelled tokens, so summing gradients over ranks gives the gradient of the
  global mean — the single-process step's gradient.
- ZeRO 0: gradients all-reduced over ``dp``; every rank updates everything.
  ZeRO 1: gradients all-reduced, each rank updates its shard of the parameters and optimizer
  state (fp32 master), shards all-gathered back. ZeRO 2: gradients reduce-scattered over the zero
  group (and all-reduced across replicas). ZeRO 3: parameters stay sharded; each of the model's
  blocks has its weights all-gathered just before use (the next block's gathers start meanwhile),
  released after, gathered again in backward (a layer block is recomputed), and their gradients
  reduce-scattered. Hybrid ZeRO: ``zero_group < dp``.
- tensor parallel: weights split by the plan's rules on their logical axes (column-parallel where
  the output dimension is split, row-parallel where the input is, vocab-parallel embedding and
  cross-entropy, no rank holding full-vocab logits); with sequence parallelism the residual stream
  between regions is split on the sequence, entered by all-gather and left by reduce-scatter.
- long context (``plan.sp``, ``plan.cp``; ``evo.sharding.context``): every packed row split over
  the sequence group, Ulysses all-to-alls and zigzag ring attention around attention (the
  ``Regions.attention`` hook), gradients and loss sums all-reduced over cp and sp. With
  ``plan.weight_parallel`` the weights are stored sharded over the sequence group (mesh axis
  ``seq``) and handled as ZeRO-3's over ``zero``: gathered per block (next block prefetched,
  again when recomputed), gradients reduce-scattered over the group in backward.

The model takes part only through its family's blocks and its ``Regions`` hooks
(``evo.models.family``, ``evo.models.layers``); the planner names no parameter.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evo import models, scaler, train, tree
from evo.models.layers import Regions, cross_entropy_tokens
from evo.sharding import comm as C
from evo.sharding import context
from evo.sharding import experts as EP
from evo.sharding import pipeline
from evo.sharding.layout import EXPERT_AXIS, ParamLayout, model_layouts
from evo.sharding.mesh import Mesh


class ShardedRegions(Regions):
    """The model's parallel regions under a plan: collectives on the ``tp`` and ``zero`` axes.

    Under ZeRO-3, ``block`` gathers a block's weights, and during a forward pass starts the
    gathers of the next block's before returning (prefetch); the last block ends the pass, after
    which recomputation in backward gathers on demand."""

    def __init__(self, comm: C.Comm, mesh: Mesh, layouts: dict[str, ParamLayout], cfg):
        fam = models.family_of(cfg)
        self.comm, self.layouts = comm, layouts
        self.plan, self.tp_index = mesh.plan, mesh.coords["tp"]
        self.sp = mesh.plan.sequence_parallel and mesh.plan.tp > 1
        self.checkpoint_layers = mesh.plan.zero == 3 or mesh.plan.weight_parallel
        self.shard_axis = stored_shard_axis(mesh.plan)
        self.blocks = fam.blocks(cfg)
        self.order = {b.name: i for i, b in enumerate(self.blocks)}
        self.embedding = fam.embedding_param(cfg)
        self.output, self.output_vocab_dim = fam.output_param(cfg)
        self.prefetched: dict[str, torch.Tensor] = {}
        self.in_forward = False
        self.coords = mesh.coords
        self.expert_traffic = EP.ExpertTraffic()

    def _sharded(self) -> bool:
        return self.shard_axis is not None and self.comm.size(self.shard_axis) > 1

    def param(self, params, name):
        w = params[name]
        if not self._sharded():
            return w
        rows = self.layouts[name].local_shape[0]
        return C.gather_from(w, self.comm, self.shard_axis, 0,
                             self.prefetched.pop(name, None))[:rows]

    def block(self, params, block):
        i = self.order[block.name]
        self.in_forward = i < len(self.blocks) - 1 and (i == 0 or self.in_forward)
        if self._sharded() and self.in_forward:
            for k in self.blocks[i + 1].params:
                if k not in self.prefetched:
                    self.prefetched[k] = C.launch_all_gather(self.comm, params[k].detach(),
                                                             self.shard_axis)
        return {k: self.param(params, k) for k in block.params}

    def embed(self, tokens, weight):
        if self.layouts[self.embedding].tp_dim == 0 and self.plan.tp > 1:
            rows = weight.shape[0]
            local = tokens - self.tp_index * rows
            outside = (local < 0) | (local >= rows)
            x = F.embedding(local.masked_fill(outside, 0), weight) * (~outside)[..., None]
            return C.scatter_to(x, self.comm, "tp", 1) if self.sp else \
                C.reduce_from(x, self.comm, "tp")
        x = F.embedding(tokens, weight)
        return C.split_to(x, self.comm, "tp", 1, self.tp_index) if self.sp else x

    def enter(self, x):
        return C.gather_from(x, self.comm, "tp", 1) if self.sp else C.copy_to(x, self.comm, "tp")

    def inside(self, w):
        # With sequence parallelism the step sums every replicated weight's gradient over tp.
        return w if self.sp or self.plan.tp == 1 else C.copy_to(w, self.comm, "tp")

    def exit(self, x):
        return C.scatter_to(x, self.comm, "tp", 1) if self.sp else \
            C.reduce_from(x, self.comm, "tp")

    def experts(self, x_sorted, counts, fn):
        """Rows sorted by expert → this rank's experts and back: across ``ep`` by all-to-all
        (``evo.sharding.experts``)."""
        if self.comm.size("ep") == 1:
            return fn(x_sorted, counts)
        return EP.experts(self.comm, x_sorted, counts, fn, self.expert_traffic)

    def cross_entropy(self, logits, labels):
        split = self.layouts[self.output].tp_dim == self.output_vocab_dim
        if not split or self.plan.tp == 1:
            return cross_entropy_tokens(logits, labels)
        return vocab_parallel_cross_entropy(logits, labels, self.comm, self.tp_index)

    def attention(self, attend, positions):
        """Under ``plan.sp`` / ``plan.cp``: attention over the whole sequence split across the
        sequence group (``context.SequenceAttention``)."""
        if self.plan.cp * self.plan.sp == 1:
            return attend
        return context.SequenceAttention(self.comm, self.plan, self.coords, positions,
                                         attend.backend)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, comm: C.Comm,
                                 tp_index: int) -> torch.Tensor:
    """Cross-entropy over logits split on the vocabulary (``[..., vocab / tp]`` on each rank):
    a max, a sum of exponentials and the target logit are reduced over ``tp``; no rank forms the
    full-vocabulary row. Returns every token's loss ``[N]`` (0 where ignored), on every rank."""
    x = logits.reshape(-1, logits.shape[-1])
    x = x if x.dtype == torch.float64 else x.float()
    labels = labels.reshape(-1)
    width = x.shape[-1]
    m = comm.all_reduce(x.detach().max(-1).values, "tp", op="max")
    z = x - m[:, None]
    sum_exp = C.reduce_from(z.exp().sum(-1), comm, "tp")
    local = labels - tp_index * width
    mine = (local >= 0) & (local < width)
    target = z.gather(1, local.clamp(0, width - 1)[:, None]).squeeze(1) * mine
    target = C.reduce_from(target, comm, "tp")
    return (sum_exp.log() - target) * (labels != train.IGNORE)


# ------------------------------------------------------------------------------ state layout

def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _tp_piece(x: torch.Tensor, layout: ParamLayout, mesh: Mesh) -> torch.Tensor:
    if layout.ep_dim is not None and mesh.plan.ep > 1:   # this rank's experts
        x = C.chunk(x, mesh.plan.ep, mesh.coords["ep"], layout.ep_dim)
    if layout.tp_dim is None:
        return x
    return C.chunk(x, mesh.plan.tp, mesh.coords["tp"], layout.tp_dim)


def _zero_shard(x: torch.Tensor, layout: ParamLayout, mesh: Mesh) -> torch.Tensor:
    n = mesh.plan.zero_group
    return _pad_rows(x, layout.shard_shape[0] * n).chunk(n)[mesh.coords["zero"]]


def stored_shard_axis(plan) -> str | None:
    """The mesh axis parameters are stored sharded over, gathered per block: ``zero`` (ZeRO-3),
    ``seq`` (``plan.weight_parallel``: the sequence group), or None (stored whole)."""
    return "seq" if plan.weight_parallel else "zero" if plan.zero == 3 else None


def _stored_shard(x: torch.Tensor, layout: ParamLayout, mesh: Mesh) -> torch.Tensor:
    """The piece as this rank stores it: its ZeRO-3 or weight-parallel shard, else whole."""
    axis = stored_shard_axis(mesh.plan)
    if axis is None:
        return x
    n = mesh.sizes[axis]
    return _pad_rows(x, layout.shard_shape[0] * n).chunk(n)[mesh.coords[axis]]


def _balance(cfg, params: dict[str, torch.Tensor], load: torch.Tensor,
             layouts: dict[str, ParamLayout], mesh: Mesh) -> dict[str, torch.Tensor]:
    """This rank's pieces of ``models.moe.update_bias``: each bias step cut as its bias is
    stored (tensor-parallel piece, ZeRO-3 shard)."""
    out = dict(params)
    for k, s in models.moe.bias_steps(cfg, load).items():
        s = _tp_piece(s, layouts[k], mesh)
        s = _stored_shard(s, layouts[k], mesh)
        out[k] = params[k] + s.to(params[k].dtype)
    return out


def local_layouts(cfg, mesh: Mesh, *, primary: bool = False) -> dict[str, ParamLayout]:
    """The layouts of the parameters this rank holds: all of them, or with pipeline stages its
    stages' (``primary``: only those it writes; see ``pipeline.local_layouts``)."""
    return pipeline.local_layouts(model_layouts(mesh.plan, cfg), cfg, mesh.plan,
                                  mesh.coords["pp"], primary=primary)


def shard_params(cfg, params: dict[str, torch.Tensor], mesh: Mesh
                 ) -> dict[str, torch.Tensor]:
    """Full (global) params → this rank's pieces: the tensor-parallel piece, and under ZeRO-3
    its shard (with pipeline stages, of its stages' parameters only)."""
    layouts = local_layouts(cfg, mesh)
    out = {}
    for k, lay in layouts.items():
        x = _tp_piece(params[k], lay, mesh)
        out[k] = _stored_shard(x, lay, mesh).contiguous().clone()
    return out


def init_params(cfg, seed: int, mesh: Mesh, *, device=None
                ) -> dict[str, torch.Tensor]:
    """This rank's pieces of ``models.init(cfg, seed)``, one parameter at a time: the model is
    never materialised whole."""
    layouts = local_layouts(cfg, mesh)
    out = {}
    for k, lay in layouts.items():
        x = _tp_piece(models.init_param(cfg, k, seed, device=device), lay, mesh)
        out[k] = _stored_shard(x, lay, mesh).contiguous().clone()
    return out


def _opt_view(params: dict[str, torch.Tensor], layouts, mesh: Mesh) -> dict[str, torch.Tensor]:
    """What the optimizer of this rank updates: everything (ZeRO 0), the ZeRO shard of the
    tensor-parallel pieces (ZeRO 1/2), or the stored shards themselves (ZeRO 3)."""
    if mesh.plan.zero in (0, 3):
        return params
    return {k: _zero_shard(v, layouts[k], mesh).clone() for k, v in params.items()}


def init_state(cfg, optimizer, params: dict[str, torch.Tensor], mesh: Mesh
               ) -> train.TrainState:
    """A sharded TrainState from this rank's ``params`` (``shard_params`` / ``init_params``)."""
    layouts = local_layouts(cfg, mesh)
    return train.TrainState(torch.zeros((), dtype=torch.int64, device=_device(params)), params,
                            optimizer.init(_opt_view(params, layouts, mesh)))


def _device(params):
    return next(iter(params.values())).device


def _comm(mesh: Mesh) -> C.Comm:
    return C.Comm(mesh.groups, mesh.sizes, C.CommLog())


def gather_params(cfg, params: dict[str, torch.Tensor], mesh: Mesh
                  ) -> dict[str, torch.Tensor]:
    """This rank's pieces → the full global params, on every rank of the mesh (a collective)."""
    layouts, comm = model_layouts(mesh.plan, cfg), _comm(mesh)
    if mesh.plan.pp > 1:
        params = pipeline.gather_stages(cfg, params, layouts, mesh, comm)
    out = {}
    for k, lay in layouts.items():
        x = params[k]
        if stored_shard_axis(mesh.plan) is not None:
            x = comm.all_gather(x, stored_shard_axis(mesh.plan))[:lay.local_shape[0]]
        if lay.tp_dim is not None:
            x = comm.all_gather(x, "tp", lay.tp_dim)
        if lay.ep_dim is not None:
            x = comm.all_gather(x, "ep", lay.ep_dim)
        out[k] = x
    return out


# ------------------------------------------------------------------------- gradient buckets

def bucket_assignment(layouts: dict[str, ParamLayout], names: list[str], bucket_bytes: int
                      ) -> list[list[str]]:
    """``names`` in reverse order (the order backward produces their gradients), cut into buckets
    of fp32 gradients: a bucket closes before the parameter that would take it past
    ``bucket_bytes`` (a larger parameter has a bucket of its own)."""
    buckets: list[list[str]] = [[]]
    size = 0
    for k in reversed(names):
        nbytes = math.prod(layouts[k].local_shape) * 4
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(k)
        size += nbytes
    return buckets


class BucketedReduction:
    """Data-parallel gradient reduction in buckets, launched during backward.

    Parameters are assigned to buckets of about ``bucket_bytes`` in reverse creation order (the
    order backward produces them); a bucket's collective starts as soon as its last gradient
    arrives, while backward goes on. ZeRO 0/1: one all-reduce over ``dp`` per bucket. ZeRO 2: one
    reduce-scatter over ``zero`` per bucket, each member padded and laid out rank-major so every
    rank receives exactly its shard of each member, then an all-reduce over ``replica``. The
    assignment is the same on every rank, so the collectives match.
    """

    def __init__(self, comm: C.Comm, plan, layouts: dict[str, ParamLayout], names: list[str],
                 bucket_bytes: int, *, dp_axis: str = "dp",
                 replica_axes: tuple[str, ...] = ("replica",)):
        self.comm, self.plan, self.layouts = comm, plan, layouts
        self.dp_axis, self.replica_axes = dp_axis, replica_axes
        self.buckets = bucket_assignment(layouts, names, bucket_bytes)
        self.bucket_of = {k: i for i, b in enumerate(self.buckets) for k in b}
        self.ready: dict[str, torch.Tensor] = {}
        self.pending: dict[int, torch.Tensor] = {}

    def __call__(self, name: str, grad: torch.Tensor) -> None:
        self.ready[name] = grad
        b = self.bucket_of[name]
        if all(k in self.ready for k in self.buckets[b]):
            self._launch(b)

    def _rows(self, k: str) -> int:
        return self.layouts[k].shard_shape[0] * self.plan.zero_group

    def _launch(self, b: int) -> None:
        members = [self.ready[k] for k in self.buckets[b]]
        if self.plan.zero == 2:
            n = self.plan.zero_group
            flat = torch.cat([_pad_rows(g, self._rows(k)).reshape(n, -1)
                              for k, g in zip(self.buckets[b], members)], dim=1)
            self.pending[b] = C.launch_reduce_scatter(self.comm, flat, "zero")
        else:
            self.pending[b] = C.launch_all_reduce(self.comm, torch.cat([g.flatten()
                                                                       for g in members]),
                                                  self.dp_axis)

    def finish(self) -> dict[str, torch.Tensor]:
        for b, members in enumerate(self.buckets):  # parameters that got no gradient: zeros
            if b not in self.pending:
                for k in members:
                    if k not in self.ready:
                        self.ready[k] = torch.zeros(self.layouts[k].local_shape,
                                                    device=next(iter(self.ready.values())).device)
                self._launch(b)
        out = {}
        for b, members in enumerate(self.buckets):
            flat = C.wait(self.pending[b]).flatten()
            if self.plan.zero == 2:
                for axis in self.replica_axes:
                    flat = self.comm.all_reduce(flat, axis)
            offset = 0
            for k in members:
                shape = self.layouts[k].shard_shape if self.plan.zero == 2 else \
                    self.layouts[k].local_shape
                size = math.prod(shape)
                out[k] = flat[offset:offset + size].view(shape)
                offset += size
        return out


class ExpertSplitReduction:
    """Under expert parallelism, two bucketed reductions: expert gradients over the ranks
    holding the same experts (``edp``; nothing to reduce when ``dp = ep``), the others over
    ``dp`` (ZeRO 2: over ``replica`` and ``ep`` after the reduce-scatter)."""

    def __init__(self, comm: C.Comm, plan, layouts: dict[str, ParamLayout], bucket_bytes: int):
        self.layouts, self.passed = layouts, {}
        expert = [k for k, lay in layouts.items() if lay.ep_dim is not None]
        dense = [k for k in layouts if k not in expert]
        self.expert = BucketedReduction(comm, plan, layouts, expert, bucket_bytes,
                                        dp_axis="edp") if comm.size("edp") > 1 else None
        self.dense = BucketedReduction(comm, plan, layouts, dense, bucket_bytes,
                                       replica_axes=("replica", "ep"))

    def __call__(self, name: str, grad: torch.Tensor) -> None:
        if self.layouts[name].ep_dim is None:
            self.dense(name, grad)
        elif self.expert is not None:
            self.expert(name, grad)
        else:
            self.passed[name] = grad

    def finish(self) -> dict[str, torch.Tensor]:
        return {**self.passed, **(self.expert.finish() if self.expert else {}),
                **self.dense.finish()}


# ------------------------------------------------------------------------------------ the step

class _Clock:
    """Wall time between laps, waiting for the device first so that each lap holds its own work
    (on a CPU the work is done when the call returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.sync()
        self.last = time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def lap(self) -> float:
        self.sync()
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        return dt


@dataclass(frozen=True)
class ShardedStep:
    """``step`` distributed by ``mesh.plan``; called like the step: ``(state, batch)``, with this
    rank's state pieces and this data-parallel rank's micro-batches. Metrics gain
    ``comm_bytes``: bytes handed to each collective kind on each mesh axis during the step,
    ``comm_calls``: how many collectives of each, and ``time``: seconds of
    ``forward_backward`` (with the collectives it overlaps), ``comm`` (the gradient reductions and
    ZeRO gathers after it) and ``optimizer`` (norm and update)."""
    step: train.Step
    mesh: Mesh

    @property
    def plan(self):
        return self.mesh.plan

    def __call__(self, state: train.TrainState, batch: dict[str, torch.Tensor]):
        plan, step = self.mesh.plan, self.step
        layouts, comm = local_layouts(step.model, self.mesh), _comm(self.mesh)
        self._check_sequence(batch)
        # plan.sp / plan.cp: this rank's part of each sequence (the whole batch counts the tokens)
        local = context.split_batch(batch, plan, self.mesh.coords) \
            if plan.cp * plan.sp > 1 else batch
        regions = ShardedRegions(comm, self.mesh, model_layouts(plan, step.model), step.model)
        stages = pipeline.PipelineSchedule(step.model, self.mesh, comm) if plan.pp > 1 else None
        if stages is not None:
            step = dataclasses.replace(step, schedule=stages)
        n = comm.all_reduce(train.valid_tokens(batch), "dp")
        clock = _Clock(batch["tokens"].device)
        sink = self._bucketed_reduction(comm, layouts, regions)
        scaled = step.scaler_state(state)
        grads, aux = step.grads(state.params, local, normalizer=n, regions=regions, on_ready=sink,
                                loss_scale=None if scaled is None else scaled.scale)
        t_backward = clock.lap()
        grads = self._synchronise(grads, layouts, comm, regions, bucketed=sink is not None)
        if not plan.weight_parallel:   # else backward reduce-scattered them over ``seq``
            grads = context.reduce_over_sequence(grads, comm)
        aux = context.reduce_over_sequence(aux, comm)
        if stages is not None:
            grads = pipeline.sum_tied(step.model, grads, layouts, self.mesh, comm)
        t_comm = clock.lap()
        if scaled is not None:  # the reduced gradients, so the norm below is the true one
            scaler.unscale_(grads, scaled)
        norm = self._grad_norm(grads, layouts, comm) if stages is None else \
            pipeline.grad_norm(step.model, grads, self.mesh, comm,
                               lambda g: self._grad_norm(g, layouts, comm))
        new, opt_state, info = step.optimizer.update(
            grads, state.opt_state, _opt_view(state.params, layouts, self.mesh), state.step,
            inplace=step.donate, grad_norm=norm)
        t_optimizer = clock.lap()
        new = self._gather_updated(state.params, new, layouts, comm)
        if "expert_load" in aux:     # MoE: loads summed over dp move the balancing bias
            aux = {**aux, **{k: comm.all_reduce(aux[k], "dp")
                             for k in ("expert_load", "dropped_tokens", "aux_loss")}}
            new = _balance(step.model, new, aux["expert_load"] * ~info["skipped"], layouts,
                           self.mesh)
        t_comm += clock.lap()
        tokens = torch.tensor(batch["tokens"].numel())
        metrics = {"loss": comm.all_reduce(aux["loss"], "dp"),
                   **{k: comm.all_reduce(aux[k], "dp")
                      for k in ("source_loss_sum", "source_tokens") if k in aux},
                   "grad_norm": info["grad_norm"], "lr": info["lr"], "skipped": info["skipped"],
                   "tokens": comm.all_reduce(tokens, "dp") if plan.dp > 1 else tokens,
                   **{k: aux[k] for k in ("expert_load", "dropped_tokens", "aux_loss")
                      if k in aux},
                   "valid_tokens": n, "comm_bytes": dict(comm.log.bytes),
                   "comm_calls": dict(comm.log.calls),
                   "time": {"forward_backward": t_backward, "comm": t_comm,
                            "optimizer": t_optimizer}}
        if plan.ep > 1:
            metrics["expert_traffic"] = regions.expert_traffic.as_dict()
        if scaled is not None:
            metrics["loss_scale"] = scaled.scale
        if stages is not None:  # the loss and per-source sums live on the last stage
            metrics.update({k: comm.all_reduce(metrics[k], "pp") for k in
                            ("loss", "source_loss_sum", "source_tokens") if k in metrics},
                           pp_idle=comm.all_reduce(torch.tensor(stages.idle), "pp") / plan.pp,
                           comm_bytes=dict(comm.log.bytes), comm_calls=dict(comm.log.calls))
            # this rank's compute seconds per action (no collective): what pipeline.replay takes
            metrics["pp_seconds"] = torch.tensor(stages.seconds)
        return train.TrainState(state.step + 1, new, opt_state,
                                step.next_scaler(scaled, info)), metrics

    def _check_sequence(self, batch) -> None:
        plan = self.mesh.plan
        if plan.sequence_parallel and plan.tp > 1:
            per_row = batch["tokens"][0].numel() if batch["tokens"].dim() == 2 else \
                batch["tokens"].shape[-1]
            if per_row % plan.tp:
                raise ValueError(f"plan.sequence_parallel: the sequence length {per_row} must be "
                                 f"divisible by plan.tp={plan.tp}")

    def _bucketed_reduction(self, comm, layouts, regions) -> "BucketedReduction | None":
        """Overlap the data-parallel reduction with backward, unless sequence parallelism must
        first complete the norm weights' gradients over tp, or ZeRO-3 already reduces them."""
        plan = self.mesh.plan
        if plan.bucket_mb > 0 and plan.dp > 1 and plan.zero < 3 and not regions.sp and \
                plan.ep > 1:
            return ExpertSplitReduction(comm, plan, layouts, int(plan.bucket_mb * 2**20))
        if plan.bucket_mb > 0 and plan.dp > 1 and plan.zero < 3 and not regions.sp:
            return BucketedReduction(comm, plan, layouts, list(layouts),
                                     int(plan.bucket_mb * 2**20))
        return None

    def _synchronise(self, grads, layouts, comm, regions, *, bucketed: bool):
        """Gradients reduced over the data-parallel ranks, as this rank's optimizer needs them."""
        plan, mesh = self.mesh.plan, self.mesh
        if regions.sp:  # weights not split over tp saw only this rank's part of the sequence
            grads = {k: comm.all_reduce(g, "tp") if layouts[k].tp_dim is None else g
                     for k, g in grads.items()}
        if bucketed:
            return {k: _zero_shard(g, layouts[k], mesh) for k, g in grads.items()} \
                if plan.zero == 1 else grads
        if plan.ep > 1:
            return self._synchronise_experts(grads, layouts, comm)
        if plan.zero == 0:
            return {k: comm.all_reduce(g, "dp") for k, g in grads.items()}
        if plan.zero == 1:
            return {k: _zero_shard(comm.all_reduce(g, "dp"), layouts[k], mesh)
                    for k, g in grads.items()}
        if plan.zero == 2:
            return {k: comm.all_reduce(comm.reduce_scatter(
                _pad_rows(g, layouts[k].shard_shape[0] * plan.zero_group), "zero"), "replica")
                for k, g in grads.items()}
        # ZeRO 3: backward already reduce-scattered each block's gradients over the group
        return {k: comm.all_reduce(g, "replica") for k, g in grads.items()}

    def _synchronise_experts(self, grads, layouts, comm):
        """Under expert parallelism: an expert parameter's gradient is summed over the ranks
        holding the same experts (``edp``), any other over every data-parallel rank (``dp``); a
        ZeRO group holds the same experts, so ZeRO 2/3 reduce over ``zero`` as without experts
        and non-expert gradients are summed over ``ep`` as well."""
        plan, mesh, out = self.mesh.plan, self.mesh, {}
        for k, g in grads.items():
            expert = layouts[k].ep_dim is not None
            if plan.zero in (0, 1):
                g = comm.all_reduce(g, "edp" if expert else "dp")
                out[k] = _zero_shard(g, layouts[k], mesh) if plan.zero == 1 else g
                continue
            if plan.zero == 2:
                g = comm.reduce_scatter(_pad_rows(g, layouts[k].shard_shape[0] * plan.zero_group),
                                        "zero")
            g = comm.all_reduce(g, "replica")
            out[k] = g if expert else comm.all_reduce(g, "ep")
        return out

    def _gather_updated(self, old, new, layouts, comm):
        """ZeRO 1/2: every rank updated its shard; the shards gathered back into the pieces."""
        if self.mesh.plan.zero not in (1, 2):
            return new
        full = {}
        for k, v in new.items():
            x = comm.all_gather(v, "zero")[:layouts[k].local_shape[0]]
            full[k] = old[k].copy_(x) if self.step.donate else x
        return full

    def _grad_norm(self, grads, layouts, comm: C.Comm) -> torch.Tensor:
        """Global L2 norm: squares of split gradients summed over the ranks holding the pieces."""
        if self.plan.ep > 1:
            return _expert_grad_norm(grads, layouts, comm, self.plan)
        if self.plan.weight_parallel:   # shards over the sequence group (check_plan: tp = 1)
            return comm.all_reduce(tree.global_norm(grads) ** 2, "seq").sqrt()
        if self.plan.tp == 1 and (self.plan.zero == 0 or self.plan.zero_group == 1):
            return tree.global_norm(grads)  # every rank holds whole gradients: the plain norm
        split = [g for k, g in grads.items() if layouts[k].tp_dim is not None]
        whole = [g for k, g in grads.items() if layouts[k].tp_dim is None]
        sq = lambda gs: tree.global_norm(gs) ** 2 if gs else torch.zeros(())  # noqa: E731
        sq_split, sq_whole = sq(split), sq(whole)
        if self.plan.zero > 0:
            sq_split = comm.all_reduce(sq_split, "zero")
            sq_whole = comm.all_reduce(sq_whole, "zero")
        sq_split = comm.all_reduce(sq_split, "tp")
        return (sq_split + sq_whole).sqrt()


def _expert_grad_norm(grads, layouts, comm: C.Comm, plan) -> torch.Tensor:
    """The global norm under expert parallelism: each rank's squares, each divided by the number
    of ranks holding the same gradient piece (replicas over ``dp``/``edp`` — over ``replica``
    alone once ZeRO shards them — and over ``tp`` when not split there), summed over ``dp`` and
    ``tp``."""
    sq = torch.zeros(())
    for k, g in grads.items():
        lay = layouts[k]
        copies = plan.dp // (plan.zero_group if plan.zero > 0 else 1)
        copies //= plan.ep if lay.ep_dim is not None else 1
        copies *= plan.tp if lay.tp_dim is None else 1
        sq = sq + g.float().pow(2).sum() / copies
    return comm.all_reduce(comm.all_reduce(sq, "dp"), "tp").sqrt()


def check_plan(plan, cfg, attention: str = "auto") -> None:
    """What the planner refuses about a plan for a model, before any process-group work: fields
    it does not implement yet, axes not yet proven together, and the sequence group's checks
    (``context.check_plan``)."""
    _check_weight_parallel(plan)
    _check_combination(plan, cfg)
    if plan.cp * plan.sp > 1:
        context.check_plan(plan, cfg, attention)


def _check_weight_parallel(plan) -> None:
    """``plan.weight_parallel`` stores each weight, its gradient and its optimizer state as one
    shard per rank of the sequence group; it is proven with ``zero=0``, ``tp=1`` and ``dp=1``."""
    if not plan.weight_parallel:
        return
    for field, value, ok in (("zero", plan.zero, 0), ("tp", plan.tp, 1), ("dp", plan.dp, 1)):
        if value not in (ok, -1):
            raise ValueError(f"shard: plan.weight_parallel with plan.{field}={value} is not "
                             f"implemented by the planner yet (only plan.{field}={ok})")


def _check_combination(plan, cfg) -> None:
    """Axes that each match one process but are not yet proven together are refused."""
    together = [f"plan.{f}={getattr(plan, f)}" for f in ("pp", "ep", "cp", "sp")
                if getattr(plan, f) > 1]
    if len(together) > 1 and not (plan.pp == 1 and plan.ep == 1):   # sp × cp is proven
        raise ValueError(f"shard: {' with '.join(together)} is not implemented by the planner "
                         "yet")
    if plan.pp > 1 and any(EXPERT_AXIS in a for a in models.axes(cfg).values()):
        raise ValueError(f"shard: plan.pp={plan.pp} with a mixture-of-experts model is not "
                         "implemented by the planner yet")


def shard(step: train.Step, plan, mesh: Mesh | None = None) -> ShardedStep:
    """The step distributed by ``plan`` over ``mesh`` (default: built from the process group)."""
    from evo.sharding.mesh import build_mesh
    unsupported = [(logical, axis) for logical, _ in plan.rules
                   for axis in plan.mesh_axes(logical)
                   if axis != "tp" and (axis, logical) != ("ep", EXPERT_AXIS)]
    if unsupported:
        raise ValueError("shard: plan.rules map logical axis {!r} to mesh axis {!r}, which the "
                         "planner does not implement yet (only 'tp')".format(*unsupported[0]))
    check_plan(plan, step.model, step.attention)
    mesh = mesh or build_mesh(plan)
    if mesh.plan != plan.resolve(mesh.plan.world_size):
        raise ValueError(f"shard: the mesh was built for {mesh.plan}, not {plan}")
    _check_weight_parallel(mesh.plan)   # dp resolved
    model_layouts(mesh.plan, step.model)  # validate the plan against the model up front
    pipeline.check(step.model, mesh.plan)
    if mesh.plan.pp > 1 and step.compile:
        raise ValueError("Step.compile with plan.pp>1 is not supported: pipeline stages run "
                         "eagerly")
    return ShardedStep(step, mesh)


def per_rank_bytes(cfg, plan, dtype: torch.dtype = torch.float32, *, pp_index: int = 0
                   ) -> dict[str, int]:
    """Bytes one rank holds for params, grads and AdamW state (two moments) under a resolved
    plan — arithmetic on shapes only (with pipeline stages: a rank of pp index ``pp_index``)."""
    layouts = pipeline.local_layouts(model_layouts(plan, cfg), cfg, plan, pp_index)
    size = torch.empty((), dtype=dtype).element_size()
    local = sum(math.prod(l.local_shape) for l in layouts.values()) * size
    shard = sum(math.prod(l.shard_shape) for l in layouts.values()) * size
    params = shard if plan.zero == 3 or plan.weight_parallel else local
    grads = shard if plan.zero >= 2 or plan.weight_parallel else local
    opt = 2 * (shard if plan.zero >= 1 or plan.weight_parallel else local)
    return {"params": params, "grads": grads, "optimizer": opt, "total": params + grads + opt}


def expected_comm_bytes(cfg, plan, *, micro_num: int, tokens_per_micro: int,
                        compute_dtype: torch.dtype = torch.float32, sources: int = 0,
                        remat: float = 0.0, expert_traffic: dict | None = None,
                        pp_index: int = 0, calls: dict | None = None) -> dict[str, int]:
    """Bytes one rank hands to each collective (``"{kind}/{axis}"``) in one step of a resolved
    ``plan``: the analytic model the step's measured ``comm_bytes`` must equal.

    Counts what ``ShardedStep`` does, from the family's blocks: per micro-batch, the
    tensor-parallel region crossings of forward and backward (and of the recomputed layers: every
    layer under ZeRO-3, else the first ``floor(remat · layers)``) and the ZeRO-3 weight gathers
    and gradient reduce-scatters; per step, the gradient synchronisation, the norm and the loss
    and token counts. With pipeline stages: rank ``pp_index``'s stages only, their
    point-to-point sends and receives, and the reductions over ``pp`` (``pipeline.count_pp``).

    Under expert parallelism the dispatch moves as many rows as the routing sends: pass the
    step's ``metrics["expert_traffic"]`` (``evo.sharding.experts.ExpertTraffic``) as
    ``expert_traffic``; the model counts the exchanged counts and the rows' bytes from it
    (without it: a perfectly balanced routing, ``experts.balanced_traffic``).

    ``calls`` (a ``Counter``, filled when given): how many collectives of each key those bytes
    go in — exact where the step hands each tensor to its own collective (region crossings,
    ZeRO-3 and weight-parallel gathers, the sequence group's exchanges, pipeline sends); the
    gradient synchronisation counts one, whatever buckets split it into.
    """
    from collections import Counter
    sizes = {"tp": plan.tp, "dp": plan.dp, "zero": plan.zero_group,
             "replica": plan.dp // (plan.zero_group * plan.ep), "ep": plan.ep,
             "edp": plan.dp // plan.ep, "cp": plan.cp, "sp": plan.sp, "pp": plan.pp,
             "seq": plan.cp * plan.sp if plan.weight_parallel else 1}
    out: Counter = Counter()

    def add(kind, axis, nbytes, times=1):
        if sizes[axis] > 1 and times:
            out[f"{kind}/{axis}"] += nbytes * times
            if calls is not None:
                calls[f"{kind}/{axis}"] += times

    layouts = pipeline.local_layouts(model_layouts(plan, cfg), cfg, plan, pp_index)
    blocks = pipeline.rank_blocks(cfg, plan, pp_index)
    act = torch.empty((), dtype=compute_dtype).element_size()
    _count_sequence(add, plan, cfg, layouts, micro_num, tokens_per_micro, act, remat, sources)
    tokens_per_micro //= plan.cp * plan.sp    # each rank of a sequence group: its part
    _count_regions(add, plan, blocks, micro_num, tokens_per_micro * cfg.hidden_size * act, remat,
                   every=models.blocks(cfg))
    specs = models.param_specs(cfg)
    if not (plan.sequence_parallel and plan.tp > 1):               # backward of regions.inside
        for k in (k for b in blocks for k in b.inside):
            add("all_reduce", "tp", math.prod(specs[k].shape) * act, micro_num)
    if plan.zero == 3:
        _count_zero3(add, plan, blocks, layouts, micro_num, act)
    if plan.weight_parallel:   # the same gathers and reduce-scatters, over the sequence group
        _count_zero3(add, plan, blocks, layouts, micro_num, act, axis="seq")
        add("all_reduce", "seq", 4)                                      # the norm's squares
    if plan.ep > 1:
        traffic = expert_traffic or EP.balanced_traffic(
            cfg, plan, micro_num=micro_num, tokens_per_micro=tokens_per_micro,
            remat=remat).as_dict()
        _count_experts(add, plan, layouts, traffic, cfg.hidden_size * act)
    else:
        _count_synchronisation(add, plan, layouts)
    # Scalars (fp32 master): labelled-token count (int64), loss, token count (int64), norm squares.
    for nbytes in (8, 4, 8):
        add("all_reduce", "dp", nbytes)
    add("all_reduce", "dp", 4 * sources, 2 if sources else 0)           # per-source loss, tokens
    if models.moe.routed(cfg):                       # expert loads, dropped pairs, balancing loss
        add("all_reduce", "dp", 4 * len(cfg.moe_layers) * cfg.num_experts)
        add("all_reduce", "dp", 4, 2)
    if plan.zero > 0 and plan.ep == 1:
        add("all_reduce", "zero", 4, 2)
    add("all_reduce", "dp" if plan.ep > 1 else "tp", 4)
    if plan.ep > 1:
        add("all_reduce", "tp", 4)
    if any(b.kind == "head" for b in blocks):
        add("all_reduce", "tp", tokens_per_micro * 4, micro_num * 3)    # vocab-parallel CE
    if plan.pp > 1:
        pipeline.count_pp(add, cfg, plan, pp_index, micro_num=micro_num, sources=sources,
                          act_bytes=tokens_per_micro * cfg.hidden_size * act
                          // plan.sequence_tp)
    return dict(out)


def _count_sequence(add, plan, cfg, layouts, micro_num: int, tokens_per_micro: int, act: int,
                    remat: float, sources: int) -> None:
    """plan.sp / plan.cp (``context.count_comm``): the gradients summed over the sequence group
    are those ``_synchronise`` returns (fp32)."""
    layers = sum(b.kind == "layer" for b in models.blocks(cfg))
    recomputed = layers if plan.zero == 3 or plan.weight_parallel else \
        math.floor(remat * layers)
    synced = tuple(math.prod(l.shard_shape if plan.zero > 0 else l.local_shape) * 4
                   for l in layouts.values()) if not plan.weight_parallel else ()
    context.count_comm(add, plan, cfg, micro_num, tokens_per_micro, act, recomputed, synced,
                       sources)


def _count_regions(add, plan, blocks, micro_num: int, full_act: int, remat: float,
                   every=None) -> None:
    """Tensor-parallel region crossings: each block's enters and exits, forward and backward.
    The recomputed layers (every layer under ZeRO-3, else the first ``floor(remat · layers)`` of
    the model, ``every`` block; counted where they are among ``blocks``) run forward again in
    backward; recomputation stops at the last tensor backward needs, so it skips the layer's
    final exit."""
    enters = sum(b.enters for b in blocks)
    exits = sum(b.exits for b in blocks)
    layers = [b for b in (every or blocks) if b.kind == "layer"]
    layers = layers if plan.zero == 3 else layers[:math.floor(remat * len(layers))]
    layers = [b for b in layers if b in blocks]
    re_enters = sum(b.enters for b in layers)
    re_exits = sum(b.exits - 1 for b in layers)
    split_act, M = full_act // plan.tp, micro_num
    if plan.sequence_parallel and plan.tp > 1:
        add("all_gather", "tp", split_act, M * (enters + re_enters))    # enter: gather sequence
        add("reduce_scatter", "tp", full_act, M * (exits + re_exits))   # exit: scatter it
        add("reduce_scatter", "tp", full_act, M * enters)               # backward of the enters
        add("all_gather", "tp", split_act, M * exits)                   # backward of the exits
    else:
        add("all_reduce", "tp", full_act, M * (exits + re_exits))       # exits
        add("all_reduce", "tp", full_act, M * enters)                   # backward of the enters


def _count_experts(add, plan, layouts, traffic: dict, row_bytes: int) -> None:
    """Expert parallelism: the dispatches (counts, then rows forward and their gradients back in
    backward; a recomputed layer dispatches again, forward only) and the gradient
    synchronisation of expert (over ``edp``) and other (over ``dp``) parameters."""
    calls = traffic["forward_calls"] + traffic["recomputed_calls"]
    add("all_to_all", "ep", calls * traffic["experts"] * 8)
    add("all_to_all", "ep", (2 * traffic["forward_rows"] + traffic["recomputed_rows"]) * row_bytes)
    local = {k: math.prod(l.local_shape) * 4 for k, l in layouts.items()}
    shard = {k: math.prod(l.shard_shape) * 4 for k, l in layouts.items()}
    expert = {k for k, l in layouts.items() if l.ep_dim is not None}
    if plan.zero in (0, 1):
        add("all_reduce", "edp", sum(v for k, v in local.items() if k in expert))
        add("all_reduce", "dp", sum(v for k, v in local.items() if k not in expert))
    if plan.zero == 2:
        add("reduce_scatter", "zero", sum(shard.values()) * plan.zero_group)
    if plan.zero >= 2:
        add("all_reduce", "replica", sum(shard.values()))
        add("all_reduce", "ep", sum(v for k, v in shard.items() if k not in expert))
    if plan.zero in (1, 2):
        for nbytes in shard.values():                                    # updated shards back
            add("all_gather", "zero", nbytes)
    if plan.sequence_parallel and plan.tp > 1:                           # norm weights' grads
        for k, l in layouts.items():
            if l.tp_dim is None:
                add("all_reduce", "tp", (shard if plan.zero == 3 else local)[k])


def _count_zero3(add, plan, blocks, layouts, micro_num: int, act: int, axis: str = "zero"
                 ) -> None:
    """ZeRO-3 (or weight parallelism, ``axis="seq"``): a parameter is gathered (compute dtype)
    each time a block reading it runs — layers twice, forward and recomputation — and its
    gradient reduce-scattered once per block reading it."""
    n = plan.zero_group if axis == "zero" else plan.cp * plan.sp
    gathers: dict[str, int] = {}
    reads: dict[str, int] = {}
    for b in blocks:
        for k in b.params:
            gathers[k] = gathers.get(k, 0) + (2 if b.kind == "layer" else 1)
            reads[k] = reads.get(k, 0) + 1
    for k, lay in layouts.items():
        shard = math.prod(lay.shard_shape)
        add("all_gather", axis, shard * act, micro_num * gathers.get(k, 0))
        add("reduce_scatter", axis, shard * n * act, micro_num * reads.get(k, 0))


def _count_synchronisation(add, plan, layouts) -> None:
    """Gradient synchronisation in the master dtype (fp32)."""
    local = {k: math.prod(l.local_shape) * 4 for k, l in layouts.items()}
    shard = {k: math.prod(l.shard_shape) * 4 for k, l in layouts.items()}
    if plan.zero in (0, 1):
        add("all_reduce", "dp", sum(local.values()))
    elif plan.zero == 2:
        add("reduce_scatter", "zero", sum(shard.values()) * plan.zero_group)
        add("all_reduce", "replica", sum(shard.values()))
    else:
        add("all_reduce", "replica", sum(shard.values()))
    if plan.zero in (1, 2):
        for nbytes in shard.values():                                    # updated shards back
            add("all_gather", "zero", nbytes)
    if plan.sequence_parallel and plan.tp > 1:                           # norm weights' grads
        for k, l in layouts.items():
            if l.tp_dim is None:
                add("all_reduce", "tp", (shard if plan.zero == 3 else local)[k])
