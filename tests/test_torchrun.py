"""`evo train` under torchrun: plans of 4 processes log the losses of one process (each test one
launch of 4 processes; a file of its own so the suite's workers share the launches out)."""
import json
import subprocess
import sys

from conftest import repo_env
from test_cli import REPO, evo


def test_torchrun_plan_logs_the_losses_of_one_process(tmp_path):
    """`torchrun --nproc-per-node 4 -m evo train experiments/tiny.py` under dp2×tp2 ZeRO-3 with
    micro_num 1 logs the losses of one process with micro_num 2 (fp32, 1e-5 relative)."""
    common = ["experiments/tiny.py", "--set", "steps=3", "--set", "eval_every=0",
              "--set", "sample_tokens=1"]
    env = repo_env(OMP_NUM_THREADS="1")
    dist_run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "-m", "evo", "train", *common, "--set", "plan.dp=2", "--set", "plan.tp=2",
         "--set", "plan.zero=3", "--set", "data.micro_num=1",
         "--set", f"run_dir={tmp_path / 'dist'}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert dist_run.returncode == 0, dist_run.stderr[-3000:]
    one = evo("train", *common, "--set", "data.micro_num=2", "--set", f"run_dir={tmp_path / 'one'}",
              cwd=REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().split("\n") if x]  # noqa: E731
    a, b = read("dist"), read("one")
    assert [r["step"] for r in a] == [1, 2, 3] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(rb["loss"]), (ra["loss"], rb["loss"])
        assert ra["tokens"] == rb["tokens"]
    assert "all_gather/zero" in a[0]["comm_bytes"] and "all_reduce/tp" in a[0]["comm_bytes"]


def test_torchrun_long_context_plan_logs_the_losses_of_one_process(tmp_path):
    """`torchrun --nproc-per-node 4 -m evo train experiments/tiny.py --set plan.cp=2 --set
    plan.sp=2`: every packed row split over the four ranks of one sequence group (zigzag ring ×
    Ulysses), 2 steps, logs the losses and gradient norms of one process (fp32, 1e-5 relative)."""
    common = ["experiments/tiny.py", "--set", "steps=2", "--set", "eval_every=0",
              "--set", "sample_tokens=1", "--set", "data.seq_len=32"]
    dist_run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "-m", "evo", "train", *common, "--set", "plan.cp=2", "--set", "plan.sp=2",
         "--set", f"run_dir={tmp_path / 'dist'}"],
        capture_output=True, text=True, cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"), timeout=900)
    assert dist_run.returncode == 0, dist_run.stderr[-3000:]
    one = evo("train", *common, "--set", f"run_dir={tmp_path / 'one'}", cwd=REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().split("\n") if x]  # noqa: E731
    a, b = read("dist"), read("one")
    assert [r["step"] for r in a] == [1, 2] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert abs(ra[key] - rb[key]) <= 1e-5 * abs(rb[key]), (key, ra[key], rb[key])
        assert ra["tokens"] == rb["tokens"]
    assert a[0]["comm_bytes"]["send_recv/cp"] > 0 and a[0]["comm_bytes"]["all_to_all/sp"] > 0
