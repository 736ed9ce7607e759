"""Qwen2-MoE (``Qwen2MoeForCausalLM``) and Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen2 / Qwen3 whose
MLPs are mixtures of experts (``evo.models.moe``), softmax router, top-k with the chosen weights
renormalised when ``norm_topk_prob``; dense layers where ``decoder_sparse_step`` and
``mlp_only_layers`` say (``sparse_step``, ``dense_layers``).

Qwen2-MoE adds a shared expert of ``shared_expert_intermediate_size`` and its sigmoid gate. HF
names: ``mlp.gate`` (the router), ``mlp.experts.{e}.gate_proj/up_proj/down_proj``,
``mlp.shared_expert.*``, ``mlp.shared_expert_gate``; the packed ``mlp.experts.gate_up_proj`` /
``mlp.experts.down_proj`` are read too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from evo.models import family as F
from evo.models import moe, qwen2, qwen3

_NAMES = {"moe.router": "mlp.gate.weight",
          "moe.shared.w1": "mlp.shared_expert.gate_proj.weight",
          "moe.shared.w3": "mlp.shared_expert.up_proj.weight",
          "moe.shared.w2": "mlp.shared_expert.down_proj.weight",
          "moe.shared_gate": "mlp.shared_expert_gate.weight"}


def _fields(d: dict, source: str) -> dict:
    """The MoE fields from a Qwen MoE config.json (transformers' defaults where absent)."""
    dense = d.get("mlp_only_layers") or []
    if not isinstance(dense, list):
        raise ValueError(f"{source}: mlp_only_layers={dense!r} must be a list of layer indices")
    experts = d.get("num_experts", d.get("num_local_experts", 60))   # transformers 5 renames it
    return dict(num_experts=experts, top_k=d.get("num_experts_per_tok", 4),
                moe_intermediate_size=d.get("moe_intermediate_size", 1408),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                sparse_step=d.get("decoder_sparse_step", 1), dense_layers=tuple(dense),
                aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)))


def _to_hf(cfg) -> dict:
    """The Qwen MoE config.json keys of ``cfg`` (leading dense layers become mlp_only_layers)."""
    dense = sorted(set(cfg.dense_layers) | set(range(min(cfg.first_k_dense, cfg.num_layers))))
    return dict(num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                moe_intermediate_size=cfg.expert_size, norm_topk_prob=cfg.norm_topk_prob,
                decoder_sparse_step=cfg.sparse_step, mlp_only_layers=dense,
                router_aux_loss_coef=cfg.aux_loss_coef, output_router_logits=False)


@dataclass(frozen=True)
class Qwen2MoeConfig(moe.Fields, qwen2.Config):
    """A Qwen2-MoE model: ``qwen2.Config`` and the MoE ``Fields``."""
    family: ClassVar[str] = "qwen2_moe"


@dataclass(frozen=True)
class Qwen3MoeConfig(moe.Fields, qwen3.Config):
    """A Qwen3-MoE model: ``qwen3.Config`` and the MoE ``Fields``."""
    family: ClassVar[str] = "qwen3_moe"


class Qwen2Moe(moe.Decoder, qwen2.Qwen2):
    name = "qwen2_moe"
    config = Qwen2MoeConfig
    hf_architectures = ("Qwen2MoeForCausalLM",)
    hf_model_type = "qwen2_moe"
    shape_fields = qwen2.Qwen2.shape_fields + moe.Decoder.moe_shape_fields
    hf_layer_names = {**qwen2.Qwen2.hf_layer_names, **_NAMES}

    def hf_config_fields(self, d: dict, *, source: str) -> dict:
        if d.get("qkv_bias", True) is not True:
            raise ValueError(f"{source}: qkv_bias={d['qkv_bias']!r} is not supported (the "
                             "'qwen2_moe' family has q, k, v biases)")
        shared = d.get("shared_expert_intermediate_size", 5632)
        return {**super().hf_config_fields(d, source=source), **_fields(d, source),
                "shared_expert_size": shared, "shared_expert_gate": shared > 0}

    def config_to_hf(self, cfg: Qwen2MoeConfig, *, dtype_name: str) -> dict:
        moe.require_hf(cfg, self.name, score_func="softmax",
                       shared_expert_gate=cfg.shared_expert_size > 0)
        d = super().config_to_hf(cfg, dtype_name=dtype_name)
        d.update(_to_hf(cfg), shared_expert_intermediate_size=cfg.shared_expert_size,
                 qkv_bias=True)
        return d


class Qwen3Moe(moe.Decoder, qwen3.Qwen3):
    name = "qwen3_moe"
    config = Qwen3MoeConfig
    hf_architectures = ("Qwen3MoeForCausalLM",)
    hf_model_type = "qwen3_moe"
    shape_fields = qwen3.Qwen3.shape_fields + moe.Decoder.moe_shape_fields
    hf_layer_names = {**qwen3.Qwen3.hf_layer_names, **_NAMES}

    def hf_config_fields(self, d: dict, *, source: str) -> dict:
        return {**super().hf_config_fields(d, source=source), **_fields(d, source)}

    def config_to_hf(self, cfg: Qwen3MoeConfig, *, dtype_name: str) -> dict:
        moe.require_hf(cfg, self.name, score_func="softmax", shared_expert_size=0)
        d = super().config_to_hf(cfg, dtype_name=dtype_name)
        d.update(_to_hf(cfg))
        return d


QWEN2_MOE = F.register(Qwen2Moe())
QWEN3_MOE = F.register(Qwen3Moe())
