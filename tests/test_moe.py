"""Mixture of experts: the router, dispatch by sort, the ``Regions.experts`` hook, grouped GEMM,
against hand-written per-token references in fp64/fp32 on CPU."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as TF

from evo import models, optim, train
from evo.models import moe
from evo.models.layers import Regions
from evo_kernels.grouped import grouped_mm, grouped_mm_loop

D, F, E, K = 8, 12, 6, 2


def _layer_params(seed: int = 0, shared: bool = False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype) / math.sqrt(s[-2])
    p = {"moe.router": r(D, E), "moe.w1": r(E, D, F), "moe.w3": r(E, D, F),
         "moe.w2": r(E, F, D)}
    if shared:
        p.update({"moe.shared.w1": r(D, 16), "moe.shared.w3": r(D, 16),
                  "moe.shared.w2": r(16, D), "moe.shared_gate": r(D, 1)})
    return p


def _cfg(**kw):
    base = dict(top_k=K, score_func="softmax", norm_topk_prob=True, capacity_factor=None)
    return SimpleNamespace(**{**base, **kw})


def _reference(cfg, p, h, bias=None):
    """Token by token: scores, the top-k (by score + bias), each chosen expert's MLP."""
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        logits = h[t] @ p["moe.router"]
        s = torch.softmax(logits, -1) if cfg.score_func == "softmax" else torch.sigmoid(logits)
        chosen = torch.topk(s + (0 if bias is None else bias), cfg.top_k).indices
        w = s[chosen] / (s[chosen].sum() if cfg.norm_topk_prob else 1)
        for j, e in enumerate(chosen.tolist()):
            y = (TF.silu(h[t] @ p["moe.w1"][e]) * (h[t] @ p["moe.w3"][e])) @ p["moe.w2"][e]
            out[t] += w[j] * y
        if "moe.shared.w1" in p:
            y = (TF.silu(h[t] @ p["moe.shared.w1"]) * (h[t] @ p["moe.shared.w3"])) \
                @ p["moe.shared.w2"]
            out[t] += torch.sigmoid(h[t] @ p["moe.shared_gate"]) * y
    return out


@pytest.mark.parametrize("score_func,norm,shared", [("softmax", True, False),
                                                    ("softmax", False, True),
                                                    ("sigmoid", True, False)])
def test_moe_mlp_equals_per_token_reference(score_func, norm, shared):
    cfg, p = _cfg(score_func=score_func, norm_topk_prob=norm), _layer_params(shared=shared)
    h = torch.randn(2, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bias = torch.linspace(-0.3, 0.3, E, dtype=torch.float64)
    for b in (None, bias):
        out, stats = moe.moe_mlp(cfg, p, h, bias=b)
        ref = _reference(cfg, p, h.reshape(-1, D), b).view(2, 7, D)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)   # fp64
        assert stats.load.sum() == 14 * K and stats.dropped == 0


class _Recording(Regions):
    """Records what the experts hook receives, and runs the experts in two halves as an
    expert-parallel layout would (each half with ``fn`` bound to that half's weights)."""

    def __init__(self, p):
        self.p, self.calls = p, []

    def experts(self, x_sorted, counts, fn):
        self.calls.append((x_sorted, counts, fn))
        half = counts.numel() // 2
        n0 = int(counts[:half].sum())
        parts = []
        for sl, rows in ((slice(0, half), x_sorted[:n0]), (slice(half, None), x_sorted[n0:])):
            local = functools.partial(moe.swiglu_experts, self.p["moe.w1"][sl],
                                      self.p["moe.w3"][sl], self.p["moe.w2"][sl])
            parts.append(local(rows, counts[sl]))
        return torch.cat(parts)


def test_experts_hook_receives_rows_sorted_by_expert():
    """The interface of ``Regions.experts``: x_sorted groups the routed copies by expert id,
    counts [E] int64 sums to tokens·k, and fn(x, counts) runs them; running the experts in two
    local halves (fn bound to each half's weights) gives the layer's output."""
    cfg, p = _cfg(), _layer_params()
    h = torch.randn(3, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    regions = _Recording(p)
    out, _ = moe.moe_mlp(cfg, p, h, regions)
    ((x_sorted, counts, fn),) = regions.calls
    assert counts.dtype == torch.int64 and counts.shape == (E,) and int(counts.sum()) == 15 * K
    flat = h.reshape(-1, D)
    idx = torch.topk(torch.softmax(flat @ p["moe.router"], -1), K).indices
    start = 0
    for e, c in enumerate(counts.tolist()):     # expert e's rows: its tokens, in token order
        tokens = (idx == e).any(-1).nonzero().flatten()
        torch.testing.assert_close(x_sorted[start:start + c], flat[tokens], rtol=0, atol=0)
        start += c
    torch.testing.assert_close(fn(x_sorted, counts), regions.experts(x_sorted, counts, fn))
    ref, _ = moe.moe_mlp(cfg, p, h)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_capacity_drops_the_latest_tokens_and_counts_them():
    """Capacity c: expert e keeps its first ceil(c·T·k/E) pairs in token order; the dropped pairs
    contribute nothing and are counted."""
    cfg, p = _cfg(capacity_factor=0.5), _layer_params()
    h = torch.randn(1, 12, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out, stats = moe.moe_mlp(cfg, p, h)
    cap = math.ceil(0.5 * 12 * K / E)
    flat = h[0]
    s = torch.softmax(flat @ p["moe.router"], -1)
    idx = torch.topk(s, K).indices
    ref = torch.zeros_like(flat)
    seen = [0] * E
    for t in range(12):
        w = s[t, idx[t]] / s[t, idx[t]].sum()
        for j, e in enumerate(idx[t].tolist()):
            seen[e] += 1
            if seen[e] <= cap:
                x = flat[t]
                ref[t] += w[j] * ((TF.silu(x @ p["moe.w1"][e]) * (x @ p["moe.w3"][e]))
                                  @ p["moe.w2"][e])
    torch.testing.assert_close(out[0], ref, rtol=1e-12, atol=1e-12)
    assert stats.dropped == sum(max(n - cap, 0) for n in seen) > 0


@pytest.mark.parametrize("backend", ["grouped", "loop"])
def test_grouped_mm_equals_per_expert_matmuls(backend):
    """Both implementations against x_g @ w[g] row by row, with an empty group; gradients too.
    fp32: one matmul each, so equal to a few ulps (1e-5 relative)."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 8, generator=g, requires_grad=True)
    w = torch.randn(4, 8, 4, generator=g, requires_grad=True)
    y = grouped_mm(x, w, counts, backend)
    expert = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.stack([x[r] @ w[expert[r]] for r in range(9)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref.sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped_mm_loop(x, w, counts), y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The training step: the balancing loss, recomputation, the balancing bias, bad configs


TINY = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=8,
            num_experts=4, top_k=2)


def _batch(seed=0, micro=2, seq=12, vocab=64):
    tok = torch.randint(0, vocab, (micro, 1, seq), generator=torch.Generator().manual_seed(seed))
    labels = torch.roll(tok, -1, -1)
    labels[..., -1] = -100
    return {"tokens": tok, "labels": labels}


def test_step_gradient_is_cross_entropy_plus_the_balancing_loss():
    """The step's gradient against a hand-written objective over the micro-batches, (Σ CE +
    coef · Σ_micro Σ_layers balance) / labelled tokens, with every layer recomputed in backward
    (a recomputed layer's second report must not count): fp64 but for the step's fp32 1/tokens
    factor (rounding 6e-8), so 1e-6 relative."""
    cfg = models.mixtral.Config(**TINY, aux_loss_coef=0.3)
    params = {k: v.double() for k, v in models.init(cfg, seed=1).items()}
    batch = _batch()
    step = train.Step(cfg, optim.adamw(lr=1e-3), compute_dtype=torch.float64, remat=1.0)
    grads, aux = step.grads(params, batch)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    total, n, balance = 0, (batch["labels"] != -100).sum(), 0
    for tok, lab in zip(batch["tokens"], batch["labels"]):
        routing = moe.Routing()
        logits = models.forward(cfg, leaves, tok, routing=routing)
        b = sum(s.balance for s in routing.stats.values())
        assert len(routing.stats) == 2
        total = total + TF.cross_entropy(logits.reshape(-1, 64), lab.reshape(-1),
                                         reduction="sum") + 0.3 * b
        balance = balance + b.detach()
    ref = dict(zip(leaves, torch.autograd.grad(total / n, list(leaves.values()))))
    for k in params:
        scale = ref[k].abs().max().clamp(min=1e-30)
        assert (grads[k] - ref[k]).abs().max() / scale <= 1e-6, k
    torch.testing.assert_close(aux["aux_loss"], (balance / n / 2).float(), rtol=1e-6, atol=0)
    assert aux["expert_load"].sum() == 2 * 2 * 12 * 2      # layers · micro · tokens · k
    # the coefficient matters: without it the router's gradient differs
    g0, _ = dataclasses.replace(step, model=dataclasses.replace(cfg, aux_loss_coef=0.0)).grads(
        params, batch)
    assert (g0["layers.0.moe.router"] - grads["layers.0.moe.router"]).abs().max() > 1e-6


def test_balance_loss_is_the_switch_formula():
    """Stats.balance of one layer: E · Σ_e f_e · Σ_t p_te from the router's softmax (f_e the
    fraction of the T·k pairs routed to e); 1 per token for a uniform router."""
    cfg, p = _cfg(), _layer_params()
    h = torch.randn(2, 9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    _, stats = moe.moe_mlp(cfg, p, h)
    s = torch.softmax(h.reshape(-1, D) @ p["moe.router"], -1)
    f = torch.bincount(torch.topk(s, K).indices.flatten(), minlength=E).double() / (18 * K)
    torch.testing.assert_close(stats.balance, E * (f * s.sum(0)).sum(), rtol=1e-12, atol=0)
    p_uniform = {**p, "moe.router": torch.zeros(D, E, dtype=torch.float64)}
    _, stats = moe.moe_mlp(cfg, p_uniform, h)
    torch.testing.assert_close(stats.balance, torch.tensor(18.0, dtype=torch.float64))


def skewed_run(rate: float, steps: int = 30) -> list[float]:
    """A skewed synthetic routing task: one MoE layer of 8 experts (top-2) over 64 random tokens
    a step, whose embeddings share a common direction (+1) that the router's first column
    follows, so expert 0 takes most tokens; the weights frozen (lr 0), so only the balancing bias
    (``bias_update_rate``) acts. max/mean expert load of each step."""
    cfg = models.mixtral.Config(**{**TINY, "num_layers": 1, "num_experts": 8},
                                bias_update_rate=rate)
    params = models.init(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    params["embed"] = torch.randn(64, 16, generator=g) + 1.0
    params["layers.0.moe.router"] = torch.randn(16, 8, generator=g) / 4
    params["layers.0.moe.router"][:, 0] += 2.0 / 16
    step = train.Step(cfg, optim.adamw(lr=0.0))
    state, out = train.init_state(params, step.optimizer), []
    for i in range(steps):
        state, m = step(state, _batch(seed=i, micro=1, seq=64))
        load = m["expert_load"][0]
        out.append((load.max() / load.mean()).item())
    return out


def test_loss_free_balancing_flattens_a_skewed_router():
    """Without the bias the load stays skewed (max/mean ≈ 2.8 every step); with it (rate 0.01)
    the last 10 steps average below 0.7 of that (measured ≈ 1.6 vs 2.8; docs/models.md)."""
    without, with_bias = skewed_run(0.0), skewed_run(0.01)
    assert without[0] == with_bias[0]            # the first step has no bias yet
    assert min(without) > 2.2
    mean = lambda xs: sum(xs) / len(xs)          # noqa: E731
    assert mean(with_bias[-10:]) < 0.7 * mean(without[-10:])


@pytest.mark.parametrize("change, field", [
    ({"top_k": 5}, "top_k"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"capacity_factor": -1.0}, "capacity_factor"),
    ({"score_func": "relu"}, "score_func"),
    ({"shared_expert_gate": True}, "shared_expert_gate"),
    ({"dense_layers": (2,)}, "dense_layers"),
])
def test_bad_moe_config_is_one_error_naming_the_field(change, field):
    with pytest.raises(ValueError, match=rf"Config\.{field}"):
        models.mixtral.Config(**{**TINY, **change})


def test_flops_per_token_count_the_activated_experts():
    """6·N_active + 12·L·(H·D)·s, N_active without the input embedding and with top_k of the E
    experts of each MoE layer (by hand: 2 layers, the first dense)."""
    cfg = models.qwen_moe.Qwen3MoeConfig(**TINY, moe_intermediate_size=6, first_k_dense=1)
    h, f, e, k = 16, 6, 4, 2
    layer_attn = 16 + 16 * (2 + 2 * 2) * 8 + 2 * 8 * 16 + 16 + 2 * 8   # norms, wqkv, wo, q/k norms
    dense = layer_attn + 3 * 16 * 8
    active_moe = layer_attn + 16 * e + k * 3 * h * f
    n_active = dense + active_moe + 16 + 16 * 64                        # final norm, lm_head
    assert models.flops_per_token(cfg, 10) == 6 * n_active + 12 * 2 * (2 * 8) * 10


def test_moe_metrics_reach_metrics_jsonl_and_tensorboard(tmp_path):
    """A two-step run with a capacity (so pairs drop): every record has, under ``moe``, each MoE
    layer's max/mean expert load (in [1, E]), the dropped pairs and the balancing loss;
    TensorBoard has them as train/moe/...."""
    import io
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from evo import Experiment, Plan, data, run
    g = torch.Generator().manual_seed(0)
    os.makedirs(tmp_path / "train")
    docs = [torch.randint(1, 64, (int(n),), generator=g).tolist()
            for n in torch.randint(5, 60, (40,), generator=g)]
    data.write_bin(str(tmp_path / "train" / "part.bin"), docs)
    cfg = models.mixtral.Config(**TINY, capacity_factor=0.5, aux_loss_coef=0.01)
    exp = Experiment(model=cfg, data=data.Packed(folder=str(tmp_path / "train"), seq_len=32,
                                                 micro_batch=2, micro_num=2),
                     optimizer=optim.adamw(lr=1e-2), plan=Plan(), steps=2, log_every=1,
                     run_dir=str(tmp_path / "run"))
    run.run(exp, stream=io.StringIO())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        ratios = r["moe"]["expert_load_max_over_mean"]
        assert set(ratios) == {"layer_0", "layer_1"}
        assert all(1.0 <= v <= 4 for v in ratios.values())
        assert 0 < r["moe"]["dropped_tokens"] < 2 * 2 * 2 * 32 * 2     # layers·micro·rows·k
        assert 0.5 < r["moe"]["aux_loss"] < 4         # 1 for a uniform router, E at most
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert {"train/moe/expert_load_max_over_mean/layer_0", "train/moe/dropped_tokens",
            "train/moe/aux_loss"} <= set(acc.Tags()["scalars"])


def test_hf_export_refuses_what_the_hf_format_cannot_say():
    """A balancing bias, a sigmoid router, Mixtral with dense layers: one error naming the field."""
    from evo import hf
    for cfg, field in [(models.mixtral.Config(**TINY, bias_update_rate=0.01), "bias_update_rate"),
                       (models.qwen_moe.Qwen3MoeConfig(**TINY, score_func="sigmoid"),
                        "score_func"),
                       (models.mixtral.Config(**TINY, first_k_dense=1), "first_k_dense")]:
        with pytest.raises(ValueError, match=field):
            hf.config_to_hf(cfg)
