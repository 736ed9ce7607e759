"""Pure-function tests of evo.models.llama: packing, init/axes, remat, torch.func transforms,
bf16, and input validation. fp32 on CPU unless a test says otherwise."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from evo.models import llama
from evo_kernels.attention import positions_from_cu_seqlens

CFG = llama.Config(vocab_size=101, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                   intermediate_size=96, max_seq_len=64)


def random_params(cfg: llama.Config = CFG, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights at a scale that keeps activations O(1), so tolerances are meaningful."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in llama.param_specs(cfg).items():
        w = torch.randn(spec.shape, generator=g)
        out[name] = (1.0 + 0.1 * w if spec.init == "ones" else
                     w if name == "embed" else w / math.sqrt(spec.shape[0]))
    return out


def tokens(shape, seed: int = 1, cfg: llama.Config = CFG) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def lm_loss(cfg, params, tok, **kw) -> torch.Tensor:
    logits = llama.apply(cfg, params, tok, **kw)
    return F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), tok[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------
# Packed documents

def _boundaries(seed: int, aligned: bool) -> list[int]:
    """Random cu_seqlens over 2 rows x 32 tokens. aligned: 32 is a boundary (no document
    crosses rows); otherwise it is not, so one document spans the end of row 0 and the start of
    row 1 — allowed by the attention op, whose boundaries run over the flattened tokens."""
    g = torch.Generator().manual_seed(seed)
    inner = [c for c in torch.randperm(63, generator=g)[:5].add(1).tolist() if c != 32]
    return sorted({0, 64, *inner} | ({32} if aligned else set()))


@pytest.mark.parametrize("cu", [
    _boundaries(0, aligned=False),
    _boundaries(1, aligned=False),
    _boundaries(2, aligned=True),
    [0, 1, 20, 20, 32, 33, 64],       # a 1-token document, an empty one, aligned rows
    [0, 64],                          # one document across both rows
])
def test_packed_rows_equal_documents_run_alone(cu):
    cu_seqlens = torch.tensor(cu)
    params = random_params()
    tok = tokens((2, 32))
    positions = positions_from_cu_seqlens(cu_seqlens, 64).view(2, 32)
    with torch.no_grad():
        packed = llama.apply(CFG, params, tok, positions, cu_seqlens).reshape(64, -1)
        by_default = llama.apply(CFG, params, tok, cu_seqlens=cu_seqlens).reshape(64, -1)
        flat = tok.reshape(-1)
        for a, b in zip(cu, cu[1:]):
            if a == b:
                continue
            alone = llama.apply(CFG, params, flat[a:b][None])[0]
            assert (packed[a:b] - alone).abs().max().item() <= 1e-5, (a, b)
    assert torch.equal(packed, by_default)   # positions default to the ones cu_seqlens implies
    if 32 not in cu:
        assert positions[1, 0] > 0           # the crossing document keeps counting on row 1


# ---------------------------------------------------------------------------------------------
# init / axes

def test_axes_match_init():
    for cfg in (CFG, llama.Config(**{**CFG.__dict__, "tie_embeddings": True})):
        params, axes = llama.init(cfg, seed=0), llama.axes(cfg)
        assert list(axes) == list(params)
        assert ("lm_head" in params) is not cfg.tie_embeddings
        for k, t in params.items():
            assert len(axes[k]) == t.dim(), k
            assert all(isinstance(a, str) for a in axes[k]), k


def test_init_is_deterministic_and_per_param():
    a, b, c = llama.init(CFG, seed=0), llama.init(CFG, seed=0), llama.init(CFG, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.wqkv"], c["layers.0.attn.wqkv"])
    assert not torch.equal(a["layers.0.mlp.w1"], a["layers.1.mlp.w1"])
    for name in ("embed", "layers.1.attn.wo", "norm", "lm_head"):
        assert torch.equal(llama.init_param(CFG, name, 0), a[name]), name
    # output projections are scaled down by sqrt(2 * num_layers); norms start at one
    assert torch.equal(a["norm"], torch.ones(64))
    ratio = a["layers.0.mlp.w2"].std() / a["layers.0.mlp.w1"].std()
    assert abs(ratio.item() - 1 / math.sqrt(2 * CFG.num_layers)) < 0.05


def test_init_on_meta_allocates_nothing():
    big = llama.Config(vocab_size=128_000, hidden_size=8192, num_layers=80, num_heads=64,
                       num_kv_heads=8, intermediate_size=28672)
    params = llama.init(big, device="meta", dtype=torch.bfloat16)
    assert all(t.is_meta and t.dtype == torch.bfloat16 for t in params.values())
    assert {k: tuple(t.shape) for k, t in params.items()} == \
        {k: s.shape for k, s in llama.param_specs(big).items()}


# ---------------------------------------------------------------------------------------------
# Activation checkpointing

@pytest.mark.parametrize("remat", [1.0, 0.5])
def test_remat_matches_no_remat(remat):
    tok = tokens((2, 24))
    results = []
    for r in (0.0, remat):
        params = {k: v.requires_grad_() for k, v in random_params().items()}
        logits = llama.apply(CFG, params, tok, remat=r)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), tok[:, 1:].reshape(-1))
        results.append((logits.detach(), torch.autograd.grad(loss, list(params.values()))))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1):
        assert (a - b).abs().max().item() <= 1e-6


def test_remat_under_torch_func_grad():
    """Under torch.func, remat is skipped (its saved-tensor hooks are rejected): same gradients."""
    params, tok = random_params(), tokens((1, 16))
    g1 = grad(lambda p: lm_loss(CFG, p, tok, remat=1.0))(params)
    g0 = grad(lambda p: lm_loss(CFG, p, tok))(params)
    assert all(torch.equal(g1[k], g0[k]) for k in g0)


# ---------------------------------------------------------------------------------------------
# torch.func transforms

def test_func_grad_equals_autograd():
    params = random_params()
    tok = tokens((2, 24))
    g_func = grad(lambda p: lm_loss(CFG, p, tok))(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    g_auto = torch.autograd.grad(lm_loss(CFG, leaves, tok), list(leaves.values()))
    assert list(g_func) == list(params)
    for (k, a), b in zip(g_func.items(), g_auto):
        assert (a - b).abs().max().item() <= 1e-6, k


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_apply_over_token_batches_equals_loop():
    params = random_params()
    tok = tokens((3, 2, 16))                   # 3 independent [batch=2, seq=16] inputs
    with torch.no_grad():
        out = vmap(lambda t: llama.apply(CFG, params, t))(tok)
        loop = torch.stack([llama.apply(CFG, params, t) for t in tok])
    assert out.shape == (3, 2, 16, CFG.vocab_size)
    assert (out - loop).abs().max().item() <= 1e-5


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_grad_gives_per_example_gradients():
    params = random_params()
    tok = tokens((3, 1, 16))
    per_example = vmap(grad(lambda p, t: lm_loss(CFG, p, t)), in_dims=(None, 0))(params, tok)
    for i in range(3):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        ref = torch.autograd.grad(lm_loss(CFG, leaves, tok[i]), list(leaves.values()))
        for (k, g), r in zip(per_example.items(), ref):
            assert (g[i] - r).abs().max().item() <= 1e-5, (i, k)
    # the examples differ, so a broadcast of one gradient would fail the loop above
    assert not torch.allclose(per_example["embed"][0], per_example["embed"][1])


# ---------------------------------------------------------------------------------------------
# bf16

def test_bf16_params_close_to_fp32():
    """bf16 keeps 8 mantissa bits (rounding ~2e-3 relative per op). Through 2 layers of 64-wide
    matmuls, residual adds and softmax the errors compound to ~1e-2 of the logit scale; 5e-2 of
    the scale leaves headroom while still catching real mistakes (a wrong cast, rope computed
    from bf16 positions, norms not in fp32), which are O(1)."""
    params = random_params()
    tok = tokens((2, 32))
    with torch.no_grad():
        ref = llama.apply(CFG, params, tok)
        low = llama.apply(CFG, {k: v.bfloat16() for k, v in params.items()}, tok)
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= 5e-2
    assert (low.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the field / value

@pytest.mark.parametrize("change, field", [
    ({"num_heads": 7}, "num_heads"),                    # 7 does not divide hidden_size=64
    ({"num_kv_heads": 3}, "num_kv_heads"),              # 3 does not divide num_heads=8
    ({"vocab_size": -5}, "vocab_size"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"head_dim": 7}, "head.dim"),                      # odd: rotary pairs need an even dim
    ({"hidden_size": 72}, "head.dim"),                  # 72 / 8 heads = 9, odd
    ({"num_layers": 2.0}, "num_layers"),
])
def test_invalid_config(change, field):
    with pytest.raises(ValueError, match=field):
        llama.Config(**{**CFG.__dict__, **change})


@pytest.mark.parametrize("bad", [101, 5000, -1])
def test_token_outside_vocabulary(bad):
    tok = tokens((2, 8))
    tok[1, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad}\b.*vocabulary"):
        llama.apply(CFG, random_params(), tok)


@pytest.mark.parametrize("cu, message", [
    ([0, 20, 10, 32], r"non-decreasing.*cu_seqlens\[2\]=10"),
    ([0, 10, 30], r"end at batch\*seq=32"),
    ([0, 10, 40], r"end at batch\*seq=32"),
    ([3, 10, 32], r"start at 0"),
])
def test_bad_cu_seqlens(cu, message):
    with pytest.raises(ValueError, match=message):
        llama.apply(CFG, random_params(), tokens((2, 16)), cu_seqlens=torch.tensor(cu))
