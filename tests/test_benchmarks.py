"""The GPU benchmark runs end to end at tiny shapes on a CPU (kernels under Triton's interpreter,
nothing compiled), so the one prepared run on a lent GPU does not fail on a typo."""
import json
import os
import subprocess
import sys

from conftest import repo_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_step_smoke(tmp_path):
    env = repo_env(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_step.py"), "--smoke",
                        "--steps", "2", "--warmup", "1", "--triton", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_step.json").read_text())
    assert res["kernels"] and all(k["ok"] for k in res["kernels"].values()), res["kernels"]
    shape = res["shapes"]["smoke"]
    assert all("error" not in shape[w] for w in ("hf", "evo", "evo_same_tokens", "evo_triton")), shape
    # Same weights, same tokens: evo's losses are HF's within bf16 noise.
    assert shape["loss_max_rel_diff"] <= 2e-2
    assert "| smoke | evo |" in (tmp_path / "gpu_step.md").read_text()
