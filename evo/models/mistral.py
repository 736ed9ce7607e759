"""Mistral (``MistralForCausalLM``): LLaMA's parameters, with sliding-window attention.

With ``sliding_window = W`` the token at position ``i`` attends to positions ``i - W + 1 .. i`` of
its own document (transformers' rule), in training over packed documents and in KV-cache decoding
alike; ``None`` is full causal attention.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

from evo.models import family as F
from evo.models import llama


@dataclass(frozen=True)
class Config(llama.Config):
    """A Mistral model: the fields of ``llama.Config`` and the attention window."""
    family: ClassVar[str] = "mistral"

    sliding_window: int | None = 4096    # None: no window

    def __post_init__(self):
        super().__post_init__()
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise ValueError(f"Config.sliding_window must be a positive integer or None, got {w!r}")


class Mistral(llama.Llama):
    name = "mistral"
    config = Config
    hf_architectures = ("MistralForCausalLM",)
    hf_model_type = "mistral"

    def context(self, cfg: Config, positions, dtype, attend, op):
        ctx = super().context(cfg, positions, dtype, attend, op)
        return ctx._replace(attend=functools.partial(ctx.attend, window=cfg.sliding_window))

    def flops_per_token(self, cfg: Config, seq_len: int) -> float:
        """As LLaMA's, with the attention scores over at most ``sliding_window`` keys."""
        return super().flops_per_token(cfg, min(seq_len, cfg.sliding_window or seq_len))

    # -- HF
    def hf_config_fields(self, d: dict, *, source: str) -> dict:
        # transformers' MistralConfig: 4096 when the key is absent, no window when it is null.
        return {**super().hf_config_fields(d, source=source),
                "sliding_window": d.get("sliding_window", 4096)}

    def config_to_hf(self, cfg: Config, *, dtype_name: str) -> dict:
        d = super().config_to_hf(cfg, dtype_name=dtype_name)
        del d["attention_bias"], d["mlp_bias"]
        d["sliding_window"] = cfg.sliding_window
        return d


MISTRAL = F.register(Mistral())
