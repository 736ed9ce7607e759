"""Causal attention over packed documents: one pure op, several implementations.

The op: ``attention(q, k, v, cu_seqlens=None)`` with

- ``q`` ``[batch, seq, heads, head_dim]``, ``k`` and ``v`` ``[batch, seq, kv_heads, head_dim]``
  (grouped-query attention: ``heads`` is a multiple of ``kv_heads``; query head ``h`` reads kv head
  ``h // (heads // kv_heads)``);
- ``cu_seqlens`` ``None`` (every row is one causal sequence) or int ``[n_docs + 1]``: document
  boundaries over the ``batch * seq`` tokens taken in row-major order, starting at 0 and ending at
  ``batch * seq``. A token attends only to earlier tokens of its own document.

Returns ``[batch, seq, heads, head_dim]`` in q's dtype. ``reference`` is the definition (fp32-exact
on CPU); faster backends plug in through ``BACKENDS`` and are tested against it.
"""
from __future__ import annotations

import functools
from typing import Callable

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


def document_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Boolean ``[total, total]``: True where query i may attend key j (same document, j <= i)."""
    seg = segment_ids(cu_seqlens, total)
    idx = torch.arange(total, device=cu_seqlens.device)
    return (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with a causal (or block-diagonal causal) mask. Runs everywhere, with gradients."""
    b, s, h, d = q.shape
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=h != k.shape[2])
        return out.transpose(1, 2)
    total = b * s
    mask = document_causal_mask(cu_seqlens, total)
    qf, kf, vf = (t.reshape(1, total, t.shape[2], d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, enable_gqa=h != k.shape[2])
    return out.transpose(1, 2).reshape(b, s, h, d)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         cu_seqlens: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
    """``flex_attention`` with a document-causal block mask: blocks wholly outside a document are
    skipped, so the cost follows the documents' lengths, not the row's. Compiled (its only fast
    form); forward and backward on CUDA, forward only on a CPU. ``cache`` keeps the block mask
    between the layers of one forward pass."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    b, s, h, d = q.shape
    total = b * s
    key = ("flex_mask", total, q.device)
    if cache is not None and key in cache:
        mask = cache[key]
    else:
        seg = segment_ids(cu_seqlens, total) if cu_seqlens is not None else \
            torch.arange(b, device=q.device).repeat_interleave(s)

        def document_causal(batch, head, qi, ki):
            return (seg[qi] == seg[ki]) & (ki <= qi)
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
              cu_seqlens: torch.Tensor | None = None, *, backend: str = "auto",
              cache: dict | None = None) -> torch.Tensor:
    fn = choose_backend(q, backend)
    return fn(q, k, v, cu_seqlens) if fn is reference else fn(q, k, v, cu_seqlens, cache=cache)


def attention_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Attention of ``q [batch, n, heads, d]`` over ``k``, ``v`` ``[batch, m, kv_heads, d]`` where
    ``mask [batch, 1, n, m]`` bool allows it (decoding with a KV cache: new queries against every
    cached key). A query row with no allowed key returns zeros."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).nan_to_num(0.0)
