"""A minimal mixture-of-experts family for the expert-parallel tests: LLaMA with its MLP replaced
by ``num_experts`` SwiGLU experts, token-choice top-k over a softmax router, the routed copies
sorted by expert and run through ``regions.experts``.

Parameters of a layer's MoE (logical axes in brackets)::

    moe.router   [hidden, experts]              ("embed", "expert_scores")   replicated
    moe.w1, w3   [experts, hidden, ffn]         ("expert", "embed", "mlp")
    moe.w2       [experts, ffn, hidden]         ("expert", "mlp", "embed")
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from evo import models
from evo.models import llama
from evo.models.family import Block, ParamSpec
from evo.models.layers import LOCAL


@dataclass(frozen=True)
class ToyMoEConfig(llama.Config):
    family: ClassVar[str] = "ep_toy_moe"
    num_experts: int = 4
    top_k: int = 2


def expert_mlp(p, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The held experts (``p["moe.w1"]`` ``[E_local, hidden, ffn]``, ...) on ``x [R, hidden]``
    grouped by expert, ``counts [E_local]`` rows each: a plain per-expert loop."""
    out = [F.silu(xe @ p["moe.w1"][e]) * (xe @ p["moe.w3"][e]) @ p["moe.w2"][e]
           for e, xe in enumerate(x.split(counts.tolist()))]
    return torch.cat(out) if out else x.new_zeros((0, p["moe.w2"].shape[-1]))


class ToyMoE(llama.Llama):
    name = "ep_toy_moe"
    config = ToyMoEConfig
    hf_architectures = ()

    def layer_specs(self, cfg):
        specs = super().layer_specs(cfg)
        for k in ("mlp.w1", "mlp.w2", "mlp.w3"):
            del specs[k]
        h, e, f = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        specs["moe.router"] = ParamSpec((h, e), ("embed", "expert_scores"), "normal")
        specs["moe.w1"] = ParamSpec((e, h, f), ("expert", "embed", "mlp"), "normal")
        specs["moe.w3"] = ParamSpec((e, h, f), ("expert", "embed", "mlp"), "normal")
        specs["moe.w2"] = ParamSpec((e, f, h), ("expert", "mlp", "embed"), "normal_out")
        return specs

    def blocks(self, cfg):
        # the router is applied to replicated activations but weighs tp-partial expert outputs
        return [b if b.kind != "layer" else Block(b.name, b.kind, b.params, b.enters, b.exits,
                                                  (f"{b.name}.moe.router",))
                for b in super().blocks(cfg)]

    def block(self, cfg, p, layer, x, ctx, regions=LOCAL):
        prefix = f"layers.{layer}."
        p = {k[len(prefix):]: v for k, v in p.items()}
        h = regions.enter(ctx.op.rms_norm(x, p["attn_norm"], cfg.norm_eps))
        x = x + regions.exit(self.attention(cfg, p, layer, h, ctx))
        h = regions.enter(ctx.op.rms_norm(x, p["mlp_norm"], cfg.norm_eps))
        return x + regions.exit(self.moe(cfg, p, h, regions))

    def moe(self, cfg, p, h, regions):
        b, s, d = h.shape
        x = h.reshape(-1, d)
        scores = torch.softmax((x @ regions.inside(p["moe.router"])).float(), -1)
        weights, chosen = scores.topk(cfg.top_k, -1)               # [N, k]
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=cfg.num_experts)
        run = getattr(regions, "experts", None) or (lambda xs, c, fn: fn(xs, c))
        y_sorted = run(x.index_select(0, order // cfg.top_k), counts,
                       lambda xs, c: expert_mlp(p, xs, c))
        y = torch.zeros_like(y_sorted).index_copy(0, order, y_sorted).view(-1, cfg.top_k, d)
        return (y * weights.to(y.dtype)[..., None]).sum(1).view(b, s, d)


models.register(ToyMoE())
