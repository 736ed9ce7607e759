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


def test_held_moments_count_the_gradient_sum_from_a_stages_first_weight_backward():
    """One stage, parts (activations, new gradients, their sum): ZB-H1's last stage ``F0 I0 F1
    I1 W0 W1`` holds both forwards (and the input backward's transient) before any gradient
    exists; ``W0`` leaves its gradients (5), which become the running sum; ``W1``'s arrive
    beside it. Without ``summed``, the sum is in no moment. 1F1B's ``F0 F1 B0 B1``: the sum
    from ``B0`` on, beside ``B1``'s transient."""
    A = pipeline.Action
    per_micro, during = {0: (1, 0, 0)}, {0: ((3, 0, 0),)}
    after, summed = {0: (0, 5, 0)}, {0: (0, 0, 5)}
    zb = [A("F", 0, 0), A("I", 0, 0), A("F", 0, 1), A("I", 0, 1), A("W", 0, 0), A("W", 0, 1)]
    assert pipeline.held_moments(zb, per_micro, during, after, summed) == {
        (0, 0, 0), (1, 0, 0), (4, 0, 0), (2, 0, 0), (5, 0, 0),   # forwards, input backwards
        (5, 0, 0), (1, 5, 0), (1, 0, 5), (4, 0, 5), (0, 5, 5), (0, 0, 5)}
    assert pipeline.held_moments(zb, per_micro, during, after) == {
        (0, 0, 0), (1, 0, 0), (4, 0, 0), (2, 0, 0), (5, 0, 0), (1, 5, 0), (4, 0, 0),
        (0, 5, 0)}
    ofob = [A("F", 0, 0), A("F", 0, 1), A("B", 0, 0), A("B", 0, 1)]
    assert pipeline.held_moments(ofob, per_micro, during, after, summed) == {
        (0, 0, 0), (1, 0, 0), (2, 0, 0), (5, 0, 0), (1, 5, 0), (1, 0, 5), (4, 0, 5),
        (0, 5, 5), (0, 0, 5)}


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


def _replay(schedule, v, p, m, F, I, W):  # noqa: E741
    plan = Plan(pp=p, pp_schedule=schedule, pp_virtual=v).resolve(p)
    lists = pipeline.action_lists(plan, m)
    cost = {"F": F, "B": I + W, "I": I, "W": W}
    return pipeline.replay(lists, {r: [cost[a.kind] for a in acts] for r, acts in lists.items()},
                           plan.stages)


def test_replay_of_1f1b_by_hand():
    """pp2, 2 micro-batches, F = 1, B = 2: rank 1 runs F0 1-2, B0 2-4, F1 4-5, B1 5-7; rank 0
    F0 0-1, F1 1-2, then waits for B0's input gradient: B0 4-6, B1 7-9. Busy 12 of 2 × 9."""
    t = _replay("1f1b", 1, 2, 2, 1.0, 1.0, 1.0)
    A = pipeline.Action
    assert t.start == {A("F", 0, 0): 0, A("F", 0, 1): 1, A("B", 0, 0): 4, A("B", 0, 1): 7,
                       A("F", 1, 0): 1, A("B", 1, 0): 2, A("F", 1, 1): 4, A("B", 1, 1): 5}
    assert t.span == 9 and t.idle == pytest.approx(1 - 12 / 18, abs=1e-12)


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8)])
def test_replayed_idle_equals_the_published_bubbles(p, m):
    """Equal stages: 1F1B idles (p−1)/(m+p−1) whatever F : B; interleaved (v = 2)
    (p−1)/(v·m+p−1); ZB-H1 (torch's order) a bubble of (p−1)(F+I−W) when W ≤ F — arXiv
    2401.10241's, (p−1)/(3m+p−1) of the step at F = I = W — and (p−1)·I when the weight pass is
    the longer (its W cannot fill more than an F's slot). Exact in floats (1e-12)."""
    for F, I, W in ((1.0, 1.0, 1.0), (1.0, 2.0, 0.5), (0.3, 0.7, 0.2)):  # noqa: E741
        assert _replay("1f1b", 1, p, m, F, I, W).idle == pytest.approx((p - 1) / (m + p - 1),
                                                                         abs=1e-12)
        assert _replay("interleaved", 2, p, m, F, I, W).idle == \
            pytest.approx((p - 1) / (2 * m + p - 1), abs=1e-12)
    for F, I, W in ((1.0, 2.0, 0.5), (1.0, 1.0, 1.5), (5.3, 7.8, 10.6)):  # noqa: E741
        bubble = (p - 1) * (F + I - min(F, W))
        assert _replay("zbh1", 1, p, m, F, I, W).idle == \
            pytest.approx(bubble / (bubble + m * (F + I + W)), abs=1e-12)
    assert _replay("zbh1", 1, p, m, 1.0, 1.0, 1.0).idle == \
        pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)
    for schedule, v in (("1f1b", 1), ("interleaved", 2), ("zbh1", 1)):  # what evo plan prices
        b = pipeline.bubble_fraction(Plan(pp=p, pp_schedule=schedule, pp_virtual=v).resolve(p), m)
        assert _replay(schedule, v, p, m, 1.0, 1.0, 1.0).idle == pytest.approx(b / (1 + b),
                                                                                abs=1e-12)


def test_replay_refuses_lists_that_deadlock():
    A = pipeline.Action
    lists = {0: [A("B", 0, 0), A("F", 0, 0)], 1: [A("F", 1, 0), A("B", 1, 0)]}
    with pytest.raises(ValueError, match="deadlock"):
        pipeline.replay(lists, {0: [1.0, 1.0], 1: [1.0, 1.0]}, 2)


@pytest.mark.parametrize("schedule, v", [("1f1b", 1), ("zbv", 2)])
def test_executor_in_threads_equals_one_process_and_times_each_action(schedule, v, monkeypatch):
    """The executor's two pp ranks as two threads of one process, the point-to-point messages
    passed through queues keyed by their tags: the gradients of both ranks' stages together equal
    the one-process step's (fp32, 1e-5 relative), the loss on the last stage's rank too, and each
    rank records one positive compute time (thread CPU seconds) per action of its list that sum
    to no more than the rank's wall-clock time (``pp_seconds``, what ``replay`` takes)."""
    import queue
    import threading
    import time
    import types
    import torch
    from evo.models import layers
    plan, m = Plan(pp=2, pp_schedule=schedule, pp_virtual=v).resolve(2), 4
    step = train.Step(CFG, optim.adamw(lr=1e-3))
    params = models.init(CFG)
    tokens = torch.randint(0, CFG.vocab_size, (m, 1, 16),
                           generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": tokens}
    ref, ref_aux = step.grads(params, batch)
    boxes: dict = {}

    def box(tag):
        return boxes.setdefault(tag, queue.Queue())

    def isend(x, group, group_dst, tag):
        box(tag).put(x.clone())
        return types.SimpleNamespace(wait=lambda: None)

    def irecv(x, group, group_src, tag):
        return types.SimpleNamespace(wait=lambda: x.copy_(box(tag).get(timeout=60)))
    monkeypatch.setattr(pipeline.dist, "isend", isend)
    monkeypatch.setattr(pipeline.dist, "irecv", irecv)

    class Local(layers.Regions):
        sp = False
    comm = types.SimpleNamespace(log=types.SimpleNamespace(add=lambda *a: None))
    out = {}

    def rank(r):
        sched = pipeline.PipelineSchedule(
            CFG, types.SimpleNamespace(plan=plan, coords={"pp": r}, groups={}), comm)
        mine = {k: v for k, v in params.items()
                if k in pipeline.local_layouts(params, CFG, plan, r)}
        t0 = time.perf_counter()
        grads, aux = dataclasses.replace(step, schedule=sched).grads(mine, batch,
                                                                     regions=Local())
        out[r] = (grads, aux, sched.seconds, time.perf_counter() - t0)
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grads = {**out[0][0], **out[1][0]}
    assert set(grads) == set(ref)
    for k in ref:
        assert ((grads[k] - ref[k]).norm() / ref[k].norm()).item() <= 1e-5, k
    last = pipeline.stage_rank(plan, plan.stages - 1)
    assert abs(out[last][1]["loss"].item() - ref_aux["loss"].item()) <= 1e-5 * ref_aux["loss"]
    for r in (0, 1):
        seconds, wall = out[r][2], out[r][3]
        assert len(seconds) == len(pipeline.action_lists(plan, m)[r])
        assert all(t > 0 for t in seconds) and sum(seconds) <= wall


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


def test_torchrun_pp2_dp2_matches_one_process_and_its_checkpoints_resume_across_plans(tmp_path):
    """`torchrun --nproc-per-node 4 -m evo train experiments/tiny.py` with pp2×dp2 (1F1B, 4
    micro-batches per data-parallel rank, ZeRO 0, blocks split 3 | 3) logs the losses of one
    process with 8 micro-batches (fp32, 1e-5 relative); its step-2 checkpoint resumed by one
    process logs the same step-3 loss, and its step-1 checkpoint resumed by another pp2×dp2
    layout (ZeRO-1, blocks split 2 | 4, ZB-H1) logs the same losses at steps 2 and 3 (the second
    needs the restored AdamW moments); the pipeline run records its ``pp_idle``."""
    common = ["experiments/tiny.py", "--set", "steps=3", "--set", "eval_every=0",
              "--set", "sample_tokens=1", "--set", "data.seq_len=64", "--set",
              "data.micro_batch=1", "--set", "checkpoint_every=2", "--set",
              "async_checkpoint=false"]
    env = repo_env(OMP_NUM_THREADS="1")

    def torchrun(run_dir, *sets):
        r = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "4", "-m", "evo", "train", *common, "--set", "plan.pp=2", "--set", "plan.dp=2",
             "--set", "data.micro_num=4", *sets, "--set", f"run_dir={run_dir}"],
            capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return read(run_dir)

    def read(run_dir):
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().split("\n") if x]

    def one(run_dir):
        r = subprocess.run([sys.executable, "-m", "evo", "train", *common, "--set",
                            "data.micro_num=8", "--set", f"run_dir={run_dir}"],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return read(run_dir)

    def resume_from(step, run_dir):
        (run_dir / "checkpoints").mkdir(parents=True)
        name = f"step-{step:08d}"
        shutil.copytree(tmp_path / "dist" / "checkpoints" / name, run_dir / "checkpoints" / name)
        return run_dir
    a = torchrun(tmp_path / "dist", "--set", "checkpoint_every=1")
    b = one(tmp_path / "one")
    resumed = one(resume_from(2, tmp_path / "resumed"))
    other = torchrun(resume_from(1, tmp_path / "other"), "--set", "plan.zero=1", "--set",
                     "plan.pp_layers=[2,4]", "--set", "plan.pp_schedule=zbh1")
    assert [r["step"] for r in a] == [1, 2, 3] == [r["step"] for r in b]
    assert [r["step"] for r in resumed] == [3] and [r["step"] for r in other] == [2, 3]
    for ra, rb in zip(a + resumed + other, b + b[2:] + b[1:]):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(rb["loss"]), (ra["loss"], rb["loss"])
        assert ra["tokens"] == rb["tokens"]
    assert a[0]["comm_bytes"]["send/pp"] > 0 and 0 <= a[0]["pp_idle"] < 1
    assert "pp_idle" not in b[0]


def test_hybrid_zero_under_pp_shards_each_stage_inside_its_group():
    """pp2 × dp4 with ZeRO-1 in groups of 2 (8 ranks, built without process groups): each rank
    holds its stage's parameters whole and AdamW moments of ceil(rows / 2) rows of each, every
    (stage, replica) has one ZeRO group of zero indices 0 and 1, and the bytes equal ``evo plan``'s
    ``per_rank_bytes``: 2 moments × 4 bytes × Σ ceil(rows / 2) · the other dims (a vocabulary
    of 65 rows pads to 66). The equivalence with one process on 8 gloo processes is a manual run
    (docs/plans.md, Pipeline)."""
    import math
    import torch
    cfg = dataclasses.replace(CFG, vocab_size=65)
    plan = Plan(pp=2, dp=4, zero=1, zero_group=2).resolve(8)
    full, opt = models.init(cfg), optim.adamw(lr=1e-3)
    split = pipeline.stage_blocks(cfg, plan)
    rows = {}
    for rank in range(8):
        mesh = Mesh(plan, rank)
        state = planner.init_state(cfg, opt, planner.shard_params(cfg, full, mesh), mesh)
        c = mesh.coords
        stage = {k for b in split[c["pp"]] for k in b.params}
        assert set(state.params) == stage
        assert all(torch.equal(state.params[k], full[k]) for k in stage)
        for k in stage:
            n = math.ceil(full[k].shape[0] / 2)
            assert state.opt_state.mu[k].shape == (n, *full[k].shape[1:])
            rows.setdefault((c["pp"], c["replica"], k), []).append(c["zero"])
        moments = sum(t.numel() * 4 for m in (state.opt_state.mu, state.opt_state.nu)
                      for t in m.values())
        want = 2 * 4 * sum(math.ceil(full[k].shape[0] / 2) * full[k][0].numel() for k in stage)
        assert moments == want == planner.per_rank_bytes(cfg, plan, pp_index=c["pp"])["optimizer"]
    assert all(sorted(z) == [0, 1] for z in rows.values()) and len(rows) == 2 * len(full)


@pytest.mark.parametrize("schedule, v", [("1f1b", 1), ("interleaved", 2), ("zbh1", 1)])
def test_plan_report_per_stage_equals_the_formulas(schedule, v):
    """``evo plan``'s per-stage figures for pp2 over 8 micro-batches of T tokens (fp32): the
    weights each rank holds, the micro-batches in flight (1F1B: p − r on rank r), the activations
    they hold (per micro-batch in flight: one [T, hidden] input per layer; the head's [T, hidden]
    norm input and two [T, vocab] logits), the p2p bytes
    (rank 0: an activation out and its gradient back per micro-batch and boundary), the bubble
    ((p−1)/m, (p−1)/(v·m), 0)."""
    import math
    import torch
    cfg = dataclasses.replace(CFG, num_layers=6)          # 8 blocks: 4 stages of 2 for v=2
    plan, m, T = Plan(dp=1, pp=2, pp_schedule=schedule, pp_virtual=v).resolve(2), 8, 64
    rows = pipeline.stage_report(cfg, plan, micro_num=m, tokens_per_micro=T,
                                 compute_dtype=torch.float32)
    act = T * cfg.hidden_size * 4
    specs = models.param_specs(cfg)
    split = pipeline.stage_blocks(cfg, plan)
    for r, row in enumerate(rows):
        held = {k for s in pipeline.rank_stages(plan, r) for b in split[s] for k in b.params}
        assert row["params"] == sum(math.prod(specs[k].shape) for k in held) * 4
        assert row["optimizer"] == 2 * row["params"]
        boundaries = sum(1 for s in pipeline.rank_stages(plan, r) for nb in (s - 1, s + 1)
                         if 0 <= nb < plan.stages and pipeline.stage_rank(plan, nb) != r)
        assert row["p2p"] == boundaries * 2 * m * act
    assert sum(r["params"] for r in rows) == sum(math.prod(s.shape) for s in specs.values()) * 4
    assert rows[0]["bubble"] == {"1f1b": 1 / 8, "interleaved": 1 / 16, "zbh1": 1 / 24}[schedule]
    if schedule == "zbh1":   # the input backward keeps its graph until the weight backward
        last = " ".join(f"{a.kind}{a.micro}" for a in pipeline.action_lists(plan, 2)[1])
        assert last == "F0 I0 F1 I1 W0 W1"
        assert pipeline.in_flight(plan, 2, 1) == 2
    if schedule == "1f1b":
        assert [r["in_flight"] for r in rows] == [2, 1]
        layers = [sum(b.kind == "layer" for b in split[r]) for r in (0, 1)]
        head = T * (cfg.hidden_size + 2 * cfg.vocab_size) * 4        # norm input, logits ×2
        assert [r["activations"] for r in rows] == [2 * layers[0] * act,
                                                    layers[1] * act + head]
    text = pipeline.format_report(rows)
    assert text.splitlines()[0].split()[:3] == ["pp", "stages", "blocks"] and len(rows) == 2
