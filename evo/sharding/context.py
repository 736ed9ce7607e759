"""Long context: one sequence split over the ``cp × sp`` ranks of a sequence group.

Layout of a row of ``S`` tokens (pure arithmetic, ``sequence_indices``): the row is cut into
``2·cp`` chunks and context-parallel rank ``c`` takes chunks ``c`` and ``2·cp − 1 − c`` (zigzag:
each rank holds an early and a late chunk, so the causal work is balanced); Ulysses rank ``s`` then
takes the ``s``-th of ``sp`` contiguous pieces of that. Every token keeps its position and its
document from the global row: the step hands the model the tokens' global positions (restarting at
each document), and attention masks by global token index — the query at index ``i`` with
position ``p`` sees keys ``j`` with ``i − p ≤ j ≤ i`` (its own document, causal).

Attention (``SequenceAttention``, the ``Regions.attention`` of a sharded step):

- Ulysses (``sp``): an all-to-all turns q, k, v ``[b, S/(cp·sp), heads, d]`` into ``[b, S/cp,
  heads/sp, d]`` and the output back. When ``sp`` exceeds the kv heads, each kv head is
  replicated ``sp / kv_heads`` times first (the gradient sums over the copies).
- Ring (``cp``): k and v of the ``S/cp`` tokens travel around the ring; at each of the ``cp``
  steps the local queries attend the visiting block under the global document-causal mask
  (a block wholly masked is skipped), the next block's send/receive running meanwhile, and the
  partial outputs merge by log-sum-exp. The ring is one autograd node (``_Ring``) that keeps
  only the local q, k, v, the merged output and its lse; its backward goes round the ring again,
  each rank computing the visiting block's dk, dv (and its own dq) from the merged output and
  lse, the dk/dv accumulators travelling with their blocks and going home at the end.

Gradients of every parameter are summed over the sequence group after the data-parallel
synchronisation (each rank saw part of each sequence); the loss normaliser counts the labelled
tokens of the whole sequence. Under ``plan.weight_parallel`` the weights are stored sharded over
the sequence group (mesh axis ``seq``) and gathered per block (``planner.ShardedRegions``): the
backward of the gather reduce-scatters their gradients over the group, which is that sum.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from evo import models
from evo.sharding import comm as C
from evo_kernels.attention import Span, attention_lse, choose_lse_backend, dense_mask, \
    lse_grads, merge_lse, positions_from_cu_seqlens

SEQUENCE_AXES = ("cp", "sp")
_c10d = torch.ops._c10d_functional


# ------------------------------------------------------------------------------------ layout

def cp_indices(seq: int, cp: int, cp_index: int, zigzag: bool = True) -> torch.Tensor:
    """Global token indices ``[seq / cp]`` of context-parallel rank ``cp_index``: chunks
    ``cp_index`` and ``2·cp − 1 − cp_index`` of ``2·cp`` (zigzag), or the ``cp_index``-th of
    ``cp`` contiguous chunks."""
    if not zigzag or cp == 1:
        n = seq // cp
        return torch.arange(cp_index * n, (cp_index + 1) * n)
    n = seq // (2 * cp)
    late = 2 * cp - 1 - cp_index
    return torch.cat([torch.arange(cp_index * n, (cp_index + 1) * n),
                      torch.arange(late * n, (late + 1) * n)])


def sequence_indices(seq: int, cp: int, sp: int, cp_index: int, sp_index: int,
                     zigzag: bool = True) -> torch.Tensor:
    """Global token indices ``[seq / (cp·sp)]`` a rank of the sequence group holds."""
    mine = cp_indices(seq, cp, cp_index, zigzag)
    n = mine.numel() // sp
    return mine[sp_index * n:(sp_index + 1) * n]


def causal_work(seq: int, cp: int, zigzag: bool = True) -> list[int]:
    """Attention work of each context-parallel rank on one causal sequence: the number of
    (query, key) pairs its queries see — what the ring's blocks compute (the counted FLOPs are
    ``4·d·heads`` times this)."""
    return [int((cp_indices(seq, cp, c, zigzag) + 1).sum()) for c in range(cp)]


def check_sequence(plan, seq: int) -> None:
    """ValueError naming the plan's fields when a row of ``seq`` tokens cannot be split."""
    parts = (2 * plan.cp if plan.cp > 1 else 1) * plan.sp
    if seq % parts:
        what = "2·plan.cp·plan.sp" if plan.cp > 1 else "plan.sp"
        raise ValueError(f"plan.cp={plan.cp}, plan.sp={plan.sp}: the sequence length {seq} must "
                         f"be divisible by {what} = {parts}")


def check_plan(plan, cfg, attention: str) -> None:
    """Bad input for a sequence-parallel plan, before any process-group work: ``sp`` must split
    each tensor-parallel rank's heads (and its kv heads, or be a multiple of them), ring attention
    needs a backend that returns its log-sum-exp."""
    divisors = models.family_of(cfg).tp_divisors(cfg)
    heads = divisors.get("model.num_heads", 1) // plan.tp
    kv = divisors.get("model.num_kv_heads", heads * plan.tp) // plan.tp
    if plan.sp > 1 and heads % plan.sp:
        raise ValueError(f"plan.sp={plan.sp} must divide the attention heads of each rank "
                         f"(model.num_heads / plan.tp = {heads})")
    if plan.sp > 1 and kv % plan.sp and plan.sp % kv:
        raise ValueError(f"plan.sp={plan.sp} must divide the kv heads of each rank "
                         f"(model.num_kv_heads / plan.tp = {kv}) or be a multiple of them")
    if plan.cp > 1:
        try:
            choose_lse_backend(torch.device("cpu"), attention)
        except ValueError as e:
            raise ValueError(f"plan.cp={plan.cp} needs ring attention's log-sum-exp: {e} "
                             f"(Step.attention={attention!r})") from None
    if plan.sequence_parallel:
        raise ValueError("plan.sequence_parallel (tensor-parallel norm regions) does not combine "
                         "with plan.sp / plan.cp yet")


def kv_heads_sent(kv_heads: int, sp: int) -> int:
    """kv heads each Ulysses rank sends: replicated up to ``sp`` when there are fewer."""
    return kv_heads if kv_heads >= sp else sp


# ---------------------------------------------------------------------------------- the batch

def split_batch(batch: dict[str, torch.Tensor], plan, coords: dict[str, int]
                ) -> dict[str, torch.Tensor]:
    """This rank's tokens of every micro-batch (``train`` batch layout): ``tokens``, ``labels``,
    ``source`` taken at ``sequence_indices`` along the sequence, and ``positions`` the global
    ones (from ``cu_seqlens`` when the batch has no ``positions``); ``cu_seqlens`` dropped (the
    attention masks by global index and position). ValueError when the given positions do not
    restart at every document of ``cu_seqlens``, which the mask relies on."""
    tokens = batch["tokens"]
    seq = tokens.shape[-1]
    check_sequence(plan, seq)
    if tokens.dim() == 3 and "cu_seqlens" in batch:
        raise ValueError("plan.cp / plan.sp split each row's sequence: pack documents into one "
                         "row per micro-batch (tokens [micro_num, T] with cu_seqlens)")
    positions = batch.get("positions")
    if "cu_seqlens" in batch:
        from_cu = torch.stack([positions_from_cu_seqlens(cu, seq) for cu in batch["cu_seqlens"]])
        from_cu = from_cu.view(tokens.shape)
        if positions is not None and not torch.equal(positions, from_cu):
            raise ValueError("plan.cp / plan.sp: batch positions must restart at every document "
                             "of cu_seqlens (the sequence-split attention masks by them)")
        positions = from_cu
    elif positions is None:
        positions = torch.arange(seq, device=tokens.device).expand(tokens.shape)
    idx = sequence_indices(seq, plan.cp, plan.sp, coords["cp"], coords["sp"]).to(tokens.device)
    out = {k: v.index_select(-1, idx) for k, v in batch.items()
           if k in ("tokens", "labels", "source")}
    out["positions"] = positions.index_select(-1, idx)
    return out


# ----------------------------------------------------------------------- collectives (autograd)

def _all_to_all(x: torch.Tensor, comm: C.Comm, axis: str) -> torch.Tensor:
    """Piece ``j`` of ``x``'s first dimension to rank ``j``; the result's piece ``j`` from rank
    ``j``."""
    comm.log.add("all_to_all", axis, x)
    n = [x.shape[0] // comm.size(axis)] * comm.size(axis)
    return _c10d.wait_tensor(_c10d.all_to_all_single(x.contiguous(), n, n,
                                                     comm.groups[axis].group_name))


class _AllToAll(torch.autograd.Function):
    """``_all_to_all`` with equal pieces: its own transpose, so backward is the same exchange."""
    @staticmethod
    def forward(x, comm, axis):
        return _all_to_all(x, comm, axis)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.comm, ctx.axis = inputs

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            return _all_to_all(g.detach(), ctx.comm, ctx.axis), None, None


def heads_to_sequence(x: torch.Tensor, comm: C.Comm) -> torch.Tensor:
    """``[b, L, heads, d]`` on each sp rank → ``[b, sp·L, heads/sp, d]``: the sp ranks' pieces
    of the sequence in rank order, this rank's share of the heads."""
    n = comm.size("sp")
    b, L, h, d = x.shape
    y = _AllToAll.apply(x.view(b, L, n, h // n, d).permute(2, 0, 1, 3, 4), comm, "sp")
    return y.permute(1, 0, 2, 3, 4).reshape(b, n * L, h // n, d)


def sequence_to_heads(y: torch.Tensor, comm: C.Comm) -> torch.Tensor:
    """Inverse of ``heads_to_sequence``."""
    n = comm.size("sp")
    b, S, hs, d = y.shape
    x = _AllToAll.apply(y.view(b, n, S // n, hs, d).permute(1, 0, 2, 3, 4), comm, "sp")
    return x.permute(1, 2, 0, 3, 4).reshape(b, S // n, n * hs, d)


def launch_shift(comm: C.Comm, x: torch.Tensor, axis: str, offset: int = 1) -> tuple:
    """Start sending ``x`` to the rank ``offset`` ahead on the ring of ``axis`` while receiving
    the same-shaped block of the rank ``offset`` behind: an all-to-all in which each rank sends
    one piece (the functional collective runs until ``wait_shift``, so compute overlaps it)."""
    comm.log.add("send_recv", axis, x)
    n, me = comm.size(axis), dist.get_rank(comm.groups[axis])
    send, recv = [0] * n, [0] * n
    send[(me + offset) % n] = recv[(me - offset) % n] = x.shape[0]
    return (_c10d.all_to_all_single(x.contiguous(), recv, send, comm.groups[axis].group_name),)


def wait_shift(pending: tuple) -> torch.Tensor:
    return _c10d.wait_tensor(pending[0])


# ------------------------------------------------------------------------------- the attention

class SequenceAttention:
    """The attention of one forward pass over a sequence split across the sequence group:
    ``attend(layer, q, k, v, window=None)`` with q ``[b, L, heads, d]``, k, v ``[b, L, kv_heads,
    d]`` of this rank's ``L`` tokens; ``positions [b, L]`` their global positions."""

    def __init__(self, comm: C.Comm, plan, coords: dict[str, int], positions: torch.Tensor,
                 backend: str):
        self.comm, self.plan, self.coords, self.backend = comm, plan, coords, backend
        self.local_positions = positions
        self._query = None

    def query_span(self):
        """Global index ``[Lc]`` of this cp rank's tokens (what attention sees after Ulysses),
        and the index ``[b, Lc]`` of each one's document start. Computed once per forward."""
        if self._query is None:
            pos = self.local_positions
            if self.comm.size("sp") > 1:   # the other sp ranks' positions (integers, no grad)
                pos = self.comm.all_gather(pos.contiguous(), "sp", dim=1)
            seq = pos.shape[1] * self.plan.cp
            idx = cp_indices(seq, self.plan.cp, self.coords["cp"]).to(pos.device)
            self._query = (idx, idx - pos)
        return self._query

    def __call__(self, layer: int, q, k, v, window: int | None = None):
        sp = self.comm.size("sp")
        if sp > 1:
            rep = kv_heads_sent(k.shape[2], sp) // k.shape[2]
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            q, k, v = (heads_to_sequence(t, self.comm) for t in (q, k, v))
        out = self.ring(q, k, v, window)
        return sequence_to_heads(out, self.comm) if sp > 1 else out

    def ring(self, q, k, v, window):
        """Ring attention over ``cp``: ``[b, Lc, heads, d]`` → the same (``_Ring``)."""
        return _Ring.apply(q, k, v, self, window)[0]

    def ring_blocks(self, seq: int, window) -> list[Span | None]:
        """The mask of each ring step ``i``: this rank's queries against the block of cp rank
        ``c − i`` (its own first), ``None`` for a block no query sees (skipped)."""
        n, c = self.plan.cp, self.coords["cp"]
        q_idx, q_start = self.query_span()
        spans = [Span(q_idx, q_start, cp_indices(seq, n, (c - i) % n).to(q_idx.device), window)
                 for i in range(n)]
        return [s if i == 0 or s.any() else None for i, s in enumerate(spans)]


class _Ring(torch.autograd.Function):
    """Ring attention as one autograd node: ``(q, k, v, attention, window)`` → ``(out, lse)``,
    keeping for backward only the local q, k, v, the merged output and its lse.

    Forward: k and v travel around the cp ring (each block's shift started before the current
    block is computed); the local queries attend each visiting block (``attention_lse``; a block
    no query sees is skipped) and the partial outputs merge by log-sum-exp. Backward: a second
    pass around the ring; each rank computes, for the visiting block, its part of dq
    (accumulated here) and that block's dk, dv from the merged output and lse (``lse_grads``:
    the probabilities recomputed as ``exp(s − lse)``). The dk, dv accumulator travels with its
    block (sent after the block's compute, awaited after the next one) and a last shift takes
    it home; it is sent in the accumulation dtype (fp32 for bf16)."""
    @staticmethod
    @torch.no_grad()
    def forward(q, k, v, attn, window):
        blocks = attn.ring_blocks(q.shape[1] * attn.plan.cp, window)
        kv, out, lse = torch.stack([k, v]), None, None
        for i, span in enumerate(blocks):
            pending = launch_shift(attn.comm, kv, "cp") if i < len(blocks) - 1 else None
            if span is not None:
                o_i, l_i = attention_lse(q, kv[0], kv[1], span, backend=attn.backend)
                out, lse = (o_i.to(l_i.dtype), l_i) if out is None else \
                    merge_lse(out, lse, o_i, l_i)
            if pending is not None:
                kv = wait_shift(pending)
        return out.to(q.dtype), lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, ctx.attn, ctx.window = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(q, k, v, *output)

    @staticmethod
    @torch.no_grad()
    def backward(ctx, g_out, _):
        q, k, v, out, lse = ctx.saved_tensors
        comm, acc = ctx.attn.comm, lse.dtype
        blocks = ctx.attn.ring_blocks(q.shape[1] * ctx.attn.plan.cp, ctx.window)
        g_out = g_out.to(acc)
        row = (g_out * out.to(acc)).sum(-1)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv, sending = torch.stack([k, v]), None
        for i, span in enumerate(blocks):
            pending = launch_shift(comm, kv, "cp") if i < len(blocks) - 1 else None
            part = 0
            if span is not None:   # (always at i = 0: every query sees itself)
                dq_i, dk_i, dv_i = lse_grads(q, kv[0], kv[1], span, lse, g_out, row)
                dq += dq_i
                part = torch.stack([dk_i, dv_i])
            dkv = part if i == 0 else wait_shift(sending) + part   # the block's dk, dv so far
            if len(blocks) > 1:   # to the next rank, which holds the block
                sending = launch_shift(comm, dkv, "cp")
            if pending is not None:
                kv = wait_shift(pending)
        if len(blocks) > 1:   # the own block's dk, dv, home from the last rank it visited
            dkv = wait_shift(sending)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


# --------------------------------------------------------------------------------- gradients

def reduce_over_sequence(tensors: dict[str, torch.Tensor], comm: C.Comm
                         ) -> dict[str, torch.Tensor]:
    """Sum over the sequence group (cp, then sp): each rank saw part of every sequence."""
    for axis in SEQUENCE_AXES:
        if comm.size(axis) > 1:
            tensors = {k: comm.all_reduce(t, axis) for k, t in tensors.items()}
    return tensors


# ------------------------------------------------------------------------ communication model

def count_comm(add, plan, cfg, micro_num: int, tokens_per_micro: int, act: int,
               recomputed_layers: int, synced_grad_bytes: tuple[int, ...], sources: int) -> None:
    """Bytes of the sequence group's collectives in one step (``tokens_per_micro``: a whole
    micro-batch's tokens): per micro-batch the positions gathered over sp, per layer forward
    (again for each recomputed layer) and backward the Ulysses all-to-alls of q, k, v and the
    output, and the ring's ``cp − 1`` shifts of k and v; per layer backward also the ring's
    ``cp`` shifts of the dk, dv accumulators (in fp32, or wider for wider activations); per step
    the gradient sum (``synced_grad_bytes``: one all-reduce per tensor) and the loss (and
    per-source) sums. ``add(kind, axis, bytes, times)``: ``times`` collectives of ``bytes``."""
    if plan.cp * plan.sp == 1:
        return
    divisors = models.family_of(cfg).tp_divisors(cfg)
    heads = divisors["model.num_heads"] // plan.tp
    kv = divisors.get("model.num_kv_heads", heads * plan.tp) // plan.tp
    layers = sum(b.kind == "layer" for b in models.blocks(cfg))
    d = _head_dim(cfg)
    local = tokens_per_micro // (plan.cp * plan.sp)
    passes = micro_num * (2 * layers + recomputed_layers)
    add("all_gather", "sp", local * 8, micro_num)
    kv_sent = kv_heads_sent(kv, plan.sp) if plan.sp > 1 else kv
    for h in (heads, kv_sent, kv_sent, heads):   # q, k, v there; the output back
        add("all_to_all", "sp", local * d * act * h, passes)
    block = 2 * tokens_per_micro // plan.cp * (kv_sent // plan.sp) * d   # k and v, elements
    forward, backward = micro_num * (layers + recomputed_layers), micro_num * layers
    add("send_recv", "cp", block * act, (forward + backward) * (plan.cp - 1))
    add("send_recv", "cp", block * max(act, 4), backward * plan.cp)   # dk, dv (fp32 or wider)
    for axis in SEQUENCE_AXES:
        for nbytes in synced_grad_bytes:
            add("all_reduce", axis, nbytes)
        add("all_reduce", axis, 4)                                   # the loss
        add("all_reduce", axis, 4 * sources, 2 if sources else 0)    # per-source loss, tokens


def _head_dim(cfg) -> int:
    return getattr(cfg, "dim_per_head", None) or cfg.hidden_size // cfg.num_heads


# ------------------------------------------------------------------------- memory (evo plan)

def activation_bytes(cfg, plan, seq: int, act: int = 4) -> dict[str, int]:
    """Bytes one rank keeps for backward over one micro-batch row of ``seq`` tokens (packed
    documents, no recomputation, ``act``-byte activations), by part — arithmetic on shapes,
    counting what the LLaMA-shaped layer saves (``benchmarks/long_context.py`` measures it):

    - ``per_token``: per local token (``seq / (cp·sp)``), each layer's 8 hidden- and 4
      ffn-wide tensors, the head's hidden- and vocabulary-wide ones, rotary tables, norms;
    - ``attention``: one process, the reference backend's q, k, v, output (5 head-widths) and
      lse per layer, and its dense ``[seq, seq]`` additive mask where ``dense_mask(seq)`` (short
      rows; longer ones attend blockwise); under sp / cp what the ring (``_Ring``) keeps per
      layer: the local q, k, v, the merged output and its lse (all linear in the local tokens:
      the visiting blocks and the probabilities are recomputed in backward) — under Ulysses
      each its own tensor, under cp alone v a view of the fused projection (kept whole) and the
      output the one the output projection keeps."""
    layers = sum(b.kind == "layer" for b in models.blocks(cfg))
    local = seq // (plan.cp * plan.sp)
    d, h = _head_dim(cfg), cfg.hidden_size
    heads, kv = cfg.num_heads // plan.tp, cfg.kv_heads // plan.tp
    ffn = getattr(cfg, "intermediate_size", 4 * h) // plan.tp
    per_token = layers * (8 * h + 4 * ffn + 2) * act + (h + cfg.vocab_size // plan.tp) * act \
        + 2 * d * act + 4 + 16
    if plan.cp * plan.sp == 1:
        mask = seq * seq * 4 if dense_mask(seq) else 0
        attention = layers * (seq * (5 * heads * d + heads) * act + mask)
    else:
        sent = kv_heads_sent(kv, plan.sp) if plan.sp > 1 else kv
        widths = 2 * heads * d + 2 * sent * d + heads if plan.sp > 1 else \
            (2 * heads + 3 * kv) * d + heads   # v a view of the fused q, k, v projection
        attention = layers * local * widths * act
    return {"per_token": local * per_token, "attention": attention,
            "total": local * per_token + attention}


def bytes_per_layer(cfg, plan, seq: int, act: int = 2) -> dict[str, int]:
    """Bytes one rank sends per layer and micro-batch of ``seq`` tokens, forward and backward:
    Ulysses all-to-alls over sp, ring shifts over cp."""
    sizes, degree = {}, {"cp": plan.cp, "sp": plan.sp}

    def add(kind, axis, nbytes, times=1):
        if degree.get(axis, 1) > 1:
            sizes[f"{kind}/{axis}"] = sizes.get(f"{kind}/{axis}", 0) + nbytes * times
    count_comm(add, plan, dataclasses.replace(cfg, num_layers=1), 1, seq, act, 0, (), 0)
    return {k: v for k, v in sizes.items() if k.split("/")[0] in ("all_to_all", "send_recv")
            and v}


__all__ = ["sequence_indices", "cp_indices", "causal_work", "split_batch", "SequenceAttention",
           "reduce_over_sequence", "count_comm", "check_plan", "check_sequence",
           "activation_bytes", "bytes_per_layer"]
