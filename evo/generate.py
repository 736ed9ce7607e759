"""Sampling text from a model: a pure function of params, prompt and seed."""
from __future__ import annotations

import torch

from evo.models import llama


def next_token_distribution(logits: torch.Tensor, *, temperature: float = 1.0,
                            top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Probabilities ``[batch, vocab]`` fp32 from last-position logits ``[batch, vocab]``;
    temperature 0 is greedy (one-hot on the argmax)."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p   # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.no_grad()
def sample(cfg: llama.Config, params: dict[str, torch.Tensor], prompt: list[int],
           max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, stop_token: int | None = None) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens; returns only the new tokens.

    Recomputes the (at most ``cfg.max_seq_len``) context each step: simple and exact.
    """
    gen = torch.Generator().manual_seed(seed)
    device = params["embed"].device
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        ctx = torch.tensor([tokens[-cfg.max_seq_len:]], device=device)
        logits = llama.apply(cfg, params, ctx)[:, -1]
        probs = next_token_distribution(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        tok = int(torch.multinomial(probs.cpu(), 1, generator=gen))
        if tok == stop_token:
            break
        tokens.append(tok)
        out.append(tok)
    return out
