"""Qwen2 (``Qwen2ForCausalLM``): LLaMA with biases on the q, k and v projections.

The bias is one packed parameter beside ``wqkv``, in the same kv-head grouping, so tensor
parallelism splits it exactly like the weight's output axis::

    layers.{i}.attn.bqkv   [(H + 2·KV)·D]               ("qkv",)

Small Qwen2 models tie the output projection to the embedding (``tie_word_embeddings``). Qwen2's
sliding-window layers (``use_sliding_window: true``) are not implemented: such a config.json is
rejected, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from evo.models import family as F
from evo.models import llama
from evo.models.family import ParamSpec


@dataclass(frozen=True)
class Config(llama.Config):
    """A Qwen2 model: the fields of ``llama.Config``."""
    family: ClassVar[str] = "qwen2"


def split_heads(cfg: llama.Config, bias):
    """A packed ``[G·(r + 2)·D]`` bias (G kv-head groups; a tensor-parallel rank holds some of
    them) → q ``[G·r, D]``, k, v ``[G, D]``, to add to the projections' ``[..., heads, D]``."""
    r, d = cfg.q_per_kv, cfg.dim_per_head
    g = bias.view(-1, r + 2, d)
    return g[:, :r].flatten(0, 1), g[:, r], g[:, r + 1]


class Qwen2(llama.Llama):
    name = "qwen2"
    config = Config
    hf_architectures = ("Qwen2ForCausalLM",)
    hf_model_type = "qwen2"
    hf_unsupported_flags = ()      # its q/k/v biases are always there; mlp_bias is checked below

    def layer_specs(self, cfg: Config) -> dict[str, ParamSpec]:
        specs = super().layer_specs(cfg)
        width = specs["attn.wqkv"].shape[1]
        return insert_after(specs, "attn.wqkv",
                            {"attn.bqkv": ParamSpec((width,), ("qkv",), "zeros")})

    def qkv(self, cfg, p, h, ctx):
        q, k, v = super().qkv(cfg, p, h, ctx)
        bq, bk, bv = split_heads(cfg, p["attn.bqkv"])
        return q + bq, k + bk, v + bv

    # -- HF
    def hf_config_fields(self, d: dict, *, source: str) -> dict:
        if d.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias={d['mlp_bias']!r} is not supported (the "
                             f"{self.name!r} family's MLP has no biases)")
        reject_sliding_layers(d, source)
        return super().hf_config_fields(d, source=source)

    def config_to_hf(self, cfg: Config, *, dtype_name: str) -> dict:
        d = super().config_to_hf(cfg, dtype_name=dtype_name)
        del d["attention_bias"], d["mlp_bias"]
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
        return d

    def hf_tensors(self, cfg, name, w):
        if name.endswith(".attn.bqkv"):
            i = name.split(".")[1]
            return {f"model.layers.{i}.self_attn.{x}_proj.bias": t
                    for x, t in zip("qkv", llama.split_qkv(cfg, w))}
        return super().hf_tensors(cfg, name, w)

    def hf_join(self, cfg, name, parts):
        if name.endswith(".attn.bqkv"):
            return llama.join_qkv(cfg, *parts.values())
        return super().hf_join(cfg, name, parts)


def insert_after(specs: dict[str, ParamSpec], name: str, new: dict[str, ParamSpec]
                 ) -> dict[str, ParamSpec]:
    """``specs`` with ``new`` placed right after ``name`` (the table's order is creation order)."""
    items = list(specs.items())
    at = list(specs).index(name) + 1
    return dict(items[:at] + list(new.items()) + items[at:])


def reject_sliding_layers(d: dict, source: str) -> None:
    """Qwen's per-layer sliding windows (``use_sliding_window``, ``layer_types``) are not
    implemented: a config that turns them on is an error naming the key."""
    if d.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window={d['use_sliding_window']!r} is not "
                         "supported (evo's Qwen families run full attention in every layer)")
    kinds = d.get("layer_types") or []
    if any(k != "full_attention" for k in kinds):
        raise ValueError(f"{source}: layer_types={kinds!r} is not supported (evo's Qwen families "
                         "run 'full_attention' in every layer)")


QWEN2 = F.register(Qwen2())
