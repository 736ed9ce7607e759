"""Causal attention over packed documents: one pure op, several implementations.

The op: ``attention(q, k, v, cu_seqlens=None, window=None)`` with

- ``q`` ``[batch, seq, heads, head_dim]``, ``k`` and ``v`` ``[batch, seq, kv_heads, head_dim]``
  (grouped-query attention: ``heads`` is a multiple of ``kv_heads``; query head ``h`` reads kv head
  ``h // (heads // kv_heads)``);
- ``cu_seqlens`` ``None`` (every row is one causal sequence) or int ``[n_docs + 1]``: document
  boundaries over the ``batch * seq`` tokens taken in row-major order, starting at 0 and ending at
  ``batch * seq``. A token attends only to earlier tokens of its own document;
- ``window`` ``None`` (no limit) or a positive int: sliding-window attention, in which the query at
  index ``i`` sees keys ``j`` with ``i - window < j <= i`` — itself and the ``window - 1`` tokens
  before it (transformers' ``sliding_window``, as in Mistral). Combined with ``cu_seqlens``: the
  same document AND within the window.

Returns ``[batch, seq, heads, head_dim]`` in q's dtype. ``reference`` is the definition (fp32-exact
on CPU); faster backends plug in through ``BACKENDS`` and are tested against it.

Attention with its log-sum-exp, ``attention_lse(q, k, v, mask)`` → ``(out, lse)``: one block of
queries against one block of keys under an explicit mask (boolean, or a ``Span`` of token
indices), with ``lse [batch, n, heads]`` fp32 (fp64 for fp64 inputs) the log of each query row's
softmax denominator (``-inf`` where a row sees no key). Partial results over disjoint key blocks
merge exactly by ``merge_lse`` (ring attention). ``LSE_BACKENDS`` holds the implementations that
can return it.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document index of every token: int64 ``[total]`` from boundaries ``[n_docs + 1]``."""
    marks = torch.zeros(total + 1, dtype=torch.int64, device=cu_seqlens.device)
    marks.index_add_(0, cu_seqlens[1:-1].long(), torch.ones_like(cu_seqlens[1:-1], dtype=torch.int64))
    return marks[:total].cumsum(0)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every token inside its document (restarting at 0): int64 ``[total]``."""
    seg = segment_ids(cu_seqlens, total)
    starts = cu_seqlens.long()[seg]
    return torch.arange(total, device=cu_seqlens.device) - starts


def check_window(window: int | None) -> None:
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                               or window <= 0):
        raise ValueError(f"attention window must be a positive integer or None, got {window!r}")


def visible(q_idx: torch.Tensor, k_idx: torch.Tensor, window: int | None) -> torch.Tensor:
    """Whether the query at token index ``q_idx`` may attend the key at ``k_idx`` (broadcasting):
    causal, and within the last ``window`` tokens when a window is given. The one definition shared
    by every mask below."""
    ok = k_idx <= q_idx
    return ok if window is None else ok & (k_idx > q_idx - window)


def document_causal_mask(cu_seqlens: torch.Tensor, total: int, window: int | None = None
                         ) -> torch.Tensor:
    """Boolean ``[total, total]``: True where query i may attend key j (same document, j <= i,
    and ``i - j < window`` when a window is given)."""
    seg = segment_ids(cu_seqlens, total)
    idx = torch.arange(total, device=cu_seqlens.device)
    return (seg[:, None] == seg[None, :]) & visible(idx[:, None], idx[None, :], window)


def cached_mask(valid: torch.Tensor, start: int, n: int, window: int | None = None
                ) -> torch.Tensor:
    """The mask for decoding with a KV cache (``attention_with_mask``): ``n`` new queries in cache
    slots ``start .. start+n-1`` over slots ``0 .. start+n-1``, causal, within ``window`` slots, and
    only to slots ``valid [batch, capacity]`` marks as real tokens → bool ``[batch, 1, n,
    start + n]``. Prompts are left-padded, so slot distance is token distance."""
    end = start + n
    q_idx = torch.arange(start, end, device=valid.device)
    k_idx = torch.arange(end, device=valid.device)
    return visible(q_idx[:, None], k_idx[None, :], window)[None, None] & valid[:, None, None, :end]


# Tokens up to which `reference` masks packed documents or a window with a dense [S, S] mask
# (torch's fused SDPA: the faster at the suite's small sizes); longer rows go blockwise.
DENSE_MASK_TOKENS = 4096


def dense_mask(tokens: int) -> bool:
    """Whether ``reference`` builds a dense mask over ``tokens`` (quadratic memory) rather than
    attending blockwise (``reference_lse`` over a ``Span``: memory linear in the tokens)."""
    return tokens <= DENSE_MASK_TOKENS


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              cu_seqlens: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """SDPA with a causal (or block-diagonal causal, or windowed) mask; beyond
    ``DENSE_MASK_TOKENS`` documents and windows go through the blockwise ``reference_lse``.
    Runs everywhere, with gradients."""
    check_window(window)
    b, s, h, d = q.shape
    if cu_seqlens is None and window is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=h != k.shape[2])
        return out.transpose(1, 2)
    total = b * s if cu_seqlens is not None else s
    if not dense_mask(total):
        return _blockwise(q, k, v, cu_seqlens, window)
    if cu_seqlens is None:
        idx = torch.arange(s, device=q.device)
        mask = visible(idx[:, None], idx[None, :], window)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=h != k.shape[2])
        return out.transpose(1, 2)
    mask = document_causal_mask(cu_seqlens, total, window)
    qf, kf, vf = (t.reshape(1, total, t.shape[2], d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, enable_gqa=h != k.shape[2])
    return out.transpose(1, 2).reshape(b, s, h, d)


def _blockwise(q, k, v, cu_seqlens, window):
    """``reference``'s attention by ``reference_lse`` over the ``Span`` of the documents (packed
    rows flattened into one) or of each row (no ``cu_seqlens``): no ``[S, S]`` tensor."""
    b, s, h, d = q.shape
    if cu_seqlens is None:
        idx = torch.arange(s, device=q.device)
        return reference_lse(q, k, v, Span(idx, torch.zeros_like(idx)[None], idx, window))[0]
    total = b * s
    idx = torch.arange(total, device=q.device)
    starts = cu_seqlens.long()[segment_ids(cu_seqlens, total)]
    qf, kf, vf = (t.reshape(1, total, t.shape[2], d) for t in (q, k, v))
    out, _ = reference_lse(qf, kf, vf, Span(idx, starts[None], idx, window))
    return out.reshape(b, s, h, d)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         cu_seqlens: torch.Tensor | None = None, window: int | None = None,
         cache: dict | None = None) -> torch.Tensor:
    """``flex_attention`` with a document-causal (and windowed) block mask: blocks wholly outside
    a document or the window are skipped, so the cost follows the documents' lengths and the
    window, not the row's. Compiled (its only fast form); forward and backward on CUDA, forward
    only on a CPU. ``cache`` keeps the block mask between the layers of one forward pass."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    check_window(window)
    b, s, h, d = q.shape
    total = b * s
    key = ("flex_mask", total, window, q.device)
    if cache is not None and key in cache:
        mask = cache[key]
    else:
        seg = segment_ids(cu_seqlens, total) if cu_seqlens is not None else \
            torch.arange(b, device=q.device).repeat_interleave(s)

        def document_causal(batch, head, qi, ki):
            return (seg[qi] == seg[ki]) & visible(qi, ki, window)
        mask = create_block_mask(document_causal, None, None, total, total, device=q.device)
        if cache is not None:
            cache[key] = mask
    fn = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    qf, kf, vf = (t.reshape(1, total, t.shape[2], d).transpose(1, 2) for t in (q, k, v))
    out = fn(qf, kf, vf, block_mask=mask, enable_gqa=h != k.shape[2])
    return out.transpose(1, 2).reshape(b, s, h, d)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


# name -> implementation; each takes what `reference` does (plus an optional per-forward cache).
BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"reference": reference, "sdpa": reference,
                                                    "flex": flex}


def choose_backend(q: torch.Tensor, backend: str = "auto") -> Callable[..., torch.Tensor]:
    """The implementation for these inputs: ``backend`` by name, or for "auto" the best available:
    ``flex`` on CUDA (documents skip each other's blocks), ``reference`` elsewhere (flex has no
    backward on a CPU)."""
    if backend == "auto":
        return BACKENDS["flex"] if q.device.type == "cuda" else BACKENDS["reference"]
    try:
        return BACKENDS[backend]
    except KeyError:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of "
                         f"{['auto', *BACKENDS]}") from None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              cu_seqlens: torch.Tensor | None = None, *, window: int | None = None,
              backend: str = "auto", cache: dict | None = None) -> torch.Tensor:
    fn = choose_backend(q, backend)
    if fn is reference:
        return fn(q, k, v, cu_seqlens, window)
    return fn(q, k, v, cu_seqlens, window, cache=cache)


def attention_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Attention of ``q [batch, n, heads, d]`` over ``k``, ``v`` ``[batch, m, kv_heads, d]`` where
    ``mask [batch, 1, n, m]`` bool allows it (decoding with a KV cache: new queries against every
    cached key; ``cached_mask`` builds it). A query row with no allowed key returns zeros."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).nan_to_num(0.0)


# ------------------------------------------------------------------------ attention with LSE

class Span(NamedTuple):
    """A document-causal mask described by token indices instead of stored: query ``i`` (global
    index ``q_index [n]``, its document starting at ``q_start [b, n]``, ``b`` may be 1 for every
    row) sees key ``j`` (``k_index [m]``, ascending) when ``q_start <= j <= i`` (and
    ``i - j < window``). ``dense()`` → bool ``[b, n, m]``. Memory linear in the tokens, where the
    dense mask is quadratic."""
    q_index: torch.Tensor
    q_start: torch.Tensor
    k_index: torch.Tensor
    window: int | None = None

    def dense(self) -> torch.Tensor:
        k = self.k_index
        mask = (k <= self.q_index[:, None]) & (k >= self.q_start[..., None])
        return mask if self.window is None else mask & (k > self.q_index[:, None] - self.window)

    def key_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` int64 ``[b, n]``: query row ``r`` sees exactly the keys
        ``k_index[lo[:, r]:hi[:, r]]`` (empty when ``hi <= lo``) — the visible keys are
        consecutive in the ascending ``k_index``. ValueError when ``k_index`` is not ascending."""
        k = self.k_index
        if k.numel() > 1 and not bool((k[1:] >= k[:-1]).all()):
            raise ValueError("Span.k_index must be ascending")
        first = self.q_start if self.window is None else \
            torch.maximum(self.q_start, self.q_index - self.window + 1)
        lo = torch.searchsorted(k, first.contiguous())
        hi = torch.searchsorted(k, self.q_index.contiguous(), right=True).expand_as(lo)
        return lo, hi

    def any(self) -> bool:
        """Whether any query sees any key (without the dense mask)."""
        lo, hi = self.key_ranges()
        return bool((hi > lo).any())


# Elements of one block of scores (fp32: 16 MiB): what the blockwise attention holds at a time.
BLOCK_ELEMENTS = 2**22


def query_block(b: int, heads: int, m: int) -> int:
    """Queries per block so that a block's scores ``[b, heads, block, m]`` hold at most
    ``BLOCK_ELEMENTS`` (at least one query)."""
    return max(1, BLOCK_ELEMENTS // max(1, b * heads * m))


def reference_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *,
                  block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [b, n, heads, d]`` against ``k``, ``v`` ``[b, m, kv_heads, d]`` where ``mask [b, n, m]``
    bool (or a ``Span``) allows → out ``[b, n, heads, d]`` in q's dtype (0 on rows with no
    allowed key) and lse ``[b, n, heads]`` fp32 (fp64 for fp64 inputs; ``-inf`` on those rows).
    Scores in fp32 (fp64 for fp64 inputs), ``block`` queries at a time (default
    ``query_block``), each block against only the keys a ``Span`` lets it see, so that no
    ``[n, m]`` tensor exists. Backward recomputes each block's probabilities from q, k and lse
    instead of keeping them (the memory kept is linear in the tokens, as with flash attention),
    and is exact for gradients arriving at the output and at the lse."""
    block = block or query_block(q.shape[0], q.shape[2], k.shape[1])
    return _AttentionLSE.apply(q, k, v, mask, block)


def _blocks(mask, n: int, m: int, block: int) -> list[tuple[slice, slice]]:
    """``(query rows, key columns)`` of each block of ``block`` queries that sees a key: for a
    ``Span`` the columns its rows see (from the block's earliest visible key to its latest),
    for a boolean mask, or when one block holds every query, all ``m``."""
    starts = range(0, n, block)
    if not isinstance(mask, Span) or n <= block:
        return [(slice(r, min(r + block, n)), slice(0, m)) for r in starts]
    lo, hi = mask.key_ranges()
    pad = -n % block
    lo = F.pad(lo, (0, pad), value=m).view(lo.shape[0], -1, block).amin((0, 2)).tolist()
    hi = F.pad(hi, (0, pad), value=0).view(hi.shape[0], -1, block).amax((0, 2)).tolist()
    return [(slice(r, min(r + block, n)), slice(a, z))
            for r, a, z in zip(starts, lo, hi) if z > a]


def _block_mask(mask, rows: slice, cols: slice) -> torch.Tensor:
    """Bool ``[b or 1, rows, cols]`` of one block."""
    if isinstance(mask, Span):
        return Span(mask.q_index[rows], mask.q_start[:, rows], mask.k_index[cols],
                    mask.window).dense()
    return mask[:, rows, cols]


def _grouped(t: torch.Tensor, kv: int) -> torch.Tensor:
    """``[b, n, heads, x]`` → ``[b, n, kv, heads / kv, x]``: query head ``h`` reads kv head
    ``h // (heads / kv)``."""
    return t.view(*t.shape[:2], kv, t.shape[2] // kv, *t.shape[3:])


def _probabilities(q, k, mask, lse=None):
    """One block: scores ``[b, kv, rep, n, m]`` (fp32 or wider; query heads grouped by the kv
    head they read) turned into probabilities ``exp(scores - lse)``, and lse ``[b, n, heads]``
    (computed here when not given). Hidden scores are set to 0 before ``exp`` and their
    probabilities to 0 after it: a CPU's ``exp`` is many times slower on ``-inf`` (and on
    anything that underflows) than on ordinary numbers."""
    acc = torch.promote_types(q.dtype, torch.float32)
    b, n, h, d = q.shape
    kv = k.shape[2]
    scores = torch.einsum("bnkrd,bmkd->bkrnm", _grouped(q.to(acc), kv), k.to(acc)) * d ** -0.5
    hidden = ~mask[:, None, None]
    if lse is None:
        shift = scores.masked_fill_(hidden, float("-inf")).amax(-1, keepdim=True)
        shift.masked_fill_(torch.isinf(shift), 0.0)
    else:
        shift = _grouped(lse.masked_fill(torch.isinf(lse), 0.0), kv).permute(0, 2, 3, 1)[..., None]
    p = scores.sub_(shift).masked_fill_(hidden, 0.0).exp_().masked_fill_(hidden, 0.0)
    if lse is None:   # rows that see no key: p = 0 and lse = log 0 = -inf
        total = p.sum(-1, keepdim=True)
        p.div_(total.masked_fill(total == 0, 1.0))
        lse = (shift + total.log()).squeeze(-1).permute(0, 3, 1, 2).reshape(b, n, h)
    return p, lse


class _AttentionLSE(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, mask, block):
        b, n, h, d = q.shape
        kv = k.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_zeros(b, n, h, d, dtype=acc)
        lse = q.new_full((b, n, h), float("-inf"), dtype=acc)
        for rows, cols in _blocks(mask, n, k.shape[1], block):
            p, lse[:, rows] = _probabilities(q[:, rows], k[:, cols], _block_mask(mask, rows, cols))
            o = torch.einsum("bkrnm,bmkd->bnkrd", p, v[:, cols].to(acc))
            out[:, rows] = o.reshape(b, -1, h, d)
        return out.to(q.dtype), lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, ctx.block = inputs
        ctx.mask = mask if isinstance(mask, Span) else None
        ctx.save_for_backward(q, k, v, *output, *(() if ctx.mask else (mask,)))

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, out, lse, *stored = ctx.saved_tensors
        mask = ctx.mask or stored[0]
        acc = lse.dtype
        # d lse / d scores = p: the lse's gradient joins the softmax's row term
        row = (g_out.to(acc) * out.to(acc)).sum(-1) - (0 if g_lse is None else g_lse.to(acc))
        dq, dk, dv = lse_grads(q, k, v, mask, lse, g_out.to(acc), row, block=ctx.block)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def lse_grads(q, k, v, mask, lse, g_out, row, *, block: int | None = None):
    """The gradients of attention-with-LSE of ``q [b, n, heads, d]`` over the keys ``k``, ``v``
    ``[b, m, kv_heads, d]`` that ``mask`` (bool ``[b, n, m]`` or a ``Span``) allows, blockwise
    like ``reference_lse`` (default ``query_block``): ``dq [b, n, heads, d]``, ``dk``, ``dv``
    ``[b, m, kv_heads, d]`` in ``lse``'s dtype, from the probabilities ``exp(s − lse)``
    recomputed with ``lse [b, n, heads]`` and ``row [b, n, heads]`` = rowsum(g_out · out) − g_lse
    (``g_out`` in ``lse``'s dtype). When ``lse`` and ``out`` are those of attention over a larger
    key set that includes these keys (ring attention's merged ones), these are the parts of that
    attention's gradients that flow through these keys: dq sums over the key blocks."""
    acc = lse.dtype
    block = block or query_block(q.shape[0], q.shape[2], k.shape[1])
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    for rows, cols in _blocks(mask, q.shape[1], k.shape[1], block):
        dq[:, rows], dk_i, dv_i = _block_grads(q[:, rows], k[:, cols], v[:, cols],
                                               _block_mask(mask, rows, cols), lse[:, rows],
                                               g_out[:, rows], row[:, rows])
        dk[:, cols] += dk_i
        dv[:, cols] += dv_i
    return dq, dk, dv


def _block_grads(q, k, v, mask, lse, g_out, row):
    """One block's ``dq [b, n, heads, d]`` and its parts of ``dk``, ``dv`` ``[b, m, kv, d]`` (a kv
    head's gradient sums over the query heads that read it), from the probabilities recomputed
    with the forward's lse and ``row [b, n, heads]`` = rowsum(g_out · out) − g_lse."""
    b, n, h, d = q.shape
    kv = k.shape[2]
    p, _ = _probabilities(q, k, mask, lse)
    acc = p.dtype
    g = _grouped(g_out, kv)
    dv = torch.einsum("bkrnm,bnkrd->bmkd", p, g)
    dp = torch.einsum("bnkrd,bmkd->bkrnm", g, v.to(acc))
    ds = p.mul_(dp.sub_(_grouped(row, kv).permute(0, 2, 3, 1)[..., None])).mul_(d ** -0.5)
    dq = torch.einsum("bkrnm,bmkd->bnkrd", ds, k.to(acc)).reshape(b, n, h, d)
    return dq, torch.einsum("bkrnm,bnkrd->bmkd", ds, _grouped(q.to(acc), kv)), dv


def flex_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_lse`` on ``flex_attention`` (its log-sum-exp returned), compiled: CUDA (flex
    has no backward on a CPU; ``tests/test_context.py`` checks it where CUDA is present)."""
    from torch.nn.attention.flex_attention import create_block_mask
    b, n, h, d = q.shape
    m = k.shape[1]
    mask = mask.dense() if isinstance(mask, Span) else mask

    def allowed(batch, head, qi, ki):
        return mask[batch, qi, ki]
    block = create_block_mask(allowed, b, None, n, m, device=q.device)
    try:   # torch >= 2.9 spells it return_aux (return_lse is deprecated there)
        from torch.nn.attention.flex_attention import AuxRequest
        ask = {"return_aux": AuxRequest(lse=True)}
    except ImportError:
        ask = {"return_lse": True}
    out, aux = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                block_mask=block, enable_gqa=h != k.shape[2], **ask)
    lse = (aux.lse if hasattr(aux, "lse") else aux).float().transpose(1, 2)
    empty = ~mask.any(-1)[..., None]
    return out.transpose(1, 2).masked_fill(empty[..., None], 0.0), lse.masked_fill(
        empty, float("-inf"))


# name -> implementation returning (out, lse); "sdpa" (torch's fused SDPA) cannot.
LSE_BACKENDS: dict[str, Callable] = {"reference": reference_lse, "flex": flex_lse}


def choose_lse_backend(device: torch.device, backend: str = "auto") -> Callable:
    """The attention-with-LSE implementation: ``backend`` by name, or for "auto" flex on CUDA and
    the reference elsewhere. ValueError for a backend that cannot return its log-sum-exp."""
    if backend == "auto":
        backend = "flex" if torch.device(device).type == "cuda" else "reference"
    if backend not in LSE_BACKENDS:
        raise ValueError(f"attention backend {backend!r} cannot return the log-sum-exp ring "
                         f"attention merges by; choose one of {['auto', *LSE_BACKENDS]}")
    return LSE_BACKENDS[backend]


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    return choose_lse_backend(q.device, backend)(q, k, v, mask)


def merge_lse(out: torch.Tensor, lse: torch.Tensor, out_i: torch.Tensor, lse_i: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each: outputs
    ``[b, n, heads, d]`` (accumulated in ``out``'s dtype) weighted by ``exp(lse_x - lse)``, lse
    ``[b, n, heads]`` the log of the summed denominators. ``lse`` must be finite (each query row
    sees a key in the first set); ``lse_i`` may be ``-inf``."""
    new = torch.logaddexp(lse, lse_i)
    w, w_i = torch.exp(lse - new)[..., None], torch.exp(lse_i - new)[..., None]
    return out * w + out_i.to(out.dtype) * w_i, new
