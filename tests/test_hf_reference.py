"""Packed input and KV-cache decoding against transformers' LlamaForCausalLM.

- Packed rows (``cu_seqlens``): the logits of every document equal HF run on that document alone
  (positions restart, attention never crosses a boundary).
- KV-cache decoding: evo's ``llama.decode`` logits, step by step, equal HF's own cached forward
  (``past_key_values``), and ``evo.generate`` greedy equals ``LlamaForCausalLM.generate`` greedy,
  with left-padded prompts of different lengths in one batch.

fp32 on CPU, weights at the O(1)-activation scale of tests/test_hf.py: 1e-4 absolute on logits
of size O(1) (≈ 1000 fp32 ulps of summation-order and kernel differences).
"""
from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from evo import generate  # noqa: E402
from evo.models import llama  # noqa: E402
from test_hf import CONFIGS, random_params, reference_model  # noqa: E402

TOL = 1e-4


@pytest.mark.parametrize("name", ["gqa_untied", "tied", "rope_llama3"])
@pytest.mark.parametrize("rows, cu", [(1, [0, 7, 20, 21, 40]), (2, [0, 13, 20, 33, 40])])
def test_packed_documents_equal_hf_on_each_alone(name, rows, cu):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    model = reference_model(cfg, params)
    seq = 40 // rows
    tokens = torch.randint(0, cfg.vocab_size, (rows, seq),
                           generator=torch.Generator().manual_seed(3))
    got = llama.apply(cfg, params, tokens, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    flat_tokens, flat_logits = tokens.reshape(-1), got.reshape(-1, cfg.vocab_size)
    for a, b in zip(cu[:-1], cu[1:]):
        with torch.no_grad():
            want = model(flat_tokens[None, a:b]).logits[0]
        err = (flat_logits[a:b] - want).abs().max().item()
        assert err <= TOL, (name, (a, b), err)


@pytest.mark.parametrize("name", ["gqa_untied", "tied", "rope_llama3", "mha"])
def test_kv_cache_decoding_equals_hf_cached_forward(name):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    model = reference_model(cfg, params)
    seq = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    cache = llama.init_cache(cfg, 2, 20)
    past = transformers.DynamicCache()  # filled in place by each call
    # transformers 5 names the argument `cache`; 4.x `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"
    for a, b in ((0, 11), *((i, i + 1) for i in range(11, 20))):  # a prompt, then one at a time
        got, cache = llama.decode(cfg, params, seq[:, a:b], cache)
        with torch.no_grad():
            want = model(seq[:, a:b], use_cache=True, **{cache_arg: past}).logits
        assert past.get_seq_length() == b
        err = (got - want).abs().max().item()
        assert err <= TOL, (name, (a, b), err)


def test_greedy_generation_equals_hf_generate():
    cfg = CONFIGS["gqa_untied"]
    params = random_params(cfg)
    model = reference_model(cfg, params)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 70], [40, 41, 42, 43]]
    got = generate.generate(cfg, params, prompts, 10, temperature=0)
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = None  # HF stops at token 2 (LlamaConfig's eos) else
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                              do_sample=False, pad_token_id=0)
    assert got == want[:, longest:].tolist()
