"""evo.optim against torch.optim.AdamW + clip_grad_norm_, hand-written schedule formulas, and the
skip / purity rules.

Tolerances (fp32): params vs torch 1e-6 max abs (params O(1), lr <= 1e-2); moments vs torch 1e-7;
evo's pure and in-place forms, and int vs tensor steps, are compared bitwise.
"""
import math

import optree
import pytest
import torch

from evo import optim
from evo.optim import AdamState, AdamW, Beta2Schedule, Constant, WarmupCosine

LR = optim.warmup_cosine(peak=1e-2, warmup=3, floor=1e-3, total_steps=8, init_steps=1)


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"embed": (10, 4), "layers.0.wqkv": (4, 12), "layers.0.norm": (4,), "head.bias": (10,)}
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def _grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    scale = 1.0 if step % 2 else 0.01  # odd steps get clipped (norm ~ 9 > 1), even steps do not
    return {k: scale * torch.randn(p.shape, generator=gen) for k, p in params.items()}


def _torch_run(params, opt: AdamW, steps):
    """torch.optim.AdamW, one param group per decay setting, lr and betas set before each step."""
    ps = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    groups = [{"params": [p for k, p in ps.items() if opt.decay_mask(k, p)], "weight_decay": opt.weight_decay},
              {"params": [p for k, p in ps.items() if not opt.decay_mask(k, p)], "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(groups, lr=0.0, eps=opt.eps)
    norms = []
    for t in range(steps):
        for k, g in _grads(params, t).items():
            ps[k].grad = g
        norms.append(torch.nn.utils.clip_grad_norm_(list(ps.values()), opt.clip_norm))
        b2 = opt.b2(t) if callable(opt.b2) else opt.b2
        for group in torch_opt.param_groups:
            group["lr"], group["betas"] = opt.lr(t), (opt.b1, b2)
        torch_opt.step()
    return ps, torch_opt.state, norms


def _evo_run(params, opt: AdamW, steps, inplace, tensor_step=False):
    params = {k: p.clone() for k, p in params.items()}
    state = opt.init(params)
    infos = []
    for t in range(steps):
        step = torch.tensor(t) if tensor_step else t
        params, state, info = opt.update(_grads(params, t), state, params, step, inplace=inplace)
        infos.append(info)
    return params, state, infos


@pytest.mark.parametrize("b2", [0.95, Beta2Schedule(init=0.3, c=0.8)], ids=["b2_const", "b2_sched"])
@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
def test_matches_torch_adamw(inplace, b2):
    opt = optim.adamw(LR, b2=b2, weight_decay=0.1, clip_norm=1.0)
    assert [k for k, p in _params().items() if not opt.decay_mask(k, p)] == ["layers.0.norm", "head.bias"]
    ref, ref_state, ref_norms = _torch_run(_params(), opt, 10)
    got, state, infos = _evo_run(_params(), opt, 10, inplace)

    for k, p in ref.items():
        assert (got[k] - p.detach()).abs().max() <= 1e-6, k
        assert (state.mu[k] - ref_state[p]["exp_avg"]).abs().max() <= 1e-7, k
        assert (state.nu[k] - ref_state[p]["exp_avg_sq"]).abs().max() <= 1e-7, k
    assert int(state.count) == 10 and int(state.skipped) == 0
    for t, info in enumerate(infos):
        assert torch.equal(info["grad_norm"], ref_norms[t])  # same foreach-norm reduction as torch
        assert info["lr"].dtype == torch.float32 and info["lr"] == torch.tensor(LR(t))
        assert info["skipped"].item() is False
    assert infos[0]["lr"] == 0.0 and infos[1]["lr"] == torch.tensor(LR.peak / 3)  # init_steps, 1st warmup


def test_inplace_is_bitwise_the_pure_form_and_donates():
    opt = optim.adamw(LR, b2=Beta2Schedule(init=0.3), weight_decay=0.1)
    pure, pure_state, _ = _evo_run(_params(), opt, 10, inplace=False)
    donated, donated_state, _ = _evo_run(_params(), opt, 10, inplace=True)
    for k in pure:
        assert torch.equal(pure[k], donated[k])
        assert torch.equal(pure_state.mu[k], donated_state.mu[k])
        assert torch.equal(pure_state.nu[k], donated_state.nu[k])

    params = _params()
    state = opt.init(params)
    buffers = [*params.values(), *state.mu.values(), *state.nu.values(), state.count]
    new_params, new_state, _ = opt.update(_grads(params, 1), state, params, 1, inplace=True)
    assert new_params is params and new_state.mu is state.mu and new_state.nu is state.nu
    assert all(a is b for a, b in zip(buffers, [*new_params.values(), *new_state.mu.values(),
                                                 *new_state.nu.values(), new_state.count]))
    assert int(state.count) == 1


def test_tensor_step_gives_the_same_update_as_int_step():
    opt = optim.adamw(LR, b2=Beta2Schedule(init=0.3), weight_decay=0.1)
    a, sa, ia = _evo_run(_params(), opt, 10, inplace=False)
    b, sb, ib = _evo_run(_params(), opt, 10, inplace=False, tensor_step=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x["lr"], y["lr"]) for x, y in zip(ia, ib))


def _ref_warmup_cosine(t, peak, warmup_steps, floor, total, init):
    if t < init:
        return 0.0
    if t < init + warmup_steps:
        return peak * (t + 1 - init) / warmup_steps
    decay = total - init - warmup_steps
    k = min(t - init - warmup_steps, decay)
    return floor + (peak - floor) * (1 + math.cos(math.pi * k / decay)) / 2


@pytest.mark.parametrize("warmup", [0.1, 10], ids=["ratio", "count"])
def test_warmup_cosine_values(warmup):
    sched = optim.warmup_cosine(peak=3e-4, warmup=warmup, floor=3e-5, total_steps=100, init_steps=5)
    assert sched.warmup_steps == 10
    steps = [0, 4, 5, 6, 14, 15, 16, 50, 99, 100, 101, 10_000]
    for t in steps:
        want = _ref_warmup_cosine(t, 3e-4, 10, 3e-5, 100, 5)
        assert sched(t) == pytest.approx(want, rel=1e-12, abs=1e-18), t
        got = sched(torch.tensor(t))
        assert got.dtype == torch.float32 and got.shape == ()
        assert torch.equal(got, torch.tensor(sched(t), dtype=torch.float32)), t
    assert sched(4) == 0.0 and sched(5) == pytest.approx(3e-5, rel=1e-15)  # init_steps, 1st warmup step
    assert sched(14) == sched(15) == 3e-4            # end of warmup, start of the cosine
    assert sched(100) == sched(10_000) == 3e-5       # floor from total_steps on


def test_warmup_cosine_needs_total_steps():
    sched = optim.warmup_cosine(peak=1.0, warmup=0.01)
    for unfilled in [sched, optim.warmup_cosine(peak=1.0, warmup=10)]:
        with pytest.raises(ValueError, match="total_steps is None"):
            unfilled(0)
    filled = sched.with_total_steps(1000)
    assert filled == WarmupCosine(peak=1.0, warmup=0.01, total_steps=1000) and filled.warmup_steps == 10
    assert filled(0) == 0.1
    opt = optim.adamw(sched).with_total_steps(1000)
    assert opt.lr == filled and opt.with_total_steps(5) == opt  # fills only a None
    assert optim.warmup_cosine(peak=2.0, total_steps=10)(0) == 2.0  # no warmup: peak at once
    assert Constant(0.5)(3) == 0.5 and torch.equal(Constant(0.5)(torch.tensor(3)), torch.tensor(0.5))


def test_beta2_schedule():
    sched = Beta2Schedule(init=0.95, c=0.8)
    for t in [0, 1, 2, 42, 43, 100, 10_000]:
        want = 0.95 if t == 0 else max(0.95, 1 - t ** -0.8)  # InternEvo: max(init, 1 - t^-c)
        assert sched(t) == pytest.approx(want, rel=1e-15), t
        assert torch.equal(sched(torch.tensor(t)), torch.tensor(sched(t), dtype=torch.float32))
    assert sched(42) == 0.95 and sched(43) > 0.95
    assert sched(100) == pytest.approx(0.974881, abs=1e-6)
    assert Beta2Schedule(init=0.9, c=0.0)(1000) == 0.9


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
def test_nonfinite_grad_skips_the_step(inplace, bad):
    opt = optim.adamw(1e-2, weight_decay=0.1)
    params = _params()
    params, state, _ = opt.update(_grads(params, 1), opt.init(params), params, 0)
    before = optree.tree_map(torch.clone, (params, state))

    grads = _grads(params, 2)
    grads["layers.0.norm"][1] = bad
    new_params, new_state, info = opt.update(grads, state, params, 1, inplace=inplace)
    assert info["skipped"].item() is True and not torch.isfinite(info["grad_norm"])
    assert int(new_state.skipped) == 1 and int(new_state.count) == 1
    for k in params:
        assert torch.equal(new_params[k], before[0][k])
        assert torch.equal(new_state.mu[k], before[1].mu[k]) and torch.equal(new_state.nu[k], before[1].nu[k])

    # The next finite step proceeds exactly as if the bad one never happened (but for `skipped`).
    after, after_state, info = opt.update(_grads(params, 3), new_state, new_params, 2)
    direct, direct_state, _ = opt.update(_grads(params, 3), before[1], before[0], 2)
    assert info["skipped"].item() is False and int(after_state.count) == 2 and int(after_state.skipped) == 1
    assert all(torch.equal(after[k], direct[k]) and not torch.equal(after[k], before[0][k]) for k in params)


def test_pure_update_leaves_inputs_untouched_and_repeats():
    opt = optim.adamw(LR, b2=Beta2Schedule(init=0.3), weight_decay=0.1)
    params = _params()
    params, state, _ = opt.update(_grads(params, 1), opt.init(params), params, 1)
    grads = _grads(params, 3)  # clipped: checks clipping does not write into grads
    inputs = (grads, state, params)
    copies = optree.tree_map(torch.clone, inputs)
    first = opt.update(*inputs, 4)
    second = opt.update(*inputs, 4)
    assert optree.tree_all(optree.tree_map(torch.equal, inputs, copies))
    assert optree.tree_all(optree.tree_map(torch.equal, first, second))
    assert not torch.equal(first[0]["embed"], params["embed"])


def test_state_is_a_pytree():
    opt = optim.adamw(1e-3)
    state = opt.init(_params())
    assert isinstance(state, AdamState) and state.count.dtype == torch.int64 and state.count.shape == ()
    leaves, _ = torch.utils._pytree.tree_flatten(state)
    assert len(leaves) == 2 + 2 * 4 and len(optree.tree_leaves(state)) == 10
    assert all(state.mu[k].dtype == torch.float32 and not state.mu[k].any() for k in state.mu)


def test_config_is_a_comparable_value():
    a = optim.adamw(LR, weight_decay=0.1)
    assert a == AdamW(lr=LR, weight_decay=0.1) and a != AdamW(lr=LR) and hash(a) == hash(AdamW(lr=LR, weight_decay=0.1))
    assert "WarmupCosine(peak=0.01" in repr(a)
    with pytest.raises(AttributeError):
        a.lr = 1.0


@pytest.mark.parametrize("make, field", [
    (lambda: AdamW(lr=-1e-3), "AdamW.lr"),
    (lambda: AdamW(lr=1e-3, b1=1.0), "AdamW.b1"),
    (lambda: AdamW(lr=1e-3, b2=-0.1), "AdamW.b2"),
    (lambda: AdamW(lr=1e-3, eps=0.0), "AdamW.eps"),
    (lambda: AdamW(lr=1e-3, weight_decay=-0.1), "AdamW.weight_decay"),
    (lambda: AdamW(lr=1e-3, clip_norm=0.0), "AdamW.clip_norm"),
    (lambda: WarmupCosine(peak=-1.0), "WarmupCosine.peak"),
    (lambda: WarmupCosine(peak=1.0, floor=2.0), "WarmupCosine.floor"),
    (lambda: WarmupCosine(peak=1.0, warmup=2.5), "WarmupCosine.warmup"),
    (lambda: WarmupCosine(peak=1.0, init_steps=-1), "WarmupCosine.init_steps"),
    (lambda: WarmupCosine(peak=1.0, warmup=10, total_steps=5), "WarmupCosine.total_steps"),
    (lambda: Beta2Schedule(init=1.0), "Beta2Schedule.init"),
    (lambda: Beta2Schedule(c=-1.0), "Beta2Schedule.c"),
])
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_grads_must_match_params():
    opt = optim.adamw(1e-3)
    params = _params()
    state = opt.init(params)
    grads = _grads(params, 0)
    del grads["embed"]
    grads["extra"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing: \['embed'\], extra: \['extra'\]"):
        opt.update(grads, state, params, 0)
    grads = {k: g.double() for k, g in _grads(params, 0).items()}
    with pytest.raises(ValueError, match="grads\\['embed'\\] is torch.float64"):
        opt.update(grads, state, params, 0)
    with pytest.raises(ValueError, match="step"):
        opt.update(_grads(params, 0), state, params, -1)


def test_schedules_trace_without_graph_breaks():
    lr, b2 = optim.warmup_cosine(3e-4, warmup=0.1, floor=3e-5, total_steps=100, init_steps=5), Beta2Schedule()
    traced = torch.compile(lambda t: torch.stack([lr(t), b2(t)]), fullgraph=True, backend="eager")
    for t in [0, 7, 60, 200]:
        assert torch.equal(traced(torch.tensor(t)), torch.tensor([lr(t), b2(t)], dtype=torch.float32))


def test_params_of_one_floating_dtype():
    opt = optim.adamw(LR, weight_decay=0.1)
    p64 = {k: p.double() for k, p in _params().items()}
    new, state, _ = opt.update({k: g.double() for k, g in _grads(p64, 1).items()}, opt.init(p64), p64, 2)
    assert all(new[k].dtype == state.mu[k].dtype == torch.float64 for k in new)
    with pytest.raises(ValueError, match="one floating dtype"):
        opt.init({**_params(), "embed": torch.zeros(10, 4, dtype=torch.bfloat16)})
