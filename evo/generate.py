"""Sampling text from a model: a pure function of params, prompts and seed."""
from __future__ import annotations

import torch

from evo import models


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
def generate(cfg, params: dict[str, torch.Tensor], prompts: list[list[int]],
             max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop_token: int | None = None
             ) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens (fewer when it samples
    ``stop_token``); returns only the new tokens of each.

    The prompts are left-padded into one batch and run once through the model; then every new
    token costs one step over a key/value cache (``models.decode``: the model's own blocks, with
    an attention over the cache). Temperature 0 is greedy. A row's tokens do not depend on the
    other rows: each row has its own random stream.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the "
                         f"model's max_seq_len={cfg.max_seq_len}")
    some = next(iter(params.values()))
    device, dtype = some.device, some.dtype
    b = len(prompts)
    gens = [torch.Generator().manual_seed(seed + 1_000_003 * r) for r in range(b)]
    tokens = torch.zeros(b, longest, dtype=torch.int64, device=device)
    valid = torch.zeros(b, longest, dtype=torch.bool, device=device)
    for r, p in enumerate(prompts):
        tokens[r, longest - len(p):] = torch.tensor(p, device=device)
        valid[r, longest - len(p):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    next_pos = positions[:, -1] + 1
    cache = models.init_cache(cfg, b, longest + max_new_tokens, dtype=dtype, device=device)
    logits, cache = models.decode(cfg, params, tokens, cache, positions=positions, valid=valid)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for n in range(max_new_tokens):
        probs = next_token_distribution(logits[:, -1], temperature=temperature, top_k=top_k,
                                        top_p=top_p).cpu()
        new = [int(torch.multinomial(probs[r], 1, generator=gens[r])) for r in range(b)]
        for r, t in enumerate(new):
            done[r] = done[r] or t == stop_token
            if not done[r]:
                out[r].append(t)
        if all(done) or n + 1 == max_new_tokens:
            break
        step = torch.tensor(new, device=device)[:, None]
        logits, cache = models.decode(cfg, params, step, cache, positions=next_pos[:, None])
        next_pos = next_pos + 1
    return out


def sample(cfg, params: dict[str, torch.Tensor], prompt: list[int],
           max_new_tokens: int, **kwargs) -> list[int]:
    """One prompt: ``generate`` with a batch of one."""
    return generate(cfg, params, [prompt], max_new_tokens, **kwargs)[0]


def load_for_generation(path: str, tokenizer: str | None = None, *, device=None):
    """(config, params, tokenizer) from a run directory, an evo checkpoint or an HF directory.
    The tokenizer is ``tokenizer`` when given, else the one the run was trained with (an HF
    directory's ``tokenizer.json``)."""
    import os

    from evo import checkpoint, data
    from evo.sharding import Plan
    from evo.sharding.mesh import Mesh
    if os.path.isfile(os.path.join(path, "config.json")):
        from evo import hf
        cfg, params = hf.load_hf(path)
        found = os.path.join(path, "tokenizer.json")
        spec = tokenizer or (found if os.path.isfile(found) else None)
    else:
        ckpt = checkpoint.resolve(path)
        index = checkpoint.read_index(ckpt)
        cfg = checkpoint.model_config(index, ckpt)
        params = checkpoint.load_params(ckpt, cfg, Mesh(Plan().resolve(1), 0), device=device)
        spec = tokenizer or index.get("meta", {}).get("tokenizer")
    if spec is None:
        raise ValueError(f"{path}: no tokenizer is recorded there; pass --tokenizer "
                         f"(byte, a tokenizers .json or a sentencepiece .model file)")
    tok = data.load_tokenizer(spec)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {spec!r} has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {cfg.vocab_size}")
    params = {k: v.to(device) for k, v in params.items()} if device is not None else params
    return cfg, params, tok
