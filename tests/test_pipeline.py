"""Pipeline parallelism (evo.sharding.pipeline): the stage split, the action lists, the bad input
refused before any process group, the CLI under torchrun (pp2×dp2) against one process with a
checkpoint crossing the plans, and ``evo plan``'s per-stage figures against their formulas.

The numerical equivalence of every schedule (pp2/pp4 1F1B, interleaved, ZB-H1, ZB-V, with dp /
ZeRO-1, tp + sp, tied embeddings) is proved by the sweep (tests/sweep_worker.py CASES, checked in
tests/test_sharding.py).
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import repo_env
from evo import models, optim, train
from evo.models import llama
from evo.sharding import Plan, pipeline, planner
from evo.sharding.mesh import Mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = llama.Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4,
                   intermediate_size=48)   # 4 blocks: embed, 2 layers, head


def names(split):
    return [[b.name for b in stage] for stage in split]


def test_stages_are_contiguous_and_balanced_by_parameters():
    blocks = [b.name for b in models.blocks(CFG)]
    assert names(pipeline.stage_blocks(CFG, Plan(pp=4).resolve(4))) == [[b] for b in blocks]
    two = names(pipeline.stage_blocks(CFG, Plan(pp=2).resolve(2)))
    assert [n for s in two for n in s] == blocks
    # embed 64·32, a layer ≈ 8k, head 64·32 + 32: the split is (embed, layer) | (layer, head)
    assert two == [blocks[:2], blocks[2:]]
    assert names(pipeline.stage_blocks(CFG, Plan(pp=2, pp_layers=(1, 3)).resolve(2))) == \
        [blocks[:1], blocks[1:]]
    v = Plan(pp=2, pp_schedule="zbv", pp_virtual=2).resolve(2)
    assert [pipeline.rank_stages(v, r) for r in (0, 1)] == [[0, 3], [1, 2]]   # a V
    loop = Plan(pp=2, pp_schedule="interleaved", pp_virtual=2).resolve(2)
    assert [pipeline.rank_stages(loop, r) for r in (0, 1)] == [[0, 2], [1, 3]]


def test_tied_embedding_lives_on_the_first_and_last_stage():
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    plan = Plan(pp=4).resolve(4)
    own = pipeline.owners(tied, plan)
    assert own["embed"] == [0, 3] and pipeline.tied_params(tied, plan) == ["embed"]
    assert own["layers.0.attn.wqkv"] == [1] and own["norm"] == [3]
    assert pipeline.tied_params(CFG, plan) == []


@pytest.mark.parametrize("schedule, v", [("1f1b", 1), ("interleaved", 2), ("zbh1", 1),
                                         ("zbv", 2)])
@pytest.mark.parametrize("pp, m", [(2, 4), (4, 4), (4, 8)])
def test_action_lists_run_every_pass_once_in_dependency_order(schedule, v, pp, m):
    """Each (stage, micro-batch) gets one forward and its backward (B, or I then W) on the rank
    holding the stage; replaying the lists with unit-time actions never deadlocks."""
    plan = Plan(pp=pp, pp_schedule=schedule, pp_virtual=v).resolve(pp)
    lists = pipeline.action_lists(plan, m)
    split = schedule in ("zbh1", "zbv")
    for r, actions in lists.items():
        assert all(pipeline.stage_rank(plan, a.stage) == r for a in actions)
        kinds = ("F", "I", "W") if split else ("F", "B")
        want = sorted((k, s, i) for s in pipeline.rank_stages(plan, r) for i in range(m)
                      for k in kinds)
        assert sorted(actions) == want
    done, pos = set(), {r: 0 for r in lists}
    last = plan.stages - 1
    while any(pos[r] < len(lists[r]) for r in lists):
        progressed = []
        for r, actions in lists.items():
            if pos[r] == len(actions):
                continue
            k, s, i = actions[pos[r]]
            need = {"F": [("F", s - 1, i)] if s else [],
                    "B": [("F", s, i)] + ([("B", s + 1, i)] if s < last else []),
                    "I": [("F", s, i)] + ([("B", s + 1, i)] if s < last else []),
                    "W": [("I", s, i)]}[k]
            have = done | {("B", a[1], a[2]) for a in done if a[0] == "I"}
            if all(n in have for n in need):
                progressed.append((r, (k, s, i)))
        assert progressed, f"deadlock at {pos}"
        for r, a in progressed:
            done.add(a)
            pos[r] += 1


@pytest.mark.parametrize("plan, micro_num, culprit", [
    (Plan(pp=8, dp=1), None, "8 stages, but the model has only 4 blocks"),
    (Plan(pp=2, pp_layers=(1, 1)), None, r"plan.pp_layers=\(1, 1\) counts 2 blocks"),
    (Plan(pp=2, pp_schedule="interleaved", pp_virtual=2), None,   # with 4 layers: 6 blocks
     "model's 6 blocks do not divide into plan.pp × plan.pp_virtual = 4 equal stages"),
    (Plan(pp=4), 2, "data.micro_num=2 must be at least plan.pp=4"),
    (Plan(pp=2, zero=3), None, "plan.zero=3 with plan.pp>1"),
])
def test_bad_pipeline_input_names_the_field(plan, micro_num, culprit):
    cfg = dataclasses.replace(CFG, num_layers=4) if "6 blocks" in culprit else CFG
    with pytest.raises(ValueError, match=culprit):
        pipeline.check(cfg, plan, micro_num)
    if micro_num is None:  # shard refuses it too, before touching the mesh's groups
        step = train.Step(cfg, optim.adamw(lr=1e-3))
        with pytest.raises(ValueError, match=culprit):
            planner.shard(step, plan, Mesh(plan.resolve(plan.model_parallel), 0))


def test_zbv_needs_two_stages_per_rank():
    with pytest.raises(ValueError, match="plan.pp_virtual must be 2"):
        Plan(pp=2, pp_schedule="zbv", pp_virtual=1)


def test_train_refuses_too_few_micro_batches_before_starting(tmp_path):
    """`evo train` validates the pipeline against the model and data before any process group
    (here: a world of 2 that would need torchrun)."""
    from evo import config, run
    exp = config.apply_overrides(config.load(os.path.join(REPO, "experiments", "tiny.py")),
                                 ["plan.pp=2", "data.micro_num=1", f"run_dir={tmp_path}"])
    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(ValueError, match="data.micro_num=1 must be at least plan.pp=2"):
            run.run(exp)
    finally:
        del os.environ["WORLD_SIZE"]
