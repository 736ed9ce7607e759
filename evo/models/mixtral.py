"""Mixtral (``MixtralForCausalLM``): LLaMA whose every MLP is a mixture of experts
(``evo.models.moe``): ``num_experts`` SwiGLU experts of ``intermediate_size``, softmax router,
top-k (2) with the chosen weights renormalised. HF names: ``block_sparse_moe.gate`` (the router),
``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate, up, down); transformers 5's packed
``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj`` are read too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from evo.models import family as F
from evo.models import llama, moe


@dataclass(frozen=True)
class Config(moe.Fields, llama.Config):
    """A Mixtral model: ``llama.Config`` and the MoE ``Fields``."""
    family: ClassVar[str] = "mixtral"


class Mixtral(moe.Decoder, llama.Llama):
    name = "mixtral"
    config = Config
    hf_architectures = ("MixtralForCausalLM",)
    hf_model_type = "mixtral"
    shape_fields = llama.Llama.shape_fields + moe.Decoder.moe_shape_fields
    hf_moe_prefix = "block_sparse_moe"
    hf_expert_names = ("w1", "w3", "w2")
    hf_layer_names = {**llama.Llama.hf_layer_names, "moe.router": "block_sparse_moe.gate.weight"}

    def hf_config_fields(self, d: dict, *, source: str) -> dict:
        if d.get("sliding_window") is not None:
            raise ValueError(f"{source}: sliding_window={d['sliding_window']!r} is not supported "
                             "by the 'mixtral' family (full attention)")
        return {**super().hf_config_fields(d, source=source),
                "num_experts": d.get("num_local_experts", 8),
                "top_k": d.get("num_experts_per_tok", 2),
                "aux_loss_coef": float(d.get("router_aux_loss_coef", 0.001))}

    def config_to_hf(self, cfg: Config, *, dtype_name: str) -> dict:
        moe.require_hf(cfg, self.name, score_func="softmax", norm_topk_prob=True,
                       moe_intermediate_size=None, shared_expert_size=0, first_k_dense=0,
                       sparse_step=1, dense_layers=())
        d = super().config_to_hf(cfg, dtype_name=dtype_name)
        del d["attention_bias"], d["mlp_bias"]
        d.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                 router_aux_loss_coef=cfg.aux_loss_coef, router_jitter_noise=0.0,
                 sliding_window=None, output_router_logits=False)
        return d


MIXTRAL = F.register(Mixtral())
