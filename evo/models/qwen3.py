"""Qwen3 (``Qwen3ForCausalLM``): LLaMA with an RMSNorm over each head of q and of k, applied
after the projection and before the rotary embedding, and a ``head_dim`` independent of
``hidden_size / num_heads``.

The two norm weights are shared by all heads::

    layers.{i}.attn.q_norm [head_dim]                   ("norm",)   replicated
    layers.{i}.attn.k_norm [head_dim]                   ("norm",)   replicated

Under tensor parallelism every rank applies them to its own heads, so each rank's gradient is a
partial sum: the block passes them through ``regions.inside`` (and lists them in its ``Block``'s
``inside``), where a parallel layout completes it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from evo.models import family as F
from evo.models import llama
from evo.models.family import Block, ParamSpec
from evo.models.layers import LOCAL, Regions
from evo.models.qwen2 import insert_after, reject_sliding_layers


@dataclass(frozen=True)
class Config(llama.Config):
    """A Qwen3 model: the fields of ``llama.Config`` (``head_dim`` set freely)."""
    family: ClassVar[str] = "qwen3"


_HEAD_NORMS = ("attn.q_norm", "attn.k_norm")   # within a layer


class Qwen3(llama.Llama):
    name = "qwen3"
    config = Config
    hf_architectures = ("Qwen3ForCausalLM",)
    hf_model_type = "qwen3"
    hf_layer_names = {**llama.Llama.hf_layer_names, "attn.q_norm": "self_attn.q_norm.weight",
                      "attn.k_norm": "self_attn.k_norm.weight"}

    def layer_specs(self, cfg: Config) -> dict[str, ParamSpec]:
        norm = ParamSpec((cfg.dim_per_head,), ("norm",), "ones")
        return insert_after(super().layer_specs(cfg), "attn.wqkv", dict.fromkeys(_HEAD_NORMS, norm))

    def blocks(self, cfg: Config) -> list[Block]:
        return [dataclasses.replace(b, inside=tuple(f"{b.name}.{k}" for k in _HEAD_NORMS))
                if b.kind == "layer" else b for b in super().blocks(cfg)]

    def block(self, cfg, p, layer, x, ctx, regions: Regions = LOCAL):
        p = {k: regions.inside(w) if k.endswith(_HEAD_NORMS) else w for k, w in p.items()}
        return super().block(cfg, p, layer, x, ctx, regions)

    def qkv(self, cfg, p, h, ctx):
        q, k, v = super().qkv(cfg, p, h, ctx)
        return (ctx.op.rms_norm(q, p["attn.q_norm"], cfg.norm_eps),
                ctx.op.rms_norm(k, p["attn.k_norm"], cfg.norm_eps), v)

    # -- HF
    def hf_config_fields(self, d: dict, *, source: str) -> dict:
        reject_sliding_layers(d, source)
        return super().hf_config_fields(d, source=source)

    def config_to_hf(self, cfg: Config, *, dtype_name: str) -> dict:
        d = super().config_to_hf(cfg, dtype_name=dtype_name)
        del d["mlp_bias"]
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
        return d


QWEN3 = F.register(Qwen3())
