"""The model-family contract, the registry, and the generic entry points that run any family.

A family is a subclass of ``Family`` registered under its name. It supplies, as pure functions of
its frozen ``Config``:

- ``param_specs(cfg)``: the one table of parameter names, shapes, logical axes and initialisers;
- ``blocks(cfg)``: the parameters grouped into the ``Block``\\ s run in sequence — an ``"embed"``
  block, the ``"layer"`` blocks, a ``"head"`` block. A block is what ZeRO-3 gathers (and
  prefetches one ahead), what recomputation wraps and what a pipeline stage will own;
- ``embed`` / ``block`` / ``head``: the computation of each kind of block, calling the parallel
  region hooks (``layers.Regions``); ``context`` prepares what every block of one forward shares
  (rotary tables, the attention of the pass). Training and KV-cache decoding run the same
  ``block``; only the attention handed in differs (``Attend`` or ``CachedAttend``);
- ``output_param`` / ``embedding_param`` / ``tp_divisors``: what a parallel layout needs to know
  about the vocabulary and the dimensions tensor parallelism splits;
- ``flops_per_token``; the HF mapping: architecture names, ``config_to_hf`` /
  ``config_from_hf``, ``to_hf`` / ``from_hf`` (tensor names and layouts, both directions).

A config names its family with the class attribute ``family``; ``family_of(cfg)`` finds it in the
registry. Everything outside ``evo.models`` goes through the functions below and never names a
parameter.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

import evo_kernels
from evo_kernels.attention import positions_from_cu_seqlens
from evo.models.layers import LOCAL, Regions, ops


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str          # "normal", "normal_out" (std scaled by 1/sqrt(2·layers)), "ones" or "zeros"


@dataclass(frozen=True)
class Block:
    """One unit of the forward pass: ``kind`` is "embed", "layer" or "head"; ``params`` the
    parameters it reads (a tied head reads the embedding too); ``enters`` / ``exits`` how many
    times one forward of it calls ``regions.enter`` / ``regions.exit`` (the embedding lookup of a
    vocabulary-split embedding counts as one exit) — the planner's communication model counts
    them. A layer ends in an exit, which recomputation skips (backward does not need it).
    ``inside``: the parameters it passes through ``regions.inside`` (replicated weights applied
    to a split dimension, whose gradients a tensor-parallel layout sums in backward)."""
    name: str
    kind: str
    params: tuple[str, ...]
    enters: int = 0
    exits: int = 0
    inside: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ("embed", "layer", "head"):
            raise ValueError(f"Block.kind must be 'embed', 'layer' or 'head', got {self.kind!r}")


class Family:
    """Base of every family; subclasses set ``name``, ``config`` and implement the methods that
    raise NotImplementedError. Instances hold no state: every method is a pure function of its
    arguments."""
    name: ClassVar[str] = ""
    config: ClassVar[type] = object
    hf_architectures: ClassVar[tuple[str, ...]] = ()   # config.json "architectures" it reads
    hf_model_type: ClassVar[str | None] = None         # config.json "model_type" it writes
    shape_fields: ClassVar[tuple[str, ...]] = ()       # config fields that decide param shapes

    # -- parameters and blocks
    def param_specs(self, cfg) -> dict[str, ParamSpec]:
        raise NotImplementedError

    def blocks(self, cfg) -> list[Block]:
        raise NotImplementedError

    def embedding_param(self, cfg) -> str:
        """The ``[vocab, hidden]`` token embedding."""
        raise NotImplementedError

    def output_param(self, cfg) -> tuple[str, int]:
        """The output projection's parameter and its vocabulary dimension (the embedding and 0
        when tied)."""
        raise NotImplementedError

    def tp_divisors(self, cfg) -> dict[str, int]:
        """``{"model.FIELD": size}`` for every size tensor parallelism splits."""
        raise NotImplementedError

    # -- computation
    def context(self, cfg, positions: torch.Tensor, dtype: torch.dtype, attend, op):
        raise NotImplementedError

    def embed(self, cfg, p: dict[str, torch.Tensor], tokens: torch.Tensor, ctx,
              regions: Regions) -> torch.Tensor:
        raise NotImplementedError

    def block(self, cfg, p: dict[str, torch.Tensor], layer: int, x: torch.Tensor, ctx,
              regions: Regions) -> torch.Tensor:
        raise NotImplementedError

    def head(self, cfg, p: dict[str, torch.Tensor], x: torch.Tensor, ctx,
             regions: Regions) -> torch.Tensor:
        raise NotImplementedError

    def check_inputs(self, cfg, tokens, positions=None, cu_seqlens=None) -> None:
        check_tokens(cfg.vocab_size, tokens, positions, cu_seqlens)

    def cache_shape(self, cfg) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of the KV cache."""
        raise NotImplementedError

    # -- accounting
    def non_embedding_params(self, cfg) -> int:
        """Parameters the FLOPs formula counts: all but the input embedding (the output
        projection counts, tied or not)."""
        specs = self.param_specs(cfg)
        emb = self.embedding_param(cfg)
        n = sum(math.prod(s.shape) for k, s in specs.items() if k != emb)
        out, _ = self.output_param(cfg)
        return n + (math.prod(specs[emb].shape) if out == emb else 0)

    def flops_per_token(self, cfg, seq_len: int) -> float:
        raise NotImplementedError

    # -- configs (checkpoints) and HF
    def config_to_dict(self, cfg) -> dict:
        return dataclasses.asdict(cfg)

    def config_from_dict(self, d: dict):
        return self.config(**d)

    def config_to_hf(self, cfg, *, dtype_name: str) -> dict:
        raise NotImplementedError

    def config_from_hf(self, d: dict, *, source: str):
        raise NotImplementedError

    def to_hf(self, cfg, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def from_hf(self, cfg, state: dict[str, torch.Tensor], *, source: str
                ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def hf_read_names(self, cfg, present: set[str]) -> dict[str, torch.Tensor]:
        """The HF tensors ``from_hf`` reads, as meta tensors of their shapes, given the names
        ``present`` in the files (a family reading several layouts picks by them)."""
        return self.to_hf(cfg, init(cfg, device="meta"))

    def with_routing(self, ctx, routing):
        """``ctx`` recording into ``routing`` (``evo.models.moe.Routing``): MoE families only."""
        raise ValueError(f"the {self.name!r} family has no routed (mixture-of-experts) layers")


# ---------------------------------------------------------------------------------------------
# The registry

_FAMILIES: dict[str, Family] = {}
UNRECORDED_FAMILY = "llama"   # the family of checkpoints written before families were recorded


def register(family: Family) -> Family:
    """Make ``family`` available under ``family.name`` (registering the same class again, e.g.
    when an experiment file is loaded twice, replaces it)."""
    if not family.name or not isinstance(family.name, str):
        raise ValueError(f"{type(family).__name__}.name must be a non-empty string")
    if getattr(family.config, "family", None) != family.name:
        raise ValueError(f"{type(family).__name__}: its config class "
                         f"{family.config.__qualname__} must set family = {family.name!r}")
    old = _FAMILIES.get(family.name)
    if old is not None and type(old).__qualname__ != type(family).__qualname__:
        raise ValueError(f"model family {family.name!r} is already registered by "
                         f"{type(old).__qualname__}")
    _FAMILIES[family.name] = family
    return family


def names() -> list[str]:
    return sorted(_FAMILIES)


def get(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"model family {name!r} is not registered (known: "
                         f"{', '.join(names())})") from None


def family_of(cfg) -> Family:
    """The family of a config (its class attribute ``family``); ValueError for anything else."""
    name = getattr(type(cfg), "family", None)
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ValueError(f"{type(cfg).__qualname__} is not the config of a registered model "
                         f"family (known: {', '.join(names())})")
    fam = _FAMILIES[name]
    if not isinstance(cfg, fam.config):
        raise ValueError(f"{type(cfg).__qualname__} says family {name!r}, whose config is "
                         f"{fam.config.__qualname__}")
    return fam


def for_architecture(arch: str) -> Family | None:
    for fam in _FAMILIES.values():
        if arch in fam.hf_architectures:
            return fam
    return None


def hf_architectures() -> list[str]:
    return sorted(a for f in _FAMILIES.values() for a in f.hf_architectures)


# ---------------------------------------------------------------------------------------------
# Generic entry points: any registered family

def param_specs(cfg) -> dict[str, ParamSpec]:
    return family_of(cfg).param_specs(cfg)


def axes(cfg) -> dict[str, tuple[str, ...]]:
    """Logical axis names per dimension, keyed like ``init``'s params."""
    return {k: s.axes for k, s in param_specs(cfg).items()}


def blocks(cfg) -> list[Block]:
    return family_of(cfg).blocks(cfg)


def num_params(cfg) -> int:
    return sum(math.prod(s.shape) for s in param_specs(cfg).values())


def flops_per_token(cfg, seq_len: int) -> float:
    return family_of(cfg).flops_per_token(cfg, seq_len)


def init_param(cfg, name: str, seed: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """One parameter, drawn from its own generator seeded by (seed, name): the value of a parameter
    does not depend on which other parameters are created, or where."""
    fam = family_of(cfg)
    spec = fam.param_specs(cfg)[name]
    if spec.init in ("ones", "zeros"):
        return (torch.ones if spec.init == "ones" else torch.zeros)(spec.shape, dtype=dtype,
                                                                    device=device)
    layers = sum(b.kind == "layer" for b in fam.blocks(cfg))
    std = cfg.init_std / (math.sqrt(2 * layers) if spec.init == "normal_out" else 1.0)
    if torch.device(device or "cpu").type == "meta":
        return torch.empty(spec.shape, dtype=dtype, device="meta")
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(spec.shape, generator=gen, dtype=torch.float32).mul_(std).to(dtype=dtype,
                                                                                  device=device)


def init(cfg, seed: int = 0, *, dtype: torch.dtype = torch.float32,
         device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Fresh parameters: normal(0, init_std) matrices, output projections scaled by
    1/sqrt(2·layers), norm weights 1, biases 0. ``device="meta"`` allocates nothing."""
    return {name: init_param(cfg, name, seed, dtype=dtype, device=device)
            for name in param_specs(cfg)}


def is_concrete(t: torch.Tensor) -> bool:
    """False while a torch.func transform or torch.compile traces (values are not readable)."""
    return not (torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t))


def check_inputs(cfg, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None) -> None:
    family_of(cfg).check_inputs(cfg, tokens, positions, cu_seqlens)


def check_tokens(vocab_size: int, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None) -> None:
    """Raise ValueError naming the culprit for token ids outside the vocabulary, malformed
    ``cu_seqlens`` or mismatched shapes. Reads values, so it runs outside of transforms."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    if positions is not None and positions.shape != tokens.shape:
        raise ValueError(f"positions shape {tuple(positions.shape)} differs from tokens shape "
                         f"{tuple(tokens.shape)}")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, tokens.numel())


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
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


class Attend:
    """Attention over packed documents (training and evaluation): ``attend(layer, q, k, v,
    window=None)``; ``window``: sliding-window attention (``evo_kernels.attention``)."""

    def __init__(self, cu_seqlens: torch.Tensor | None, backend: str):
        self.cu_seqlens, self.backend = cu_seqlens, backend
        self.cache: dict = {}   # what a backend prepares once per forward (a block mask)

    def __call__(self, layer: int, q, k, v, window: int | None = None):
        return evo_kernels.attention(q, k, v, self.cu_seqlens, window=window,
                                     backend=self.backend, cache=self.cache)


def forward(cfg, params: dict[str, torch.Tensor], tokens: torch.Tensor,
            positions: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, *,
            remat: float = 0.0, attention: str = "auto", regions: Regions = LOCAL,
            kernels: str = "torch", routing=None) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` in the params' dtype, for any registered family.

    ``tokens`` int ``[batch, seq]``. ``positions`` int ``[batch, seq]``: rotary positions; by
    default ``0..seq-1`` per row, or restarting at every document when ``cu_seqlens`` is given.
    ``cu_seqlens`` int ``[n_docs + 1]``: document boundaries over the ``batch * seq`` tokens in
    row-major order; attention never crosses them. ``remat``: the fraction of layer blocks (the
    first ``floor(remat · layers)``) whose activations are recomputed in backward, not stored.
    ``attention``: an ``evo_kernels.attention`` backend name, or "auto". ``regions``: the parallel
    layout's hooks (``evo.models.layers.Regions``); under tensor parallelism the logits come back
    split on the vocabulary. ``kernels``: "torch" or "triton" elementwise ops (``layers.ops``).
    ``routing``: an ``evo.models.moe.Routing`` the MoE layers report into (MoE families only).
    """
    fam = family_of(cfg)
    if is_concrete(tokens):
        fam.check_inputs(cfg, tokens, positions, cu_seqlens)
    positions = default_positions(tokens, positions, cu_seqlens)
    return run_blocks(fam, cfg, params, tokens, positions,
                      regions.attention(Attend(cu_seqlens, attention), positions),
                      regions=regions, op=ops(kernels), remat=remat, routing=routing)


def default_positions(tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """``positions`` if given, else ``0..seq-1`` per row, or restarting at every document of
    ``cu_seqlens``."""
    if positions is not None:
        return positions
    b, s = tokens.shape
    if cu_seqlens is None:
        return torch.arange(s, device=tokens.device).expand(b, s)
    return positions_from_cu_seqlens(cu_seqlens, b * s).view(b, s)


def run_blocks(fam: Family, cfg, params: dict[str, torch.Tensor], tokens: torch.Tensor,
               positions: torch.Tensor, attend, *, regions: Regions = LOCAL, op=None,
               remat: float = 0.0, routing=None, blocks: list[Block] | None = None,
               x: torch.Tensor | None = None) -> torch.Tensor:
    """The family's blocks in order: embed, the layers (the first ``floor(remat · layers)``
    recomputed in backward; all of them when ``regions.checkpoint_layers``), head.

    ``blocks``: a contiguous slice of ``fam.blocks(cfg)`` to run instead (a pipeline stage),
    taking ``x`` (the previous block's output) unless the slice starts with the embedding;
    ``params`` then needs only the slice's parameters."""
    op = op or ops("torch")
    dtype = next(iter(params.values())).dtype
    ctx = fam.context(cfg, positions, dtype, attend, op)
    if routing is not None:
        ctx = fam.with_routing(ctx, routing)
    every = fam.blocks(cfg)
    blocks = every if blocks is None else blocks
    n_layers = sum(b.kind == "layer" for b in every)
    n_remat = n_layers if regions.checkpoint_layers else math.floor(remat * n_layers)
    if not torch.compiler.is_compiling() and (
            torch._C._functorch.is_functorch_wrapped_tensor(tokens)
            or any(torch._C._functorch.is_functorch_wrapped_tensor(p) for p in params.values())):
        n_remat = 0  # torch.func transforms reject checkpoint's saved-tensor hooks: store instead
    start = [b.name for b in every].index(blocks[0].name)
    layer = sum(b.kind == "layer" for b in every[:start])
    x = tokens if x is None else x
    for blk in blocks:
        if blk.kind == "embed":
            x = fam.embed(cfg, regions.block(params, blk), x, ctx, regions)
        elif blk.kind == "head":
            x = fam.head(cfg, regions.block(params, blk), x, ctx, regions)
        else:
            args = (fam, cfg, params, blk, layer, x, ctx, regions)
            x = checkpoint(_layer, *args, use_reentrant=False) if layer < n_remat else _layer(*args)
            layer += 1
    return x


def _layer(fam: Family, cfg, params, blk: Block, layer: int, x, ctx, regions: Regions):
    # The block's weights are fetched inside: recomputation fetches (under ZeRO-3: gathers) again.
    return fam.block(cfg, regions.block(params, blk), layer, x, ctx, regions)


# ---------------------------------------------------------------------------------------------
# Incremental decoding with a key/value cache: the same blocks, a cache-backed attention.

class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far: ``k``, ``v`` ``[layers, batch, capacity,
    kv_heads, head_dim]``, of which the first ``length`` slots are written; ``valid [batch,
    capacity]`` bool marks the slots holding real tokens (False for a shorter prompt's padding)."""
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    length: int


def init_cache(cfg, batch: int, capacity: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> KVCache:
    layers, kv_heads, head_dim = family_of(cfg).cache_shape(cfg)
    shape = (layers, batch, capacity, kv_heads, head_dim)
    return KVCache(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, capacity, dtype=torch.bool, device=device), 0)


class CachedAttend:
    """Writes each layer's new keys and values into the cache at ``start`` and attends over
    everything written so far: causal, within ``window`` slots when one is given, and only to
    valid slots."""

    def __init__(self, cache: KVCache, start: int, n: int):
        self.cache, self.start, self.end = cache, start, start + n
        self.masks: dict = {}   # window -> [b, 1, n, end] bool, built once per decoding step

    def __call__(self, layer: int, q, k, v, window: int | None = None):
        c = self.cache
        c.k[layer, :, self.start:self.end] = k
        c.v[layer, :, self.start:self.end] = v
        if window not in self.masks:
            self.masks[window] = evo_kernels.cached_mask(c.valid, self.start,
                                                         self.end - self.start, window)
        return evo_kernels.attention_with_mask(q, c.k[layer, :, :self.end],
                                               c.v[layer, :, :self.end], self.masks[window])


@torch.no_grad()
def decode(cfg, params: dict[str, torch.Tensor], tokens: torch.Tensor, cache: KVCache, *,
           positions: torch.Tensor | None = None, valid: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, KVCache]:
    """Logits ``[batch, n, vocab]`` of ``tokens [batch, n]`` following the cached ones, and the
    cache holding them too. The cache is donated: its tensors are written in place.

    ``positions`` (default: continuing from ``cache.length``) are the rotary positions; ``valid``
    ``[batch, n]`` bool (default all True) marks which of the new tokens are real, so prompts of
    different lengths can be left-padded into one batch. Runs the family's own blocks (as
    ``forward``), with an attention over the cache: equal to ``forward`` on the whole sequence
    (fp32 to rounding).
    """
    fam = family_of(cfg)
    if is_concrete(tokens):
        fam.check_inputs(cfg, tokens, positions)
    b, n = tokens.shape
    start = cache.length
    if start + n > cache.k.shape[2]:
        raise ValueError(f"the KV cache holds {cache.k.shape[2]} tokens; {start} are written and "
                         f"{n} more do not fit")
    if positions is None:
        positions = torch.arange(start, start + n, device=tokens.device).expand(b, n)
    cache.valid[:, start:start + n] = True if valid is None else valid
    logits = run_blocks(fam, cfg, params, tokens, positions, CachedAttend(cache, start, n))
    return logits, cache._replace(length=start + n)
