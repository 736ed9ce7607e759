"""LLaMA 2 / 3 as pure functions over a flat dict of tensors: the ``"llama"`` family, and the
decoder the LLaMA-shaped families (InternLM2, Qwen, Mistral, ...) subclass.

LLaMA 2 and 3: grouped-query attention, ``rope_theta``, LLaMA-3 rope scaling, tied or untied
embeddings. The attention input projection is packed as ``wqkv`` and grouped by kv head (for kv
head g: its ``heads // kv_heads`` query heads, then its key, then its value — so splitting
``wqkv`` evenly over tensor-parallel ranks hands each rank whole groups), and the MLP is ``w1``
(gate), ``w3`` (up), ``w2`` (down).

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

Blocks: ``embed``; ``layers.{i}`` (every ``layers.{i}.*``); ``head`` (``norm`` and ``lm_head``, or
``embed`` when tied). A family that is "LLaMA plus a feature" subclasses ``Llama`` and overrides
the piece that differs: ``layer_specs`` (the parameters of one layer), ``qkv`` (the projections),
``mlp``, the HF name tables.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from evo.models import family as F
from evo.models.family import Block, Family, ParamSpec
from evo.models.layers import LOCAL, Regions, rope_cos_sin, rope_inv_freq


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
    """A LLaMA 2 / 3 model; the base of the LLaMA-shaped families' configs."""
    family: ClassVar[str] = "llama"

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



class Context(NamedTuple):
    """What every block of one forward pass shares: rotary tables ``cos``, ``sin`` ``[batch, seq,
    1, head_dim]``, the attention (``attend(layer, q, k, v)``) and the elementwise ops."""
    cos: torch.Tensor
    sin: torch.Tensor
    attend: object
    op: object


def split_qkv(cfg: Config, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed ``[..., (H + 2KV)·D]`` projection (weight or bias; grouped by kv head) → q
    ``[..., H·D]``, k, v ``[..., KV·D]``."""
    kv, r, d = cfg.kv_heads, cfg.q_per_kv, cfg.dim_per_head
    lead = w.shape[:-1]
    g = w.reshape(*lead, kv, r + 2, d)
    return (g[..., :r, :].reshape(*lead, -1), g[..., r, :].reshape(*lead, -1),
            g[..., r + 1, :].reshape(*lead, -1))


def join_qkv(cfg: Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``split_qkv``."""
    kv, r, d = cfg.kv_heads, cfg.q_per_kv, cfg.dim_per_head
    lead = q.shape[:-1]
    return torch.cat([q.reshape(*lead, kv, r, d), k.reshape(*lead, kv, 1, d),
                      v.reshape(*lead, kv, 1, d)], dim=-2).reshape(*lead, -1)


# Defaults transformers' LlamaConfig uses for keys a config.json may leave out.
HF_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
               "initializer_range": 0.02, "tie_word_embeddings": False}


class Llama(Family):
    name = "llama"
    config = Config
    hf_architectures = ("LlamaForCausalLM",)
    hf_model_type = "llama"
    shape_fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "intermediate_size", "head_dim", "tie_embeddings")
    # evo name (top level, or within a layer) -> HF tensor name; "{i}" is the layer index.
    hf_top_names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
                    "lm_head": "lm_head.weight"}
    hf_layer_names = {"attn_norm": "input_layernorm.weight", "attn.wo": "self_attn.o_proj.weight",
                      "mlp_norm": "post_attention_layernorm.weight",
                      "mlp.w1": "mlp.gate_proj.weight", "mlp.w3": "mlp.up_proj.weight",
                      "mlp.w2": "mlp.down_proj.weight"}

    # -- parameters and blocks
    def layer_specs(self, cfg: Config) -> dict[str, ParamSpec]:
        """One decoder layer's parameters, named within the layer."""
        h, d, ffn = cfg.hidden_size, cfg.dim_per_head, cfg.intermediate_size
        qkv = (cfg.num_heads + 2 * cfg.kv_heads) * d
        return {"attn_norm": ParamSpec((h,), ("norm",), "ones"),
                "attn.wqkv": ParamSpec((h, qkv), ("embed", "qkv"), "normal"),
                "attn.wo": ParamSpec((cfg.num_heads * d, h), ("heads", "embed"), "normal_out"),
                "mlp_norm": ParamSpec((h,), ("norm",), "ones"),
                "mlp.w1": ParamSpec((h, ffn), ("embed", "mlp"), "normal"),
                "mlp.w3": ParamSpec((h, ffn), ("embed", "mlp"), "normal"),
                "mlp.w2": ParamSpec((ffn, h), ("mlp", "embed"), "normal_out")}

    def param_specs(self, cfg: Config) -> dict[str, ParamSpec]:
        """Every parameter's shape, logical axes and initialiser, in creation order."""
        h, v = cfg.hidden_size, cfg.vocab_size
        specs = {"embed": ParamSpec((v, h), ("vocab", "embed"), "normal")}
        layer = self.layer_specs(cfg)
        for i in range(cfg.num_layers):
            specs.update({f"layers.{i}.{k}": s for k, s in layer.items()})
        specs["norm"] = ParamSpec((h,), ("norm",), "ones")
        if not cfg.tie_embeddings:
            specs["lm_head"] = ParamSpec((h, v), ("embed", "vocab"), "normal")
        return specs

    def blocks(self, cfg: Config) -> list[Block]:
        layer = tuple(self.layer_specs(cfg))
        out, _ = self.output_param(cfg)
        return [Block("embed", "embed", ("embed",), exits=1),
                *[Block(f"layers.{i}", "layer", tuple(f"layers.{i}.{k}" for k in layer),
                        enters=2, exits=2) for i in range(cfg.num_layers)],
                Block("head", "head", ("norm", out), enters=1)]

    def embedding_param(self, cfg: Config) -> str:
        return "embed"

    def output_param(self, cfg: Config) -> tuple[str, int]:
        return ("embed", 0) if cfg.tie_embeddings else ("lm_head", 1)

    def tp_divisors(self, cfg: Config) -> dict[str, int]:
        return {"model.num_heads": cfg.num_heads, "model.num_kv_heads": cfg.kv_heads,
                "model.intermediate_size": cfg.intermediate_size,
                "model.vocab_size": cfg.vocab_size}

    def cache_shape(self, cfg: Config) -> tuple[int, int, int]:
        return cfg.num_layers, cfg.kv_heads, cfg.dim_per_head

    def flops_per_token(self, cfg: Config, seq_len: int) -> float:
        """``6·N + 12·L·(H·D)·s``: forward and backward of the matmuls (N without the input
        embedding, with the output projection) plus causal-free attention scores at sequence
        length s. Recomputation is not counted; packed documents count at the full ``seq_len``."""
        attn = cfg.num_heads * cfg.dim_per_head
        return 6.0 * self.non_embedding_params(cfg) + 12.0 * cfg.num_layers * attn * seq_len

    # -- computation
    def context(self, cfg: Config, positions, dtype, attend, op) -> Context:
        scaling = dataclasses.asdict(cfg.rope_scaling) if cfg.rope_scaling else None
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.dim_per_head, cfg.rope_theta,
                                                         scaling), dtype)
        return Context(cos, sin, attend, op)

    def embed(self, cfg, p, tokens, ctx: Context, regions: Regions = LOCAL):
        return regions.embed(tokens, p["embed"])

    def block(self, cfg, p, layer, x, ctx: Context, regions: Regions = LOCAL):
        """One decoder layer. ``x [batch, seq, hidden]`` (the sequence may be split by
        ``regions``); head counts come from the weights' shapes, so a layer runs on a slice of
        the heads as well."""
        prefix = f"layers.{layer}."
        p = {k[len(prefix):]: v for k, v in p.items()}
        h = regions.enter(ctx.op.rms_norm(x, p["attn_norm"], cfg.norm_eps))
        x = x + regions.exit(self.attention(cfg, p, layer, h, ctx))
        return x + self.feed_forward(cfg, p, layer, x, ctx, regions)

    def feed_forward(self, cfg, p, layer: int, x, ctx: Context, regions: Regions = LOCAL):
        """The layer's second half, what it adds to the residual stream ``x``: the norm, then
        the MLP in its tensor-parallel region (a MoE family replaces it)."""
        h = regions.enter(ctx.op.rms_norm(x, p["mlp_norm"], cfg.norm_eps))
        return regions.exit(self.mlp(cfg, p, h, ctx))

    def attention(self, cfg, p, layer: int, h, ctx: Context):
        """Self-attention of the normed ``h`` up to the output projection (a partial sum under
        tensor parallelism)."""
        q, k, v = self.qkv(cfg, p, h, ctx)
        q, k = ctx.op.apply_rope(q, ctx.cos, ctx.sin), ctx.op.apply_rope(k, ctx.cos, ctx.sin)
        return ctx.attend(layer, q, k, v).flatten(2) @ p["attn.wo"]

    def qkv(self, cfg, p, h, ctx: Context):
        """q ``[batch, seq, heads, head_dim]``, k, v ``[batch, seq, kv_heads, head_dim]``."""
        r, d = cfg.q_per_kv, cfg.dim_per_head
        b, s, _ = h.shape
        qkv = (h @ p["attn.wqkv"]).view(b, s, -1, r + 2, d)
        return qkv[:, :, :, :r].flatten(2, 3), qkv[:, :, :, r], qkv[:, :, :, r + 1]

    def mlp(self, cfg, p, h, ctx: Context):
        return ctx.op.swiglu_act(h @ p["mlp.w1"], h @ p["mlp.w3"]) @ p["mlp.w2"]

    def head(self, cfg, p, x, ctx: Context, regions: Regions = LOCAL):
        x = ctx.op.rms_norm(x, p["norm"], cfg.norm_eps)
        name, vocab_dim = self.output_param(cfg)
        w = p[name].t() if vocab_dim == 0 else p[name]
        return regions.enter(x) @ w

    # -- checkpoints
    def config_from_dict(self, d: dict) -> Config:
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return self.config(**d)

    # -- HF: config.json
    def config_to_hf(self, cfg: Config, *, dtype_name: str) -> dict:
        """``cfg`` as a transformers config.json dict. Uses the ``rope_theta`` / ``rope_scaling``
        spellings, which transformers 4.x reads and 5.x converts to ``rope_parameters``."""
        rs = cfg.rope_scaling
        return {
            "architectures": [self.hf_architectures[0]],
            "model_type": self.hf_model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": None if rs is None else {
                "rope_type": "llama3", "factor": rs.factor,
                "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings},
            "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_seq_len,
            "initializer_range": cfg.init_std,
            "torch_dtype": dtype_name,
        }

    def config_from_hf(self, d: dict, *, source: str) -> Config:
        """A config.json dict → ``Config``. Reads transformers 4.x (``rope_theta``,
        ``rope_scaling``) and 5.x (``rope_parameters``) spellings. Raises ValueError naming
        ``source`` and the key for missing keys and for features this family does not have."""
        return self._config(self.hf_config_fields(d, source=source), source)

    def _config(self, fields: dict, source: str) -> Config:
        try:
            return self.config(**fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None

    def hf_config_fields(self, d: dict, *, source: str) -> dict:
        """The ``Config`` fields a LLaMA-shaped config.json holds (subclasses add theirs)."""
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (this family's MLP "
                             "is SwiGLU)")
        for key in self.hf_unsupported_flags:
            if d.get(key):
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by the "
                                 f"{self.name!r} family (it has no biases)")
        rope_theta, rope_scaling = _rope_from_hf(d, source)
        hidden, heads = _need(d, "hidden_size", source), _need(d, "num_attention_heads", source)
        kv_heads, head_dim = d.get("num_key_value_heads"), d.get("head_dim")
        # Spell the defaults as None, so that config_from_hf(config_to_hf(cfg)) == cfg.
        if kv_heads == heads:
            kv_heads = None
        if (head_dim is not None and isinstance(hidden, int) and isinstance(heads, int)
                and heads > 0 and hidden % heads == 0 and head_dim == hidden // heads):
            head_dim = None
        return dict(vocab_size=_need(d, "vocab_size", source), hidden_size=hidden,
                    num_layers=_need(d, "num_hidden_layers", source), num_heads=heads,
                    num_kv_heads=kv_heads,
                    intermediate_size=_need(d, "intermediate_size", source),
                    head_dim=head_dim, rope_theta=float(rope_theta), rope_scaling=rope_scaling,
                    norm_eps=float(_get(d, "rms_norm_eps")),
                    tie_embeddings=bool(_get(d, "tie_word_embeddings")),
                    init_std=float(_get(d, "initializer_range")),
                    max_seq_len=_get(d, "max_position_embeddings"))

    hf_unsupported_flags: ClassVar[tuple[str, ...]] = ("attention_bias", "mlp_bias")

    # -- HF: tensors
    def hf_name(self, name: str) -> str:
        if name in self.hf_top_names:
            return self.hf_top_names[name]
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{self.hf_layer_names[rest]}"

    def hf_tensors(self, cfg: Config, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """One evo parameter → its HF tensors (torch ``[out, in]`` matrices). ``wqkv`` becomes
        ``q_proj``, ``k_proj``, ``v_proj``."""
        if name.endswith(".attn.wqkv"):
            i = name.split(".")[1]
            return {f"model.layers.{i}.self_attn.{x}_proj.weight": t.t()
                    for x, t in zip("qkv", split_qkv(cfg, w))}
        return {self.hf_name(name): w.t() if w.dim() == 2 and name != "embed" else w}

    def hf_join(self, cfg: Config, name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of ``hf_tensors``: ``parts`` holds exactly the HF tensors it names."""
        if name.endswith(".attn.wqkv"):
            q, k, v = (t.t() for t in parts.values())
            return join_qkv(cfg, q, k, v)
        (t,) = parts.values()
        return t.t() if t.dim() == 2 and name != "embed" else t

    def to_hf(self, cfg: Config, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: t.contiguous() for name in self.param_specs(cfg)
                for k, t in self.hf_tensors(cfg, name, params[name]).items()}

    def from_hf(self, cfg: Config, state: dict[str, torch.Tensor], *, source: str
                ) -> dict[str, torch.Tensor]:
        """HF tensors → evo params, checking every name and shape. Raises ValueError naming
        ``source`` and the offending tensor. Extra tensors (e.g. rotary buffers) are ignored."""
        params = {}
        for name, spec in self.param_specs(cfg).items():
            parts = {}
            for ext, t in self.hf_tensors(cfg, name, torch.empty(spec.shape,
                                                                 device="meta")).items():
                if ext not in state:
                    raise ValueError(f"{source}: tensor {ext!r} is missing")
                if tuple(state[ext].shape) != tuple(t.shape):
                    raise ValueError(f"{source}: tensor {ext!r} has shape "
                                     f"{tuple(state[ext].shape)}, the config expects "
                                     f"{tuple(t.shape)}")
                parts[ext] = state[ext]
            params[name] = self.hf_join(cfg, name, parts).contiguous()
        return params


def _need(d: dict, key: str, source: str):
    if d.get(key) is None:
        raise ValueError(f"{source}: required key {key!r} is missing")
    return d[key]


def _get(d: dict, key: str):
    v = d.get(key)
    return HF_DEFAULTS[key] if v is None else v


def _rope_from_hf(d: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) from either ``rope_scaling`` + ``rope_theta`` or
    ``rope_parameters`` (which carries its own ``rope_theta``)."""
    if d.get("rope_scaling") is not None:
        key, rope = "rope_scaling", d["rope_scaling"]
    else:
        key, rope = "rope_parameters", d.get("rope_parameters") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{source}: {key}={rope!r} is not supported (evo reads one flat dict "
                         "with rope_type 'llama3', or none)")
    theta = rope.get("rope_theta", _get(d, "rope_theta"))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{source}: {key} type {kind!r} is not supported (evo implements "
                         "'llama3' scaling, or none)")
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        if rope.get(k) is None:
            raise ValueError(f"{source}: {key}.{k} is missing (required for rope_type 'llama3')")
    try:
        return theta, RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=rope.get("original_max_position_embeddings",
                                                      _get(d, "max_position_embeddings")))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {key}: {e}") from None


LLAMA = F.register(Llama())

# The family's functions under the names the docs use (``llama.init(cfg)``, ``llama.apply``...).
# They run any registered family's config; these are the generic entry points of ``evo.models``.
param_specs = F.param_specs
axes = F.axes
init = F.init
init_param = F.init_param
apply = F.forward
check_inputs = F.check_inputs
init_cache = F.init_cache
decode = F.decode
KVCache = F.KVCache
