"""Mixture of experts: the token-choice router, dispatch and combine by sorting, the expert
computation, and the MoE feed-forward layer, as pure functions.

A MoE layer replaces a decoder layer's MLP. Its parameters (within the layer; weights stored
``[in, out]``, one matrix per expert behind a leading "expert" axis)::

    moe.router        [hidden, E]                   ("embed", "router")   replicated
    moe.w1, moe.w3    [E, hidden, moe_ffn]          ("expert", "embed", "mlp")
    moe.w2            [E, moe_ffn, hidden]          ("expert", "mlp", "embed")
    moe.shared.w1/w3  [hidden, shared_ffn]          ("embed", "mlp")      shared experts, if any
    moe.shared.w2     [shared_ffn, hidden]          ("mlp", "embed")
    moe.shared_gate   [hidden, 1]                   ("embed", "gate")     their gate, if any

The layer (``moe_mlp``): router logits ``h @ router`` of the normed input, computed before the
tensor-parallel region and entered into it (so their gradient is complete on every rank); scores
``softmax`` or ``sigmoid`` of the logits in fp32; each token picks the ``top_k`` experts of highest
score (plus the per-expert balancing ``bias`` when given: it steers the choice only, never the
weights); the chosen scores, renormalised to sum 1 when ``norm_topk_prob``, weight the experts'
outputs. The (token, choice) pairs are sorted by expert (stable: token order within an expert) and
``regions.experts(x_sorted, counts, fn)`` runs the experts on them; ``fn`` holds the expert
weights as the layer received them (under expert parallelism: this rank's experts only) and
multiplies by all of them with one grouped GEMM (``evo_kernels.grouped``). Dropless by default;
with a ``capacity_factor`` c each expert takes at most ``ceil(c · tokens · top_k / E)`` rows, the
first ones in token order, and the rest are dropped (their output is 0; counted in the stats).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from evo.models.layers import LOCAL, Regions, swiglu_act
from evo_kernels.grouped import grouped_mm


class Stats(NamedTuple):
    """What one MoE layer's forward reports: ``load [E]`` fp32 the (token, choice) pairs routed
    to each expert (before any drop), ``dropped`` 0-dim fp32 the pairs dropped by the capacity,
    ``balance`` 0-dim fp32 the Switch/GShard load-balancing loss summed over this rank's tokens,
    ``E · Σ_e f_e · Σ_t p_te`` (``f_e`` the fraction of pairs routed to e, ``p_te`` token t's
    normalised score of e), differentiable through the scores: divided by the token count it is
    1 for a uniform router."""
    load: torch.Tensor
    dropped: torch.Tensor
    balance: torch.Tensor


def scores_of(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Expert scores of router ``logits [..., E]`` in fp32 (fp64 for fp64 logits): ``softmax`` or
    ``sigmoid``."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if score_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")


def route(scores: torch.Tensor, top_k: int, norm_topk_prob: bool,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice top-k over ``scores [T, E]`` fp32: (expert ids ``[T, k]`` int64, their weights
    ``[T, k]`` fp32). ``bias [E]`` is added for the choice only."""
    choose = scores if bias is None else scores.detach() + bias.to(scores.dtype)
    idx = torch.topk(choose, top_k, dim=-1).indices
    weights = scores.gather(-1, idx)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return idx, weights


class Dispatch(NamedTuple):
    """Where each kept (token, choice) pair goes: ``rows [M]`` its flat index ``t · k + j`` in
    expert order, ``counts [E]`` int64 the kept rows per expert, ``load [E]`` the routed pairs per
    expert before dropping."""
    rows: torch.Tensor
    counts: torch.Tensor
    load: torch.Tensor


def dispatch(idx: torch.Tensor, num_experts: int, capacity: int | None = None) -> Dispatch:
    """Sort the pairs ``idx [T, k]`` by expert (stable); keep at most ``capacity`` per expert."""
    flat = idx.reshape(-1)
    load = torch.bincount(flat, minlength=num_experts)
    order = torch.argsort(flat, stable=True)
    if capacity is None:
        return Dispatch(order, load, load)
    start = torch.cumsum(load, 0) - load
    rank_in_expert = torch.arange(flat.numel(), device=flat.device) - start[flat[order]]
    keep = rank_in_expert < capacity
    return Dispatch(order[keep], load.clamp(max=capacity), load)


def capacity_of(capacity_factor: float | None, tokens: int, top_k: int, num_experts: int
                ) -> int | None:
    """Rows per expert a ``capacity_factor`` allows (None: dropless)."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def swiglu_experts(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, x: torch.Tensor,
                   counts: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The experts' SwiGLU MLPs on rows grouped by expert: ``x [M, D]``, ``counts [G]`` with
    ``G = w1.shape[0]`` the experts these weights hold. Bind the weights with
    ``functools.partial`` to get the ``fn`` of ``Regions.experts``."""
    g, u = grouped_mm(x, w1, counts, backend), grouped_mm(x, w3, counts, backend)
    return grouped_mm(swiglu_act(g, u), w2, counts, backend)


def balance_loss(scores: torch.Tensor, load: torch.Tensor, top_k: int, total_tokens: int,
                 score_func: str) -> torch.Tensor:
    """``E · Σ_e f_e · Σ_t p_te`` over the tokens of ``scores [T, E]`` fp32 (``f_e = load_e /
    (total_tokens · k)``, no gradient; ``p`` the scores, normalised per token for sigmoid)."""
    p = scores if score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
    f = load.to(p.dtype) / max(total_tokens * top_k, 1)
    return scores.shape[-1] * (p.sum(0) * f).sum()


def moe_mlp(cfg, p: dict[str, torch.Tensor], hn: torch.Tensor, regions: Regions = LOCAL,
            bias: torch.Tensor | None = None, backend: str = "auto"
            ) -> tuple[torch.Tensor, Stats]:
    """One MoE feed-forward of the normed ``hn [batch, seq, hidden]`` (before ``regions.enter``):
    its output (a partial sum under tensor parallelism, like ``Llama.mlp``) and its ``Stats``.
    ``p``: the layer's parameters named within the layer (``moe.*``); ``cfg``: a MoE config
    (``num_experts``, ``top_k``, ``score_func``, ``norm_topk_prob``, ``capacity_factor``).
    ``bias [E]``: the balancing bias (``None``: none)."""
    e, k = p["moe.router"].shape[1], cfg.top_k
    local_logits = hn @ p["moe.router"]
    h, logits = regions.enter(hn), regions.enter(local_logits)
    b, s, d = h.shape
    scores = scores_of(logits, cfg.score_func).reshape(b * s, e)
    idx, weights = route(scores, k, cfg.norm_topk_prob, bias)
    plan = dispatch(idx, e, capacity_of(cfg.capacity_factor, b * s, k, e))
    x_flat = h.reshape(b * s, d)
    fn = functools.partial(swiglu_experts, p["moe.w1"], p["moe.w3"], p["moe.w2"],
                           backend=backend)
    y_sorted = regions.experts(x_flat[plan.rows // k], plan.counts, fn)
    y = y_sorted.new_zeros(b * s * k, y_sorted.shape[-1]).index_copy(0, plan.rows, y_sorted)
    out = (y.view(b * s, k, -1) * weights.to(y.dtype)[..., None]).sum(1)
    if "moe.shared.w1" in p:
        out = out + shared_expert(p, x_flat, regions)
    local_scores = scores_of(local_logits, cfg.score_func).reshape(-1, e)
    stats = Stats(plan.load.float(), (plan.load - plan.counts).sum().float(),
                  balance_loss(local_scores, plan.load, k, b * s, cfg.score_func))
    return out.view(b, s, -1), stats


def shared_expert(p: dict[str, torch.Tensor], x: torch.Tensor, regions: Regions = LOCAL
                  ) -> torch.Tensor:
    """The shared experts' SwiGLU MLP of ``x [T, D]`` (inside the region), times
    ``sigmoid(x @ shared_gate)`` when the layer has that gate (a replicated weight applied to a
    partial sum: ``regions.inside``)."""
    y = swiglu_act(x @ p["moe.shared.w1"], x @ p["moe.shared.w3"]) @ p["moe.shared.w2"]
    if "moe.shared_gate" in p:
        y = torch.sigmoid(x @ regions.inside(p["moe.shared_gate"])) * y
    return y
