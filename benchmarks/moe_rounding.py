"""How far fp32 rounding moves the params of the sweep's mixture-of-experts cases, by AdamW eps.

    torchrun --nproc-per-node 4 benchmarks/moe_rounding.py              # about a minute on 2 cores
    torchrun --nproc-per-node 4 benchmarks/moe_rounding.py --eps 1e-8,1e-6 --out moe_rounding.json

The equivalence sweep's Mixtral model, data and optimizer (``tests/sweep_worker.py``) with AdamW's
``eps`` set to each value given: one process in fp32 and in fp64 (the baseline: the rounding of
one fp32 process itself, and the smallest margin of a chosen top-k expert over the next score),
then each Mixtral case of the sweep for 3 steps. Rank 0 prints a Markdown table: per case and
eps, the params' relative L2 difference (worst tensor) after the first step and after the 3
steps, from one fp32 process and from one fp64 process.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import sweep_worker as W  # noqa: E402
from evo import train  # noqa: E402
from evo.sharding import planner  # noqa: E402
from evo.sharding.mesh import build_mesh  # noqa: E402

MODEL = "mixtral-odd"


def worst_rel(a: dict, b: dict) -> tuple[float, str]:
    """The largest ``||a - b|| / ||b||`` over the tensors, and its name."""
    r = {k: ((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item() for k in b}
    k = max(r, key=r.get)
    return r[k], k


def plan_run(case: W.Case, step: train.Step) -> list[dict] | None:
    """The case's plan for the sweep's steps: the gathered params after each (None off-mesh)."""
    mesh = build_mesh(case.plan, ranks=list(range(case.world)))
    dist.new_group(list(range(case.world)))
    if mesh is None:
        return None
    cfg = step.model
    sharded = planner.shard(step, case.plan, mesh)
    state = planner.init_state(cfg, step.optimizer,
                               planner.shard_params(cfg, W.init_params(cfg), mesh), mesh)
    out = []
    for b in W.global_batches(cfg.vocab_size):
        state, _ = sharded(state, W.local_batch(b, mesh.coords["dp"], mesh.plan.dp))
        out.append(planner.gather_params(cfg, state.params, mesh))
    return out


def measure(eps: float) -> list[dict]:
    """Rank 0's rows at one ``eps``: the one-process baseline, then every Mixtral case."""
    rows, first = [], dist.get_rank() == 0
    for case in [c for c in W.CASES if c.model == MODEL]:
        step = W.step_for(case)
        step = dataclasses.replace(step, optimizer=dataclasses.replace(step.optimizer, eps=eps))
        if first and not rows:
            p32, margin = W.one_process_margins(step, torch.float32)
            p64, _ = W.one_process_margins(step, torch.float64)
            rows.append({"case": "one process fp32", "eps": eps, "margin": margin,
                         "step1_fp32": 0.0, "fp32": 0.0, "fp64": worst_rel(p32[-1], p64[-1])[0],
                         "worst": worst_rel(p32[-1], p64[-1])[1]})
        got = plan_run(case, step)
        if got is not None and first:
            rows.append({"case": case.name, "eps": eps,
                         "step1_fp32": worst_rel(got[0], p32[0])[0],
                         "fp32": worst_rel(got[-1], p32[-1])[0],
                         "fp64": worst_rel(got[-1], p64[-1])[0],
                         "worst": worst_rel(got[-1], p32[-1])[1]})
        dist.barrier()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eps", default="1e-8,1e-6", help="comma-separated AdamW eps values")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    rows = [r for eps in args.eps.split(",") for r in measure(float(eps))]
    if dist.get_rank() == 0:
        print("| case | eps | params L2-rel after step 1 (fp32 ref) | after 3 steps (fp32 ref) "
              "| after 3 steps (fp64 ref) | worst tensor | min top-k margin |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            margin = f"{r['margin']:.1e}" if "margin" in r else ""
            print(f"| {r['case']} | {r['eps']:g} | {r['step1_fp32']:.2e} | {r['fp32']:.2e} | "
                  f"{r['fp64']:.2e} | {r['worst']} | {margin} |")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
