"""Expert parallelism: the mesh's ``ep`` axis, the expert layout, the dispatch's regrouping and
the plan checks — pure arithmetic, checked against hand-written references (exact: integers).

The distributed equivalence (dp2·ep2, dp4·ep4, dp4·ep2 ZeRO-1 and ZeRO-3, dp2·ep2×tp2 against
one process, bytes = the model) runs in the sweep (``tests/sweep_worker.py``, ``mixtral-*``
cases).
"""
import itertools

import pytest
import torch

from evo import Experiment, data, optim, run
from evo.models import llama, mixtral
from evo.sharding import Plan
from evo.sharding.experts import group_by_expert
from evo.sharding.layout import model_layouts
from evo.sharding.mesh import mesh_shape

MOE = mixtral.Config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                     intermediate_size=48, num_experts=4, top_k=2)


@pytest.mark.parametrize("dp, ep, zero_group, tp", [(2, 2, 1, 1), (4, 2, 2, 1), (8, 2, 2, 2),
                                                    (8, 4, 1, 2), (4, 4, 1, 1)])
def test_ep_is_the_innermost_factor_of_dp(dp, ep, zero_group, tp):
    """``dp_index = (replica · zero_group + zero) · ep + ep_index``; ``dp`` holds every
    data-parallel rank, ``edp`` the ones with the same experts (same ``ep`` coordinate)."""
    plan = Plan(dp=dp, ep=ep, tp=tp, zero=1, zero_group=zero_group).resolve(dp * tp)
    shape = mesh_shape(plan)
    assert shape.sizes["replica"] == dp // (zero_group * ep) and shape.sizes["edp"] == dp // ep
    for rank in range(dp * tp):
        c = shape.coords(rank)
        dp_index = (c["replica"] * zero_group + c["zero"]) * ep + c["ep"]
        assert rank == dp_index * tp + c["tp"] and c["dp"] == dp_index
        assert shape.members(rank, "ep") == [(dp_index - c["ep"] + e) * tp + c["tp"]
                                             for e in range(ep)]
        same_experts = [r for r in range(dp * tp) if shape.coords(r)["ep"] == c["ep"] and
                        shape.coords(r)["tp"] == c["tp"]]
        assert shape.members(rank, "edp") == same_experts
        assert set(shape.members(rank, "zero")) <= set(same_experts)   # ZeRO groups too


def test_expert_parameters_are_split_over_ep():
    plan = Plan(dp=4, ep=2, zero=3).resolve(4)   # zero_group: dp / ep
    assert plan.zero_group == 2
    lay = model_layouts(plan, MOE)
    w1 = lay["layers.0.moe.w1"]
    assert w1.split == (("ep",), (), ("tp",)) and w1.local_shape == (2, 32, 48)
    assert w1.shard_shape == (1, 32, 48) and w1.ep_dim == 0
    assert lay["layers.0.moe.router"].local_shape == (32, 4)       # replicated
    sizes = mesh_shape(plan).sizes
    assert [w1.offset(mesh_shape(plan).coords(r), sizes) for r in range(4)] == \
        [(0, 0, 0), (2, 0, 0)] * 2
    both = model_layouts(Plan(dp=2, ep=2, tp=2).resolve(4), MOE)["layers.0.moe.w2"]
    assert both.split == (("ep",), ("tp",), ()) and both.local_shape == (2, 24, 32)


def test_group_by_expert_matches_a_loop():
    """Rows arriving rank-major (source rank, then local expert) are listed expert-major."""
    g = torch.Generator().manual_seed(0)
    for ranks, experts in itertools.product((1, 2, 3), (1, 2, 4)):
        counts = torch.randint(0, 4, (ranks, experts), generator=g)
        starts = (counts.flatten().cumsum(0) - counts.flatten()).view_as(counts)
        ref = [int(starts[r, e]) + i for e in range(experts) for r in range(ranks)
               for i in range(int(counts[r, e]))]
        assert group_by_expert(counts).tolist() == ref


def test_balanced_traffic_counts_every_routed_row_twice():
    """Without the step's routing, the model assumes each rank receives what it sends:
    ``tokens · top_k`` rows per MoE layer and micro-batch, each way; ZeRO-3 recomputes every
    layer (a second forward dispatch)."""
    from evo.sharding.experts import balanced_traffic
    cfg = mixtral.Config(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                         intermediate_size=48, num_experts=4, top_k=2, first_k_dense=1)
    t = balanced_traffic(cfg, Plan(dp=2, ep=2).resolve(2), micro_num=5, tokens_per_micro=16)
    assert (t.experts, t.forward_calls, t.forward_rows) == (4, 2 * 5, 2 * (2 * 16 * 2) * 5)
    assert (t.recomputed_calls, t.recomputed_rows) == (0, 0)
    z3 = balanced_traffic(cfg, Plan(dp=2, ep=2, zero=3).resolve(2), micro_num=5,
                          tokens_per_micro=16)
    assert (z3.recomputed_calls, z3.recomputed_rows) == (t.forward_calls, t.forward_rows)


@pytest.mark.parametrize("kwargs, world, culprit", [
    (dict(ep=3), 3, r"plan.ep=3 must divide the number of experts 4"),
    (dict(dp=4, ep=2, zero_group=4), 4, r"plan.zero_group=4 must divide plan.dp / plan.ep = 2"),
    (dict(ep=2, rules=Plan().rules + (("expert", None),)), 2,
     r"logical axis 'expert' must map to 'ep'"),
])
def test_bad_expert_plans_name_the_field(kwargs, world, culprit):
    with pytest.raises(ValueError, match=culprit):
        model_layouts(Plan(**kwargs).resolve(world), MOE)


def test_ep_needs_experts():
    dense = llama.Config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                   intermediate_size=48)
    with pytest.raises(ValueError, match="plan.ep=2: the model has no experts"):
        model_layouts(Plan(ep=2).resolve(2), dense)


def test_evo_run_refuses_ep_not_dividing_the_experts_before_starting(monkeypatch, tmp_path):
    """Under a 3-process launch, ``plan.ep=3`` with 4 experts fails before any process group is
    created (none exists afterwards) and before the run directory is written."""
    import torch.distributed as dist
    monkeypatch.setenv("WORLD_SIZE", "3")
    exp = Experiment(model=MOE, data=data.Packed(folder=None, seq_len=16, micro_batch=1,
                                                 micro_num=1),
                     optimizer=optim.adamw(lr=1e-3), plan=Plan(ep=3), steps=1,
                     run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="plan.ep=3 must divide the number of experts 4"):
        run.run(exp)
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_torchrun_dp4_ep2_logs_the_losses_of_one_process(tmp_path):
    """``torchrun --nproc-per-node 4 -m evo train experiments/tiny_moe.py --set plan.dp=4 --set
    plan.ep=2`` (each rank one micro-batch and half the experts) logs the losses of one process
    taking the four micro-batches (fp32: 1e-5 relative), and the dispatch's all-to-all bytes."""
    import json
    import os
    import subprocess
    import sys
    from conftest import repo_env
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ["experiments/tiny_moe.py", "--set", "steps=2", "--set", "eval_every=0",
              "--set", "sample_tokens=1", "--set", "data.seq_len=32", "--set",
              "data.micro_batch=1"]
    runs = {"dist": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc-per-node", "4", "-m", "evo", "train", *common, "--set",
                     "plan.dp=4", "--set", "plan.ep=2", "--set", "data.micro_num=1"],
            "one": [sys.executable, "-m", "evo", "train", *common, "--set", "data.micro_num=4"]}
    logs = {}
    for name, cmd in runs.items():
        r = subprocess.run([*cmd, "--set", f"run_dir={tmp_path / name}"], capture_output=True,
                           text=True, cwd=repo, env=repo_env(OMP_NUM_THREADS="1"), timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        logs[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text()
                      .splitlines() if x]
    a, b = logs["dist"], logs["one"]
    assert [r["step"] for r in a] == [1, 2] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(rb["loss"]), (ra["loss"], rb["loss"])
        assert ra["tokens"] == rb["tokens"]
    assert a[0]["comm_bytes"]["all_to_all/ep"] > 0 and a[0]["expert_traffic"]["forward_calls"] > 0
