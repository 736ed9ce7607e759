"""A plan for 1024 GPUs checked in one process: torch's fake process group + meta tensors.

Expected shapes and bytes are written out by hand from the 7B shape (h 4096, 32 layers, 32 heads,
ffn 11008, vocab 32000) and the plan.
"""
import subprocess
import sys

import pytest
import torch.distributed as dist

from conftest import repo_env
from evo.models import llama
from evo.sharding import Plan
from evo.sharding.simulate import plan_report, simulate

CFG_7B = llama.Config(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                      intermediate_size=11008)


def test_7b_at_world_1024_tp8_zero1_group8():
    r = simulate(CFG_7B, Plan(tp=8, zero=1, zero_group=8), 1024, rank=9)
    assert r["plan"].dp == 128 and r["coords"] == {"tp": 1, "dp": 1, "zero": 1, "replica": 0, "pp": 0,
                                                 "cp": 0, "sp": 0}
    s = r["shapes"]
    # tensor parallel splits: qkv 3·4096 / 8, heads 4096 / 8, mlp 11008 / 8, vocab 32000 / 8
    assert s["layers.0.attn.wqkv"]["tp_piece"] == (4096, 1536)
    assert s["layers.0.attn.wo"]["tp_piece"] == (512, 4096)
    assert s["layers.0.mlp.w1"]["tp_piece"] == (4096, 1376)
    assert s["layers.0.mlp.w2"]["tp_piece"] == (1376, 4096)
    assert s["embed"]["tp_piece"] == (4000, 4096)
    assert s["lm_head"]["tp_piece"] == (4096, 4000)
    assert s["layers.0.attn_norm"]["tp_piece"] == (4096,)
    # ZeRO-1 keeps whole tensor-parallel pieces as params
    assert s["layers.0.attn.wqkv"]["stored"] == (4096, 1536)
    # bytes: tp piece of every tensor, fp32; AdamW moments on the 1/8 ZeRO shard (rows padded)
    per_layer = 4096 * 1536 + 512 * 4096 + 2 * 4096 * 1376 + 1376 * 4096 + 2 * 4096
    piece = 32 * per_layer + 4000 * 4096 + 4096 * 4000 + 4096
    assert r["bytes"]["params"] == 4 * piece and r["bytes"]["grads"] == 4 * piece
    shard_layer = 512 * 1536 + 64 * 4096 + 2 * 512 * 1376 + 172 * 4096 + 2 * 512
    shard = 32 * shard_layer + 500 * 4096 + 512 * 4000 + 512
    assert r["bytes"]["optimizer"] == 2 * 4 * shard
    assert not dist.is_initialized()


PEAK_RSS = """
import resource
from evo.models import llama
from evo.sharding import Plan
from evo.sharding.simulate import simulate
cfg = llama.Config(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                   intermediate_size=11008)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
simulate(cfg, Plan(tp=8, zero=1, zero_group=8), 1024, rank=9)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_simulating_7b_allocates_no_weights():
    """In a fresh process (its peak RSS is its own): simulating the 7B plan raises the peak by
    less than 256 MiB — one 7B layer alone is 0.8 GB in fp32, the model 27 GB."""
    r = subprocess.run([sys.executable, "-c", PEAK_RSS], capture_output=True, text=True,
                       timeout=120, env=repo_env())
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(int, r.stdout.split())  # KiB
    assert after - before < 256 * 2**10, (before, after)


def test_7b_zero3_at_world_1024():
    r = simulate(CFG_7B, Plan(zero=3), 1024)
    assert r["plan"].dp == 1024 and r["plan"].zero_group == 1024
    assert r["shapes"]["layers.0.attn.wqkv"]["stored"] == (4, 12288)   # ceil(4096 / 1024) rows
    assert r["shapes"]["embed"]["stored"] == (32, 4096)                # ceil(32000 / 1024)
    assert r["bytes"]["params"] * 4 == r["bytes"]["optimizer"] * 2 == r["bytes"]["total"] * 1


@pytest.mark.parametrize("plan, culprit", [(Plan(tp=3), "plan.tp=3"),
                                           (Plan(tp=64), "num_heads"),
                                           (Plan(dp=512), "world size")])
def test_invalid_plan_at_world_1024_fails_before_anything(plan, culprit):
    with pytest.raises(ValueError, match=culprit):
        simulate(CFG_7B, plan, 1024)
    assert not dist.is_initialized()


def test_plan_report_lists_each_plan():
    text = plan_report(CFG_7B, [Plan(tp=8, zero=1, zero_group=8), Plan(zero=3), Plan(tp=3)], 1024)
    lines = text.splitlines()
    assert len(lines) == 4 and "dp=128,tp=8,zero=1,zero_group=8" in lines[1]
    assert "invalid" in lines[3] and "plan.tp=3" in lines[3]


def test_evo_plan_command(tmp_path):
    import os
    exp = tmp_path / "l7b.py"
    exp.write_text(
        "from evo import Experiment, Plan, data, models, optim\n"
        "experiment = Experiment(model=models.llama.Config(vocab_size=32000, hidden_size=4096,\n"
        "    num_layers=32, num_heads=32, intermediate_size=11008),\n"
        "    data=data.Packed(folder=None, seq_len=4096), optimizer=optim.adamw(lr=3e-4),\n"
        "    plan=Plan(tp=8, zero=1, zero_group=8))\n")
    r = subprocess.run([sys.executable, "-m", "evo", "plan", str(exp), "--world", "1024",
                        "--plans", "zero=3"], capture_output=True, text=True, timeout=900,
                       env=repo_env())
    assert r.returncode == 0, r.stderr
    assert "dp=128,tp=8,zero=1,zero_group=8" in r.stdout and "zero=3" in r.stdout
    assert "7.06 GiB" in r.stdout  # 4 + 4 + 1 bytes per parameter piece, as computed above
    bad = subprocess.run([sys.executable, "-m", "evo", "plan", str(exp), "--world", "1000"],
                         capture_output=True, text=True, timeout=900,
                         env=repo_env())
    assert bad.returncode != 0 and "plan.zero_group=8 must divide plan.dp=125" in bad.stderr
