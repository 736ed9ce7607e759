"""The prepared GPU check (scripts/gpu_check.sh) and its benchmark run end to end at tiny shapes
on a CPU (kernels under Triton's interpreter, nothing compiled), so the one prepared run on a lent
GPU does not fail on a typo."""
import json
import os
import subprocess
import sys

from conftest import repo_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke(tmp_path):
    """scripts/gpu_check.sh --smoke: the CUDA-marked tests collected (no CPU variant among them),
    benchmarks/gpu_step.py at tiny shapes with the Triton variant and the profile."""
    env = repo_env(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", OUT=str(tmp_path),
                   PYTHON=sys.executable, GPU_CHECK_BENCH_ARGS="--triton")
    r = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--smoke"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "pytest -m cuda: exit 0" in summary and "benchmarks/gpu_step.py: exit 0" in summary
    listed = (tmp_path / "cuda_tests.txt").read_text()
    for test in ("test_cuda.py::test_compiled_step_on_cuda_equals_eager",
                 "test_cuda.py::test_packed_step_on_the_device_equals_the_cpu_step[cuda]",
                 "test_attention.py::test_flex_forward_and_grads_on_gpu[None]",
                 "test_kernels.py::test_linear_cross_entropy[bf16]"):
        assert test in listed
    assert "[cpu]" not in listed
    res = json.loads((tmp_path / "gpu_step.json").read_text())
    assert res["kernels"] and all(k["ok"] for k in res["kernels"].values()), res["kernels"]
    shape = res["shapes"]["smoke"]
    assert all("error" not in shape[w] for w in ("hf", "evo", "evo_same_tokens", "evo_triton")), shape
    # Same weights, same tokens: evo's losses are HF's within bf16 noise.
    assert shape["loss_max_rel_diff"] <= 2e-2
    assert "| smoke | evo |" in (tmp_path / "gpu_step.md").read_text()
    # --profile: one more evo step, its operators by self time, the trace beside them.
    top = shape["evo"]["profile"]
    assert top and any(r["name"] in ("aten::mm", "aten::addmm", "aten::bmm") for r in top)
    assert (tmp_path / "profile_smoke" / "trace_rank0.json").exists()
    assert "One evo step of smoke" in (tmp_path / "gpu_step.md").read_text()
