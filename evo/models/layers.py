"""Pure building blocks of a decoder-only transformer. Weights are passed in; nothing is stored.

Weight matrices are stored ``[in, out]`` and applied as ``x @ w`` (the JAX convention), so the first
logical axis of a weight is always its input dimension.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 (fp64 for fp64 inputs), returned in x's dtype. ``x [..., d]``,
    ``weight [d]``."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: "dict | None" = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` fp32, with LLaMA-3 frequency scaling when given.

    ``scaling``: ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings`` (the LLaMA-3.1 rule: long wavelengths divided by
    ``factor``, short ones kept, a smooth blend between).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions [batch, seq]`` → cos, sin ``[batch, seq, 1, head_dim]`` (halves repeated)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (as HF LLaMA). ``x [batch, seq, heads, head_dim]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def swiglu_act(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU activation ``silu(gate) * up``; the MLP is ``swiglu_act(x w1, x w3) w2`` (w1 the
    gate, w3 the up projection, w2 the down projection)."""
    return F.silu(gate) * up


def cross_entropy_tokens(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                         ) -> torch.Tensor:
    """Cross-entropy of every token, in fp32 or wider, 0 where the label is ``ignore_index``:
    ``[N]`` for ``logits [..., vocab]`` (any float dtype) and ``labels [...]`` (N elements)."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat if flat.dtype == torch.float64 else flat.float()
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="none")


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy, in fp32 or wider, over labelled tokens and how many there were (0-dim
    tensors). ``logits [..., vocab]`` any float dtype, ``labels [...]``; ``ignore_index`` ignored."""
    return (cross_entropy_tokens(logits, labels, ignore_index).sum(),
            (labels != ignore_index).sum())


class Regions:
    """Where a model's computation may be split, as seen from one device: every hook is the
    identity here.

    A model marks the places a parallel layout needs to act, and nothing more: ``block`` fetches
    the weights of one of the family's blocks (``evo.models.family.Block``; a sharded-parameter
    layout gathers them there, and may prefetch the next block's), ``embed`` looks up
    token embeddings, ``enter`` is where replicated activations enter a region whose weights are
    split on their output dimension, ``exit`` is where partial sums leave it, ``inside`` marks a
    replicated weight applied within such a region (its gradient there is a partial sum), and
    ``cross_entropy`` is the per-token loss over the output, ``experts`` runs a mixture-of-experts
    layer's experts on its routed tokens. The sharding planner supplies another
    ``Regions`` with collectives in these places; the model never learns about ranks or meshes.
    """
    checkpoint_layers = False   # a layout that gathers weights per block recomputes each layer

    def block(self, params: dict[str, torch.Tensor], block) -> dict[str, torch.Tensor]:
        """``{name: weight}`` for every parameter ``block`` reads."""
        return {k: params[k] for k in block.params}

    def embed(self, tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, weight)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inside(self, w: torch.Tensor) -> torch.Tensor:
        """A replicated weight applied inside a region, to this rank's share of its split
        dimension (e.g. a per-head norm weight shared by all heads): each rank's gradient of it
        is a partial sum that a parallel layout completes here."""
        return w

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_tokens(logits, labels)

    def attention(self, attend, positions: torch.Tensor):
        """The attention one forward pass uses, given the one it would use alone (``attend(layer,
        q, k, v, window=None)``) and the tokens' positions ``[batch, seq]``: a layout that splits
        the sequence returns one that sees the whole sequence."""
        return attend

    def experts(self, x_sorted: torch.Tensor, counts: torch.Tensor, fn) -> torch.Tensor:
        """A mixture-of-experts layer's expert computation. ``x_sorted [M, D]``: the routed token
        copies sorted by global expert id; ``counts [E]`` int64: rows per expert (sum M);
        ``fn(x, counts_local) -> y``: the experts whose weights this rank holds, run on rows
        grouped by those experts. Returns ``y [M, ...]`` in ``x_sorted``'s order. Here every
        expert is local: ``fn(x_sorted, counts)``; an expert-parallel layout dispatches the rows
        to the ranks holding their experts and combines the results around ``fn``."""
        return fn(x_sorted, counts)


LOCAL = Regions()


class Ops(NamedTuple):
    """The elementwise ops a layer uses: torch's, or the fused Triton kernels (same results)."""
    rms_norm: object
    apply_rope: object
    swiglu_act: object


def ops(kernels: str = "torch") -> Ops:
    """``"torch"``: the reference ops above; ``"triton"``: ``evo_kernels.triton_ops`` (on CUDA, or
    on CPU tensors under Triton's interpreter)."""
    if kernels == "torch":
        return Ops(rms_norm, apply_rope, swiglu_act)
    if kernels == "triton":
        from evo_kernels import triton_ops
        return Ops(triton_ops.rms_norm, triton_ops.apply_rope, triton_ops.swiglu_act)
    raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
