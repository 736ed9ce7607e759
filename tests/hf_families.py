"""Tiny random transformers models of every family evo reads, saved as HF directories: the
independent references the family tests compare against.

Each model is built by transformers from its own config class (not through evo), then every
tensor is redrawn so that it matters: matrices (and stacked expert matrices) ~ N(0, 1/fan_in)
(activations and logits O(1), so a 1e-4 absolute tolerance is a real check), embeddings
~ N(0, 0.1²) (logits O(1) when the output projection is the embedding), norm weights
~ U(0.5, 1.5) (away from 1), biases ~ N(0, 0.5²) (away from 0). ``save`` writes ``config.json`` + ``model.safetensors``
with ``save_pretrained`` and a word-level ``tokenizer.json`` whose token ``i`` is spelled ``w{i}``,
so that ``evo generate DIR`` runs on it and its text maps back to token ids.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 96
SEQ = 24            # test sequences; longer than Mistral's window below
WINDOW = 5          # Mistral's sliding_window: shorter than SEQ and than the packed documents
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-6, attn_implementation="eager")
# original_max_position_embeddings=8 puts llama3's blend band (wavelengths 2..8) and its
# divided-by-factor band (> 8) inside a 24-token sequence, so the scaling changes the logits.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def _config(name: str):
    """The transformers config of fixture ``name`` (see ``NAMES``)."""
    if name in ("llama3_untied", "llama3_tied"):
        return transformers.LlamaConfig(**_COMMON, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                                        tie_word_embeddings=name == "llama3_tied")
    if name == "qwen2":
        return transformers.Qwen2Config(**_COMMON, rope_theta=1000000.0, tie_word_embeddings=True,
                                        use_sliding_window=False)
    if name == "qwen3":      # head_dim 12 while hidden / heads = 8
        return transformers.Qwen3Config(**_COMMON, head_dim=12, rope_theta=1000000.0,
                                        tie_word_embeddings=False, attention_bias=False)
    if name == "mistral":
        return transformers.MistralConfig(**_COMMON, sliding_window=WINDOW, rope_theta=10000.0,
                                          tie_word_embeddings=False)
    if name == "mixtral":    # every layer MoE: 4 experts, top-2, renormalised
        return transformers.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2,
                                          rope_theta=1000000.0, tie_word_embeddings=False)
    if name == "qwen2_moe":  # layer 0 dense (mlp_only_layers); a gated shared expert; no renorm
        return transformers.Qwen2MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=24,
                                           shared_expert_intermediate_size=40,
                                           norm_topk_prob=False, mlp_only_layers=[0],
                                           rope_theta=1000000.0, tie_word_embeddings=False,
                                           use_sliding_window=False)
    if name == "qwen3_moe":  # layer 0 dense (decoder_sparse_step 2); renormalised; head_dim 12
        return transformers.Qwen3MoeConfig(**_COMMON, head_dim=12, num_experts=4,
                                           num_experts_per_tok=2, moe_intermediate_size=24,
                                           norm_topk_prob=True, decoder_sparse_step=2,
                                           rope_theta=1000000.0, tie_word_embeddings=False)
    raise KeyError(name)


NAMES = ("llama3_untied", "llama3_tied", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe",
         "qwen3_moe")
FAMILY = {"llama3_untied": "llama", "llama3_tied": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
          "mistral": "mistral", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe",
          "qwen3_moe": "qwen3_moe"}     # fixture -> the evo family that reads it


def model(name: str, seed: int = 0):
    """Fixture ``name`` as a transformers model in eval mode, fp32, every tensor redrawn."""
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(_config(name)).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in m.named_parameters():     # tied weights are listed once
            if pname.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif pname.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return m


def save_tokenizer(out_dir: str | Path, vocab_size: int = VOCAB) -> None:
    """A word-level ``tokenizer.json``: token ``i`` is the word ``w{i}``, words split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(Path(out_dir) / "tokenizer.json"))


def save(name: str, out_dir: str | Path, seed: int = 0):
    """Fixture ``name`` saved with ``save_pretrained`` (safetensors) and a tokenizer into
    ``out_dir``; returns the model."""
    m = model(name, seed)
    m.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(out_dir, m.config.vocab_size)
    return m


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def greedy(m, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy ``generate``: the new tokens only, never stopping early."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()
