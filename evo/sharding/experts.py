"""Expert parallelism: the token dispatch and combine of a mixture-of-experts layer over ``ep``.

Under ``plan.ep > 1`` each expert parameter (logical axis ``"expert"``) is split over the ``ep``
ranks: rank ``i`` of an expert-parallel group holds experts ``[i·E/ep, (i+1)·E/ep)``. The ranks
of the group are data-parallel ranks, each with its own tokens. ``experts(comm, x, counts, fn)``
is what ``regions.experts`` does there:

1. the per-expert row counts are exchanged (an all-to-all of ``E`` int64 per rank), so each rank
   learns how many rows every other rank sends to each of its experts;
2. the rows (sorted by global expert, so the rows for rank ``j`` are one contiguous run) are
   dispatched by a variable-size all-to-all;
3. the received rows, ordered (source rank, local expert), are regrouped by local expert, the
   local experts run (``fn``), and the regrouping is undone;
4. a second variable-size all-to-all combines the results back to the rows' owners.

Both all-to-alls are differentiable (backward is the all-to-all with the splits swapped) through
an autograd Function with ``setup_context``, so ``torch.func.grad`` accepts them. Each hands its
input tensor's bytes to the ``CommLog`` (kind ``all_to_all``, axis ``ep``); the sizes depend on
the routing, so each call also records its rows in an ``ExpertTraffic`` that the analytic model
(``planner.expected_comm_bytes``) takes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evo.sharding.comm import Comm

_c10d = torch.ops._c10d_functional
AXIS = "ep"


@dataclass
class ExpertTraffic:
    """What the dispatch moved in one step on this rank: ``experts`` (E, the length of the count
    vectors exchanged), and per kind of forward pass — ``forward`` (the pass backward
    differentiates) and ``recomputed`` (a layer run again in backward) — the number of dispatches
    and the rows sent plus received by their two all-to-alls."""
    experts: int = 0
    forward_calls: int = 0
    forward_rows: int = 0
    recomputed_calls: int = 0
    recomputed_rows: int = 0

    def add(self, experts: int, rows: int) -> None:
        self.experts = experts
        if torch._C._current_graph_task_id() != -1:   # inside backward: a recomputed layer
            self.recomputed_calls += 1
            self.recomputed_rows += rows
        else:
            self.forward_calls += 1
            self.forward_rows += rows

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def balanced_traffic(cfg, plan, *, micro_num: int, tokens_per_micro: int, remat: float = 0.0
                     ) -> ExpertTraffic:
    """The ``ExpertTraffic`` of one step if the routing were perfectly balanced (every rank
    receives as many rows as it sends, ``tokens · top_k`` per MoE layer): what ``evo plan``
    assumes for a plan it has not run. MoE layers are the layer blocks reading a parameter with
    an ``"expert"`` axis; the recomputed ones (every layer under ZeRO-3, else the first
    ``floor(remat · layers)``) dispatch again."""
    from evo import models
    from evo.sharding.layout import EXPERT_AXIS
    specs = models.param_specs(cfg)
    layers = [b for b in models.blocks(cfg) if b.kind == "layer"]
    redone = layers if plan.zero == 3 else layers[:math.floor(remat * len(layers))]
    sizes = [s.shape[s.axes.index(EXPERT_AXIS)] for s in specs.values() if EXPERT_AXIS in s.axes]
    routed = lambda bs: sum(any(EXPERT_AXIS in specs[k].axes for k in b.params)  # noqa: E731
                            for b in bs)
    rows = 2 * tokens_per_micro * cfg.top_k * micro_num
    return ExpertTraffic(sizes[0] if sizes else 0, micro_num * routed(layers),
                         rows * routed(layers), micro_num * routed(redone), rows * routed(redone))


def all_to_all(comm: Comm, x: torch.Tensor, axis: str, out_splits: list[int],
               in_splits: list[int]) -> torch.Tensor:
    """Rank ``i`` sends rows ``x[sum(in_splits[:j]) : ...+in_splits[j]]`` to rank ``j`` and
    receives ``out_splits[j]`` rows from rank ``j``, concatenated in rank order. Not
    differentiable (``AllToAll`` is)."""
    comm.log.add("all_to_all", axis, x)
    return _c10d.wait_tensor(_c10d.all_to_all_single(x.contiguous(), out_splits, in_splits,
                                                     comm.groups[axis].group_name))


class AllToAll(torch.autograd.Function):
    """``all_to_all`` forward; backward sends the gradient rows back (splits swapped)."""
    @staticmethod
    def forward(x, comm, axis, out_splits, in_splits):
        return all_to_all(comm, x, axis, out_splits, in_splits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.comm, ctx.axis, ctx.out_splits, ctx.in_splits = inputs

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            return (all_to_all(ctx.comm, g.detach(), ctx.axis, ctx.in_splits, ctx.out_splits),
                    None, None, None, None)


def group_by_expert(counts: torch.Tensor) -> torch.Tensor:
    """Rows laid out by ``counts [ranks, experts]`` (rank-major: every expert's rows from rank 0,
    then from rank 1, ...) → the row order that lists them expert-major (expert 0's rows from
    every rank, then expert 1's, ...). int64 ``[counts.sum()]``."""
    flat = counts.reshape(-1)
    starts = (flat.cumsum(0) - flat).view_as(counts)
    by_expert, start_by_expert = counts.t().reshape(-1), starts.t().reshape(-1)
    first = by_expert.cumsum(0) - by_expert       # where each run begins in the new order
    total = int(flat.sum())
    return torch.arange(total, device=counts.device) + \
        torch.repeat_interleave(start_by_expert - first, by_expert, output_size=total)


def experts(comm: Comm, x: torch.Tensor, counts: torch.Tensor, fn, traffic: ExpertTraffic,
            axis: str = AXIS) -> torch.Tensor:
    """``regions.experts`` over ``axis``: ``x [M, D]`` rows sorted by global expert, ``counts
    [E]`` int64 rows per expert; ``fn(x_local [R, D], counts_local [E/ep]) -> [R, D']`` runs this
    rank's experts on the rows routed to them (sorted by local expert). Returns ``[M, D']``, row
    ``m`` the result for ``x[m]``."""
    ep = comm.size(axis)
    n_experts = counts.numel()
    with torch.no_grad():
        received = all_to_all(comm, counts.reshape(-1).to(torch.int64), axis, [n_experts // ep] *
                              ep, [n_experts // ep] * ep).view(ep, -1)   # [source, local expert]
    send = counts.view(ep, -1).sum(1).tolist()
    recv = received.sum(1).tolist()
    traffic.add(n_experts, sum(send) + sum(recv))
    rows = AllToAll.apply(x, comm, axis, recv, send)
    order = group_by_expert(received)
    y = fn(rows.index_select(0, order), received.sum(0))
    y = _ungroup(y, order)
    return AllToAll.apply(y, comm, axis, send, recv)


def _ungroup(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of ``y = rows[order]``: ``out[order[i]] = y[i]`` (differentiable)."""
    return y.index_select(0, torch.argsort(order))
