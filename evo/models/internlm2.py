"""InternLM2 (``InternLM2ForCausalLM``): LLaMA's maths in InternLM2's own checkpoint layout.

evo's LLaMA layout is InternLM2's: the attention input projection packed as ``wqkv``, grouped by kv
head, and the MLP as ``w1`` / ``w3`` / ``w2``. Only the HF names differ (``tok_embeddings``,
``attention.wqkv``, ``attention.wo``, ``feed_forward.w1/w3/w2``, ``output``) and ``wqkv`` stays
packed; InternLM2's config.json spells the bias flag ``bias``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from evo.models import family as F
from evo.models import llama


@dataclass(frozen=True)
class Config(llama.Config):
    """An InternLM2 model: the fields of ``llama.Config``, without the two InternLM2 has no
    config.json key for (a head size other than hidden / heads, LLaMA-3 rope scaling)."""
    family: ClassVar[str] = "internlm2"

    def __post_init__(self):
        super().__post_init__()
        if self.head_dim not in (None, self.hidden_size // self.num_heads):
            raise ValueError(f"Config.head_dim={self.head_dim}: InternLM2's head size is "
                             f"hidden_size / num_heads = {self.hidden_size // self.num_heads}")
        if self.rope_scaling is not None:
            raise ValueError("Config.rope_scaling: InternLM2 has no LLaMA-3 rope scaling")


class InternLM2(llama.Llama):
    name = "internlm2"
    config = Config
    hf_architectures = ("InternLM2ForCausalLM",)
    hf_model_type = "internlm2"
    hf_unsupported_flags = ("bias",)
    hf_top_names = {"embed": "model.tok_embeddings.weight", "norm": "model.norm.weight",
                    "lm_head": "output.weight"}
    hf_layer_names = {"attn_norm": "attention_norm.weight", "attn.wqkv": "attention.wqkv.weight",
                      "attn.wo": "attention.wo.weight", "mlp_norm": "ffn_norm.weight",
                      "mlp.w1": "feed_forward.w1.weight", "mlp.w3": "feed_forward.w3.weight",
                      "mlp.w2": "feed_forward.w2.weight"}

    def hf_tensors(self, cfg, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        # wqkv stays packed, in the same kv-head grouping: a plain transpose like every matrix.
        return {self.hf_name(name): w.t() if w.dim() == 2 and name != "embed" else w}

    def hf_join(self, cfg, name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        (t,) = parts.values()
        return t.t() if t.dim() == 2 and name != "embed" else t

    def config_to_hf(self, cfg, *, dtype_name: str) -> dict:
        d = super().config_to_hf(cfg, dtype_name=dtype_name)
        del d["attention_bias"], d["mlp_bias"], d["head_dim"]
        d["bias"] = False
        d["auto_map"] = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
        return d


INTERNLM2 = F.register(InternLM2())
