"""A minimal mixture-of-experts family for the expert-parallel tests: LLaMA with its MLP replaced
by ``evo.models.moe.moe_mlp``: ``num_experts`` SwiGLU experts, token-choice top-k over a softmax
router, the routed copies sorted by expert and run through ``regions.experts``.

Parameters of a layer's MoE (logical axes in brackets)::

    moe.router   [hidden, experts]              ("embed", "router")   replicated
    moe.w1, w3   [experts, hidden, ffn]         ("expert", "embed", "mlp")
    moe.w2       [experts, ffn, hidden]         ("expert", "mlp", "embed")
"""
from dataclasses import dataclass
from typing import ClassVar

from evo import models
from evo.models import llama, moe
from evo.models.family import Block, ParamSpec
from evo.models.layers import LOCAL


@dataclass(frozen=True)
class ToyMoEConfig(llama.Config):
    family: ClassVar[str] = "ep_toy_moe"
    num_experts: int = 4
    top_k: int = 2
    score_func: str = "softmax"
    norm_topk_prob: bool = False
    capacity_factor: float | None = None


class ToyMoE(llama.Llama):
    name = "ep_toy_moe"
    config = ToyMoEConfig
    hf_architectures = ()

    def layer_specs(self, cfg):
        specs = super().layer_specs(cfg)
        for k in ("mlp.w1", "mlp.w2", "mlp.w3"):
            del specs[k]
        h, e, f = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        specs["moe.router"] = ParamSpec((h, e), ("embed", "router"), "normal")
        specs["moe.w1"] = ParamSpec((e, h, f), ("expert", "embed", "mlp"), "normal")
        specs["moe.w3"] = ParamSpec((e, h, f), ("expert", "embed", "mlp"), "normal")
        specs["moe.w2"] = ParamSpec((e, f, h), ("expert", "mlp", "embed"), "normal_out")
        return specs

    def blocks(self, cfg):
        # the MoE layer enters its input and its router logits into the tensor-parallel region
        return [b if b.kind != "layer" else Block(b.name, b.kind, b.params, 3, b.exits,
                                                  enter_widths=(cfg.num_experts,))
                for b in super().blocks(cfg)]

    def block(self, cfg, p, layer, x, ctx, regions=LOCAL):
        prefix = f"layers.{layer}."
        p = {k[len(prefix):]: v for k, v in p.items()}
        h = regions.enter(ctx.op.rms_norm(x, p["attn_norm"], cfg.norm_eps))
        x = x + regions.exit(self.attention(cfg, p, layer, h, ctx))
        y, _ = moe.moe_mlp(cfg, p, ctx.op.rms_norm(x, p["mlp_norm"], cfg.norm_eps), regions)
        return x + regions.exit(y)


models.register(ToyMoE())
