"""Hybrid ZeRO under a pipeline on 8 gloo processes: pp2 × dp4 with ZeRO-1 and ZeRO-2 in groups of
2, each checked as the equivalence sweep checks its plans (too slow for CI: 8 processes).

    python scripts/pp_hybrid_zero.py        # launches tests/sweep_worker.py's checks on 8 ranks

Against one process over 3 steps of 8 micro-batches (2 per data-parallel rank, at least pp): loss
and gradient norm relative 1e-5, each parameter's update L2-relative 1e-3, the bytes measured per
collective on every rank equal to ``planner.expected_comm_bytes`` at its pp index, the final
state's checkpoint round trip bitwise, and a one-process checkpoint loaded bitwise. Exit status 0
when every check holds; the figures are printed.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
PLANS = {"pp2-dp4-zero1-group2": dict(dp=4, pp=2, zero=1, zero_group=2),
         "pp2-dp4-zero2-group2": dict(dp=4, pp=2, zero=2, zero_group=2)}
GLOBAL_MICRO = 8


def worker(out_path: str) -> None:
    import sweep_worker as W
    from evo.sharding import Plan
    W.GLOBAL_MICRO = GLOBAL_MICRO
    W.CASES[:] = [W.Case(name, Plan(**kw), 8) for name, kw in PLANS.items()]
    W.main(out_path)


def check(results: dict) -> None:
    import torch
    import sweep_worker as W
    from evo.sharding import Plan, planner
    for name, kw in PLANS.items():
        r, plan = results[name], Plan(**kw).resolve(8)
        print(f"{name}: loss {r['loss_rel']:.2g}, grad norm {r['grad_norm_rel']:.2g}, update "
              f"{r['update_rel']:.2g} (relative); checkpoint round trip {r['checkpoint_equal']}, "
              f"one-process checkpoint loads {r['one_process_checkpoint_loads']}")
        assert r["loss_rel"] <= 1e-5 and r["grad_norm_rel"] <= 1e-5, name
        assert r["update_rel"] <= 1e-3 and r["func_grad_rel"] <= 1e-6, name
        assert r["checkpoint_equal"] and r["one_process_checkpoint_loads"], name
        for pp_index, steps in r["comm_bytes_by_rank"]:
            want = planner.expected_comm_bytes(
                W.MODELS["llama-odd"], plan, micro_num=GLOBAL_MICRO // plan.dp,
                tokens_per_micro=W.T, sources=W.SOURCES, compute_dtype=torch.float32,
                pp_index=pp_index)
            assert all(measured == want for measured in steps), (name, pp_index, steps, want)
        print(f"{name}: measured bytes = the model on all {len(r['comm_bytes_by_rank'])} ranks")


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker(sys.argv[1])
    else:
        out = os.path.join(tempfile.mkdtemp(), "hybrid.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
        rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "8", os.path.abspath(__file__), out],
                            env=env).returncode
        if rc:
            sys.exit(rc)
        sys.path.insert(0, REPO)
        check(json.load(open(out))["plans"])
