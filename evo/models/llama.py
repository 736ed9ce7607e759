"""LLaMA 2 / 3 and InternLM2 as pure functions over a flat dict of tensors.

One model file covers them all: LLaMA 2 and 3 (grouped-query attention, ``rope_theta``, LLaMA-3
rope scaling, tied or untied embeddings) and InternLM2, whose checkpoints keep exactly evo's own
layout: the attention input projection packed as ``wqkv`` and grouped by kv head (for kv head g: its
``heads // kv_heads`` query heads, then its key, then its value — so splitting ``wqkv`` evenly over
tensor-parallel ranks hands each rank whole groups), and the MLP as ``w1`` (gate), ``w3`` (up),
``w2`` (down).

Parameters (weights stored ``[in, out]``, logical axes in brackets)::

    embed                  [vocab, hidden]              ("vocab", "embed")
    layers.{i}.attn_norm   [hidden]                     ("norm",)
    layers.{i}.attn.wqkv   [hidden, (H + 2·KV)·D]       ("embed", "qkv")
    layers.{i}.attn.wo     [H·D, hidden]                ("heads", "embed")
    layers.{i}.mlp_norm    [hidden]                     ("norm",)
    layers.{i}.mlp.w1, w3  [hidden, ffn]                ("embed", "mlp")
    layers.{i}.mlp.w2      [ffn, hidden]                ("mlp", "embed")
    norm                   [hidden]                     ("norm",)
    lm_head                [hidden, vocab]              ("embed", "vocab")   absent when tied

``param_specs`` is the one table of names, shapes and axes; ``init``, ``axes``, the HF name map
below and (later) the sharding planner all read it.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import evo_kernels
from evo_kernels.attention import positions_from_cu_seqlens
from evo.models.layers import (LOCAL, Regions, apply_rope, rms_norm, rope_cos_sin, rope_inv_freq,
                               swiglu_act)


def _positive_int(obj, name: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 rope frequency scaling (HF ``rope_type: "llama3"``)."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if not self.factor >= 1.0:
            raise ValueError(f"RopeScaling.factor must be >= 1, got {self.factor!r}")
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError("RopeScaling needs high_freq_factor > low_freq_factor > 0, got "
                             f"high_freq_factor={self.high_freq_factor!r}, "
                             f"low_freq_factor={self.low_freq_factor!r}")
        _positive_int(self, "original_max_position_embeddings")


@dataclass(frozen=True)
class Config:
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None      # None: equal to num_heads (multi-head attention)
    intermediate_size: int = 11008
    head_dim: int | None = None          # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    max_seq_len: int = 4096              # longest sequence generation may run to

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_seq_len"):
            _positive_int(self, name)
        if self.num_kv_heads is not None:
            _positive_int(self, "num_kv_heads")
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"Config.num_kv_heads={self.num_kv_heads} must divide "
                                 f"num_heads={self.num_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"Config.num_heads={self.num_heads} must divide "
                             f"hidden_size={self.hidden_size} (or set head_dim)")
        if self.head_dim is not None:
            _positive_int(self, "head_dim")
        if self.dim_per_head % 2:
            raise ValueError(f"Config.head_dim: the head dim {self.dim_per_head} must be even for "
                             "rotary embeddings")
        if not self.rope_theta > 0:
            raise ValueError(f"Config.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"Config.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.init_std > 0:
            raise ValueError(f"Config.init_std must be > 0, got {self.init_std!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError("Config.rope_scaling must be a RopeScaling or None, got "
                             f"{self.rope_scaling!r}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.kv_heads


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str          # "normal", "normal_out" (std scaled by 1/sqrt(2·layers)) or "ones"


def param_specs(cfg: Config) -> dict[str, ParamSpec]:
    """Every parameter's shape, logical axes and initialiser, in creation order."""
    h, d, v, ffn = cfg.hidden_size, cfg.dim_per_head, cfg.vocab_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.kv_heads) * d
    specs = {"embed": ParamSpec((v, h), ("vocab", "embed"), "normal")}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        specs[p + "attn_norm"] = ParamSpec((h,), ("norm",), "ones")
        specs[p + "attn.wqkv"] = ParamSpec((h, qkv), ("embed", "qkv"), "normal")
        specs[p + "attn.wo"] = ParamSpec((cfg.num_heads * d, h), ("heads", "embed"), "normal_out")
        specs[p + "mlp_norm"] = ParamSpec((h,), ("norm",), "ones")
        specs[p + "mlp.w1"] = ParamSpec((h, ffn), ("embed", "mlp"), "normal")
        specs[p + "mlp.w3"] = ParamSpec((h, ffn), ("embed", "mlp"), "normal")
        specs[p + "mlp.w2"] = ParamSpec((ffn, h), ("mlp", "embed"), "normal_out")
    specs["norm"] = ParamSpec((h,), ("norm",), "ones")
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((h, v), ("embed", "vocab"), "normal")
    return specs


def axes(cfg: Config) -> dict[str, tuple[str, ...]]:
    """Logical axis names per dimension, keyed like ``init``'s params."""
    return {k: s.axes for k, s in param_specs(cfg).items()}


def init_param(cfg: Config, name: str, seed: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """One parameter, drawn from its own generator seeded by (seed, name): the value of a parameter
    does not depend on which other parameters are created, or where."""
    spec = param_specs(cfg)[name]
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype, device=device)
    std = cfg.init_std / (math.sqrt(2 * cfg.num_layers) if spec.init == "normal_out" else 1.0)
    if torch.device(device or "cpu").type == "meta":
        return torch.empty(spec.shape, dtype=dtype, device="meta")
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(spec.shape, generator=gen, dtype=torch.float32).mul_(std).to(dtype=dtype,
                                                                                  device=device)


def init(cfg: Config, seed: int = 0, *, dtype: torch.dtype = torch.float32,
         device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Fresh parameters: normal(0, init_std) matrices, output projections (``wo``, ``w2``) scaled by
    1/sqrt(2·num_layers), norm weights 1. ``device="meta"`` allocates nothing."""
    return {name: init_param(cfg, name, seed, dtype=dtype, device=device) for name in param_specs(cfg)}


def check_inputs(cfg: Config, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None) -> None:
    """Raise ValueError naming the culprit for token ids outside the vocabulary, malformed
    ``cu_seqlens`` or mismatched shapes. Reads values, so it runs outside of transforms."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    if positions is not None and positions.shape != tokens.shape:
        raise ValueError(f"positions shape {tuple(positions.shape)} differs from tokens shape "
                         f"{tuple(tokens.shape)}")
    if cu_seqlens is not None:
        total = tokens.numel()
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape "
                             f"{tuple(cu_seqlens.shape)}")
        c = cu_seqlens.tolist()
        if c[0] != 0 or c[-1] != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at batch*seq={total}, got "
                             f"{c[0]} ... {c[-1]}")
        if any(b < a for a, b in zip(c, c[1:])):
            i = next(i for i, (a, b) in enumerate(zip(c, c[1:])) if b < a)
            raise ValueError(f"cu_seqlens must be non-decreasing, but cu_seqlens[{i + 1}]={c[i + 1]} "
                             f"< cu_seqlens[{i}]={c[i]}")


def is_concrete(t: torch.Tensor) -> bool:
    """False while a torch.func transform or torch.compile traces (values are not readable)."""
    return not (torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t))


class Ops(NamedTuple):
    """The elementwise ops a layer uses: torch's, or the fused Triton kernels (same results)."""
    rms_norm: object
    apply_rope: object
    swiglu_act: object


def ops(kernels: str = "torch") -> Ops:
    """``"torch"``: the reference ops of ``layers``; ``"triton"``: ``evo_kernels.triton_ops`` (on
    CUDA, or on CPU tensors under Triton's interpreter)."""
    if kernels == "torch":
        return Ops(rms_norm, apply_rope, swiglu_act)
    if kernels == "triton":
        from evo_kernels import triton_ops
        return Ops(triton_ops.rms_norm, triton_ops.apply_rope, triton_ops.swiglu_act)
    raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")


class _Attend:
    """Attention of layer ``i`` over packed documents (training and evaluation)."""

    def __init__(self, cu_seqlens: torch.Tensor | None, backend: str):
        self.cu_seqlens, self.backend = cu_seqlens, backend
        self.cache: dict = {}   # what a backend prepares once per forward (a block mask)

    def __call__(self, i: int, q, k, v):
        return evo_kernels.attention(q, k, v, self.cu_seqlens, backend=self.backend,
                                     cache=self.cache)


def _layer(cfg: Config, params: dict[str, torch.Tensor], i: int, x: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor, attend, regions: Regions,
           op: Ops | None = None) -> torch.Tensor:
    """One decoder layer. ``x [batch, seq, hidden]`` (the sequence may be split by ``regions``);
    head counts come from the weights' shapes, so a layer runs on a slice of the heads as well.
    ``attend(i, q, k, v)``: the attention of layer ``i`` (``_Attend``, or a KV cache's); ``op``:
    the elementwise ops (default torch's)."""
    op = op or _TORCH_OPS
    p = regions.layer(params, f"layers.{i}.")
    r, d = cfg.q_per_kv, cfg.dim_per_head
    h = regions.enter(op.rms_norm(x, p["attn_norm"], cfg.norm_eps))
    b, s, _ = h.shape
    qkv = (h @ p["attn.wqkv"]).view(b, s, -1, r + 2, d)
    q = qkv[:, :, :, :r].flatten(2, 3)
    k, v = qkv[:, :, :, r], qkv[:, :, :, r + 1]
    q, k = op.apply_rope(q, cos, sin), op.apply_rope(k, cos, sin)
    o = attend(i, q, k, v)
    x = x + regions.exit(o.flatten(2) @ p["attn.wo"])
    h = regions.enter(op.rms_norm(x, p["mlp_norm"], cfg.norm_eps))
    mlp = op.swiglu_act(h @ p["mlp.w1"], h @ p["mlp.w3"]) @ p["mlp.w2"]
    return x + regions.exit(mlp)


def layer_params(params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return LOCAL.layer(params, f"layers.{i}.")


def hidden_states(cfg: Config, params: dict[str, torch.Tensor], tokens: torch.Tensor,
                  positions: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, *,
                  remat: float = 0.0, attention: str = "auto",
                  regions: Regions = LOCAL, kernels: str = "torch") -> torch.Tensor:
    """The final-norm output ``[batch, seq, hidden]`` in the params' dtype; see ``apply``."""
    op = ops(kernels)
    if is_concrete(tokens):
        check_inputs(cfg, tokens, positions, cu_seqlens)
    b, s = tokens.shape
    if positions is None:
        if cu_seqlens is None:
            positions = torch.arange(s, device=tokens.device).expand(b, s)
        else:
            positions = positions_from_cu_seqlens(cu_seqlens, b * s).view(b, s)
    x = regions.embed(tokens, regions.param(params, "embed"))
    scaling = dataclasses.asdict(cfg.rope_scaling) if cfg.rope_scaling else None
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, scaling),
                            x.dtype)
    n_remat = cfg.num_layers if regions.checkpoint_layers else math.floor(remat * cfg.num_layers)
    if not torch.compiler.is_compiling() and (
            torch._C._functorch.is_functorch_wrapped_tensor(tokens)
            or torch._C._functorch.is_functorch_wrapped_tensor(params["norm"])):
        n_remat = 0  # torch.func transforms reject checkpoint's saved-tensor hooks: store instead
    attend = _Attend(cu_seqlens, attention)
    for i in range(cfg.num_layers):
        args = (cfg, params, i, x, cos, sin, attend, regions, op)
        x = checkpoint(_layer, *args, use_reentrant=False) if i < n_remat else _layer(*args)
    return op.rms_norm(x, regions.param(params, "norm"), cfg.norm_eps)


def output_weight(cfg: Config, params: dict[str, torch.Tensor], regions: Regions = LOCAL
                  ) -> torch.Tensor:
    """The ``[hidden, vocab]`` output projection (the embedding's transpose when tied)."""
    return regions.param(params, "embed").t() if cfg.tie_embeddings else \
        regions.param(params, "lm_head")


def apply(cfg: Config, params: dict[str, torch.Tensor], tokens: torch.Tensor,
          positions: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, *,
          remat: float = 0.0, attention: str = "auto", regions: Regions = LOCAL,
          kernels: str = "torch") -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` in the params' dtype.

    ``tokens`` int ``[batch, seq]``. ``positions`` int ``[batch, seq]``: rotary positions; by default
    ``0..seq-1`` per row, or restarting at every document when ``cu_seqlens`` is given.
    ``cu_seqlens`` int ``[n_docs + 1]``: document boundaries over the ``batch * seq`` tokens in
    row-major order; attention never crosses them. ``remat``: the fraction of layers (the first
    ``floor(remat · num_layers)``) whose activations are recomputed in backward instead of stored.
    ``attention``: an ``evo_kernels.attention`` backend name, or "auto". ``regions``: the parallel
    layout's hooks (``evo.models.layers.Regions``); under tensor parallelism the logits come back
    split on the vocabulary. ``kernels``: "torch" or "triton" elementwise ops (``ops``).
    """
    x = hidden_states(cfg, params, tokens, positions, cu_seqlens, remat=remat, attention=attention,
                      regions=regions, kernels=kernels)
    return regions.enter(x) @ output_weight(cfg, params, regions)


# ---------------------------------------------------------------------------------------------
# Incremental decoding with a key/value cache.

class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far: ``k``, ``v`` ``[layers, batch, capacity,
    kv_heads, head_dim]``, of which the first ``length`` slots are written; ``valid [batch,
    capacity]`` bool marks the slots holding real tokens (False for a shorter prompt's padding)."""
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    length: int


def init_cache(cfg: Config, batch: int, capacity: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> KVCache:
    shape = (cfg.num_layers, batch, capacity, cfg.kv_heads, cfg.dim_per_head)
    return KVCache(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, capacity, dtype=torch.bool, device=device), 0)


_TORCH_OPS = ops("torch")


class _CachedAttend:
    """Writes each layer's new keys and values into the cache at ``start`` and attends over
    everything written so far: causal, and only to valid slots."""

    def __init__(self, cache: KVCache, start: int, n: int):
        self.cache, self.start, self.end = cache, start, start + n
        q_idx = torch.arange(start, start + n, device=cache.k.device)
        k_idx = torch.arange(self.end, device=cache.k.device)
        causal = k_idx[None, :] <= q_idx[:, None]                          # [n, end]
        self.mask = causal[None, None] & cache.valid[:, None, None, :self.end]   # [b, 1, n, end]

    def __call__(self, i: int, q, k, v):
        c = self.cache
        c.k[i, :, self.start:self.end] = k
        c.v[i, :, self.start:self.end] = v
        return evo_kernels.attention_with_mask(q, c.k[i, :, :self.end], c.v[i, :, :self.end],
                                               self.mask)


@torch.no_grad()
def decode(cfg: Config, params: dict[str, torch.Tensor], tokens: torch.Tensor, cache: KVCache,
           *, positions: torch.Tensor | None = None, valid: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, KVCache]:
    """Logits ``[batch, n, vocab]`` of ``tokens [batch, n]`` following the cached ones, and the
    cache holding them too. The cache is donated: its tensors are written in place.

    ``positions`` (default: continuing from ``cache.length``) are the rotary positions; ``valid``
    ``[batch, n]`` bool (default all True) marks which of the new tokens are real, so prompts of
    different lengths can be left-padded into one batch. Equal to ``apply`` on the whole sequence
    (fp32 to rounding).
    """
    if is_concrete(tokens):
        check_inputs(cfg, tokens, positions)
    b, n = tokens.shape
    start = cache.length
    if start + n > cache.k.shape[2]:
        raise ValueError(f"the KV cache holds {cache.k.shape[2]} tokens; {start} are written and "
                         f"{n} more do not fit")
    if positions is None:
        positions = torch.arange(start, start + n, device=tokens.device).expand(b, n)
    cache.valid[:, start:start + n] = True if valid is None else valid
    x = F.embedding(tokens, params["embed"])
    scaling = dataclasses.asdict(cfg.rope_scaling) if cfg.rope_scaling else None
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, scaling),
                            x.dtype)
    attend = _CachedAttend(cache, start, n)
    for i in range(cfg.num_layers):
        x = _layer(cfg, params, i, x, cos, sin, attend, LOCAL)
    x = rms_norm(x, params["norm"], cfg.norm_eps)
    return x @ output_weight(cfg, params), cache._replace(length=start + n)


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts of other code bases. Each maps evo's names and [in, out] matrices to theirs;
# the names come from `param_specs`, so the maps cannot drift from the model.

def _split_wqkv(cfg: Config, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """evo ``wqkv [hidden, (H + 2KV)·D]`` → q ``[hidden, H·D]``, k, v ``[hidden, KV·D]``."""
    kv, r, d = cfg.kv_heads, cfg.q_per_kv, cfg.dim_per_head
    g = w.reshape(w.shape[0], kv, r + 2, d)
    return (g[:, :, :r].reshape(w.shape[0], -1), g[:, :, r].reshape(w.shape[0], -1),
            g[:, :, r + 1].reshape(w.shape[0], -1))


def _join_wqkv(cfg: Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    kv, r, d = cfg.kv_heads, cfg.q_per_kv, cfg.dim_per_head
    h = q.shape[0]
    return torch.cat([q.reshape(h, kv, r, d), k.reshape(h, kv, 1, d), v.reshape(h, kv, 1, d)],
                     dim=2).reshape(h, -1)


# evo name suffix -> (HF LLaMA name, InternLM2 name), for the per-layer tensors kept one-to-one.
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", "attention_norm.weight"),
    "attn.wo": ("self_attn.o_proj.weight", "attention.wo.weight"),
    "mlp_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "mlp.w1": ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    "mlp.w3": ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    "mlp.w2": ("mlp.down_proj.weight", "feed_forward.w2.weight"),
}
_TOP_NAMES = {
    "embed": ("model.embed_tokens.weight", "model.tok_embeddings.weight"),
    "norm": ("model.norm.weight", "model.norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
}
LAYOUTS = ("hf", "internlm2")


def _external_name(name: str, layout: str) -> str:
    col = LAYOUTS.index(layout)
    if name in _TOP_NAMES:
        return _TOP_NAMES[name][col]
    _, i, rest = name.split(".", 2)
    inner = "self_attn" if layout == "hf" else "attention"
    if rest == "attn.wqkv":
        return f"model.layers.{i}.{inner}.wqkv.weight"  # only used by internlm2
    return f"model.layers.{i}.{_LAYER_NAMES[rest][col]}"


def export_params(cfg: Config, params: dict[str, torch.Tensor], layout: str = "hf"
                  ) -> dict[str, torch.Tensor]:
    """evo params → another layout's state dict (torch ``[out, in]`` matrices, their names).
    ``layout``: "hf" (transformers LlamaForCausalLM) or "internlm2"."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = {}
    for name, spec in param_specs(cfg).items():
        w = params[name]
        if name.endswith("attn.wqkv") and layout == "hf":
            i = name.split(".")[1]
            for part, t in zip("qkv", _split_wqkv(cfg, w)):
                out[f"model.layers.{i}.self_attn.{part}_proj.weight"] = t.t().contiguous()
            continue
        out[_external_name(name, layout)] = (w.t() if len(spec.shape) == 2 and name != "embed"
                                             else w).contiguous()
    return out


def import_params(cfg: Config, state: dict[str, torch.Tensor], layout: str = "hf", *,
                  source: str = "state dict") -> dict[str, torch.Tensor]:
    """Another layout's state dict → evo params, checking every name and shape. Raises ValueError
    naming ``source`` and the offending tensor. Extra tensors (e.g. rotary buffers) are ignored."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")

    def get(ext: str, shape: tuple[int, ...]) -> torch.Tensor:
        if ext not in state:
            raise ValueError(f"{source}: tensor {ext!r} is missing")
        t = state[ext]
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}: tensor {ext!r} has shape {tuple(t.shape)}, the config "
                             f"expects {shape}")
        return t

    params = {}
    for name, spec in param_specs(cfg).items():
        transposed = len(spec.shape) == 2 and name != "embed"
        ext_shape = tuple(reversed(spec.shape)) if transposed else spec.shape
        if name.endswith("attn.wqkv") and layout == "hf":
            i = name.split(".")[1]
            h, d = cfg.hidden_size, cfg.dim_per_head
            q, k, v = (get(f"model.layers.{i}.self_attn.{p}_proj.weight", (n * d, h)).t()
                       for p, n in (("q", cfg.num_heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)))
            params[name] = _join_wqkv(cfg, q, k, v).contiguous()
            continue
        t = get(_external_name(name, layout), ext_shape)
        params[name] = (t.t() if transposed else t).contiguous()
    return params
