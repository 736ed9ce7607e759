"""Every plan computes the same function: the equivalence sweep (CPU, gloo, 4 processes).

One torchrun launch of tests/sweep_worker.py runs every plan (2-process plans on the first two
ranks) against the single-process step on the same global batches, 3 steps each.

Tolerances (fp32): losses 1e-5 relative. Final params: 1e-5 in relative L2 norm per tensor, and
1e-4 in max elementwise difference relative to the tensor's largest entry — AdamW divides by
sqrt(v), so a gradient component near zero turns an fp32 rounding difference (from summing
partial results in another order) into a visible difference of that one element.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from evo.models import llama
from evo.sharding import Plan, planner
from evo.sharding.layout import model_layouts
from evo.sharding.mesh import coords, members

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                        "--standalone", os.path.join(HERE, "sweep_worker.py"), str(out)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_plan_equals_one_process(sweep):
    from sweep_worker import PLANS
    assert set(sweep["plans"]) == {name for name, _, _ in PLANS}
    worst = {}
    for name, r in sweep["plans"].items():
        assert r["loss_rel"] <= 1e-5, (name, r["losses"])
        assert r["param_norm_rel"] <= 1e-5, (name, r["param_norm_rel"])
        assert r["param_rel"] <= 1e-4, (name, r["param_rel"], r["worst"])
        assert r["func_grad_rel"] <= 1e-6, (name, r["func_grad_rel"])  # same math, same order
        assert r["source_loss_rel"] <= 1e-5, (name, r["source_loss_rel"])  # per-source loss
        worst[name] = (r["loss_rel"], r["param_norm_rel"], r["param_rel"])
    print("largest relative differences (loss, params L2, params max):", worst)


def test_zero3_state_per_rank_is_a_shard(sweep):
    """ZeRO-3 on n ranks: params + optimizer state per rank ≤ single/n + 5 %; tp halves (or
    quarters) the attention and MLP weights."""
    single = sweep["plans"]["dp2-zero0"]["state_bytes"]
    total = single["params"] + single["optimizer"]
    for name, n in (("dp2-zero3", 2), ("dp4-zero3", 4)):
        s = sweep["plans"][name]["state_bytes"]
        assert s["params"] + s["optimizer"] <= total / n * 1.05, (name, s)
    cfg = llama.Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4,
                       intermediate_size=48)
    lay = model_layouts(Plan(dp=1, tp=2).resolve(2), cfg)
    for k in ("layers.0.attn.wqkv", "layers.0.attn.wo", "layers.0.mlp.w1", "layers.0.mlp.w2"):
        assert torch.Size(lay[k].local_shape).numel() * 2 == torch.Size(lay[k].shape).numel()


def test_mesh_coordinates_cover_the_world():
    plan = Plan(dp=4, tp=2, zero=1, zero_group=2).resolve(8)
    for axis, size in (("tp", 2), ("dp", 4), ("zero", 2), ("replica", 2)):
        groups = {tuple(members(plan, r, axis)) for r in range(8)}
        assert all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(8))  # a partition
    assert coords(plan, 5) == {"tp": 1, "dp": 2, "zero": 0, "replica": 1}


@pytest.mark.parametrize("plan, world, culprit", [
    (dict(dp=2, tp=2), 2, "world size"),
    (dict(tp=3), 4, "plan.tp=3"),
    (dict(zero_group=3), 4, "zero_group"),
])
def test_plan_that_does_not_fit_the_world(plan, world, culprit):
    with pytest.raises(ValueError, match=culprit):
        Plan(**plan).resolve(world)


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(zero=4), "plan.zero"), (dict(tp=0), "plan.tp"), (dict(dp=0), "plan.dp"),
    (dict(dp=4, zero_group=3), "plan.zero_group"), (dict(sequence_parallel=True), "tp > 1"),
    (dict(rules=(("vocab", "pipeline"),)), "pipeline"),
])
def test_invalid_plan_fails_at_construction(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        Plan(**kwargs)


@pytest.mark.parametrize("cfg_kw, culprit", [
    (dict(num_heads=6, num_kv_heads=6, hidden_size=48), "num_heads"),
    (dict(num_heads=8, num_kv_heads=2), "num_kv_heads"),
    (dict(intermediate_size=50), "intermediate_size"),
    (dict(vocab_size=66), "vocab_size"),
])
def test_tp_must_divide_the_model(cfg_kw, culprit):
    base = dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=8, num_kv_heads=4,
                intermediate_size=48)
    cfg = llama.Config(**{**base, **cfg_kw})
    with pytest.raises(ValueError, match=culprit):
        model_layouts(Plan(dp=1, tp=4).resolve(4), cfg)


def test_unknown_logical_axis_in_a_rule():
    cfg = llama.Config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                       intermediate_size=48)
    rules = Plan().rules + (("experts", "tp"),)
    with pytest.raises(ValueError, match="experts"):
        model_layouts(Plan(rules=rules).resolve(1), cfg)


def test_per_rank_bytes_arithmetic():
    cfg = llama.Config(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                       intermediate_size=11008)
    single = planner.per_rank_bytes(cfg, Plan().resolve(1))
    n = sum(torch.Size(s.shape).numel() for s in llama.param_specs(cfg).values())
    assert single == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n, "total": 16 * n}
    z3 = planner.per_rank_bytes(cfg, Plan(dp=64, zero=3).resolve(64))
    assert z3["total"] <= single["total"] / 64 * 1.05


def test_measured_comm_bytes_equal_the_analytic_model(sweep):
    from sweep_worker import GLOBAL_MICRO, PLANS, SOURCES, T, config_for
    for name, plan, world in PLANS:
        resolved = plan.resolve(world)
        expected = planner.expected_comm_bytes(config_for(name), resolved, micro_num=GLOBAL_MICRO // resolved.dp,
                                                tokens_per_micro=T, sources=SOURCES)
        for measured in sweep["plans"][name]["comm_bytes"]:
            assert measured == expected, (name, measured, expected)


def test_buckets_launch_during_backward(monkeypatch):
    """A bucket's collective starts as soon as its gradients are in, before backward ends."""
    from evo.sharding import comm as C
    cfg = llama.Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=48)
    plan = Plan(dp=2, zero=0, bucket_mb=0.01).resolve(2)
    layouts = model_layouts(plan, cfg)
    events = []
    monkeypatch.setattr(C, "launch_all_reduce", lambda comm, x, axis: events.append(
        ("launch", x.numel())) or x)
    monkeypatch.setattr(C, "wait", lambda x: x)
    sink = planner.BucketedReduction(None, plan, layouts, list(layouts), int(0.01 * 2**20))
    assert len(sink.buckets) > 2
    from evo import optim, train
    step = train.Step(cfg, optim.adamw(lr=1e-3))
    params = llama.init(cfg)
    tokens = torch.randint(0, 64, (2, 1, 16))
    batch = {"tokens": tokens, "labels": tokens}
    real = sink.__call__
    sink_calls = []

    def record(name, grad):
        sink_calls.append(name)
        events.append(("grad", name))
        real(name, grad)
    monkeypatch.setattr(sink, "__call__", record)

    class Sink:
        __call__ = staticmethod(record)
        finish = staticmethod(sink.finish)
    grads, _ = step.grads(params, batch, on_ready=Sink())
    ref, _ = step.grads(params, batch)
    assert all(torch.equal(grads[k].reshape(ref[k].shape), ref[k]) for k in ref)
    first_launch = next(i for i, e in enumerate(events) if e[0] == "launch")
    last_grad = max(i for i, e in enumerate(events) if e[0] == "grad")
    assert first_launch < last_grad  # overlapped with the rest of backward
    assert sorted(sink_calls) == sorted(layouts)
