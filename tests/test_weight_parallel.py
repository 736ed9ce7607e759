"""``plan.weight_parallel`` without processes: what it refuses, and the arithmetic of its layout.

The distributed equivalence (sp2 with weight parallelism against one process, bytes, checkpoint)
is the sweep's ``sp2-wp`` case (tests/sweep_worker.py, tests/test_sharding.py).
"""
import math

import pytest
import torch

from evo import optim, train
from evo.models import llama
from evo.sharding import Plan, planner
from evo.sharding.layout import model_layouts
from evo.sharding.mesh import Mesh, mesh_shape

CFG = llama.Config(vocab_size=66, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4,
                   intermediate_size=50)


@pytest.mark.parametrize("fields, culprit", [
    (dict(dp=1, sp=2, zero=3), "plan.zero=3"),
    (dict(dp=1, sp=2, zero=1), "plan.zero=1"),
    (dict(dp=1, cp=2, tp=2), "plan.tp=2"),
    (dict(dp=2, sp=2), "plan.dp=2"),
])
def test_unproven_compositions_are_refused_naming_the_field(fields, culprit):
    plan = Plan(weight_parallel=True, **fields)
    with pytest.raises(ValueError, match=f"plan.weight_parallel with {culprit} is not "
                                         "implemented"):
        planner.check_plan(plan, CFG)


def test_a_resolved_dp_is_checked_before_the_step_runs():
    """dp left to the world (-1) passes ``check_plan``; ``shard`` refuses it once resolved."""
    plan = Plan(sp=2, weight_parallel=True)
    planner.check_plan(plan, CFG)
    step = train.Step(CFG, optim.adamw(lr=1e-3))
    with pytest.raises(ValueError, match="plan.weight_parallel with plan.dp=2"):
        planner.shard(step, plan, Mesh(plan.resolve(4), 0))


def test_the_sequence_group_is_a_derived_mesh_axis():
    shape = mesh_shape(Plan(cp=2, sp=2, weight_parallel=True).resolve(8))
    assert shape.groups("seq") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [shape.coords(r)["seq"] for r in range(4)] == [0, 1, 2, 3]
    assert "seq" not in mesh_shape(Plan(cp=2, sp=2).resolve(8)).sizes


def test_each_rank_holds_one_shard_of_every_weight_and_its_state():
    """Rows padded to a multiple of the group, then split: ``ceil(rows / (cp·sp))`` rows each;
    params, grads and both AdamW moments are all per shard."""
    plan = Plan(dp=1, cp=2, sp=2, weight_parallel=True).resolve(4)
    lay = model_layouts(plan, CFG)
    for k, l in lay.items():
        assert l.shard_shape == (math.ceil(l.shape[0] / 4), *l.shape[1:]), k
    shard = sum(math.ceil(l.shape[0] / 4) * math.prod(l.shape[1:]) for l in lay.values()) * 4
    assert planner.per_rank_bytes(CFG, plan) == {"params": shard, "grads": shard,
                                                  "optimizer": 2 * shard, "total": 4 * shard}


def test_shards_reassemble_the_global_params():
    """The four ranks' stored shards, concatenated and cut to the rows, are the global arrays."""
    plan = Plan(dp=1, cp=2, sp=2, weight_parallel=True).resolve(4)
    full = {k: torch.randn(l.shape) for k, l in model_layouts(plan, CFG).items()}
    pieces = [planner.shard_params(CFG, full, Mesh(plan, r)) for r in range(4)]
    for k, x in full.items():
        assert torch.equal(torch.cat([p[k] for p in pieces])[:x.shape[0]], x), k
