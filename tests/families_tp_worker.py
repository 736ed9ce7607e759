"""One process of the families' plan-equivalence check (launched by tests/test_hf_families.py under
torchrun, 4 processes): tests/sweep_worker.py's comparison — losses, gathered final params and
measured communication bytes against the single-process step — for the Qwen2 (tied, q/k/v bias),
Qwen3 (per-head q/k norms, head_dim 12 ≠ 32 / 4) and Mistral (window 5 < documents) families,
under tensor parallelism with and without sequence parallelism, ZeRO-3, and their mixes (2-process
plans on the first two ranks).
"""
import datetime
import json
import sys

import torch
import torch.distributed as dist

from evo import models, optim, train, tree
from evo.models import mistral, qwen2, qwen3
from evo.sharding import Plan, planner
from evo.sharding.mesh import build_mesh
from sweep_worker import SOURCES, global_batches, local_batch, norm_rel, rel

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4,
            intermediate_size=48)
CONFIGS = {"qwen2": qwen2.Config(**TINY, tie_embeddings=True),
           "qwen3": qwen3.Config(**TINY, head_dim=12),
           "mistral": mistral.Config(**TINY, sliding_window=5)}
# The sweep's AdamW with eps=1e-3: Adam's update has slope lr/eps in a gradient component near eps,
# so with eps=1e-8 an fp32 rounding difference (summing partial results in another order) in a
# component near zero moves that element by up to ~1e5·lr·1e-8 — per-head norms make such
# components common. eps=1e-3 bounds the slope by lr while the gradients here (1e-3 .. 1e-1) are
# still normalised as usual; a wrong gradient (a missing tp reduction) still moves the params by
# more than 1e-3.
OPT = optim.adamw(lr=optim.warmup_cosine(peak=1e-3, warmup=1, total_steps=3), weight_decay=0.1,
                  clip_norm=1.0, eps=1e-3)
# name -> (plan, world size)
PLANS = {"tp2": (Plan(dp=1, tp=2), 2), "tp2-sp": (Plan(dp=1, tp=2, sequence_parallel=True), 2),
         "dp2-zero3": (Plan(dp=2, zero=3), 2), "dp2-tp2-zero3": (Plan(dp=2, tp=2, zero=3), 4),
         "tp4-sp-zero1": (Plan(dp=1, tp=4, zero=1, sequence_parallel=True), 4)}


def initial_params(cfg):
    """``models.init``, with norm weights and biases moved away from 1 and 0 so they matter."""
    g = torch.Generator().manual_seed(1)
    specs = models.param_specs(cfg)
    return {k: v + 0.2 * torch.randn(v.shape, generator=g) if specs[k].init in ("ones", "zeros")
            else v for k, v in models.init(cfg, seed=0).items()}


def check(cfg, plan, world, batches, reference, opt=OPT):
    """This plan's losses, params and comm bytes against the single-process ``reference`` (the
    step with the same ``opt``; None on a rank outside the plan's world)."""
    params0, ref_state, ref_losses = reference
    mesh = build_mesh(plan, ranks=list(range(world)))
    if mesh is None:
        return None
    sharded = planner.shard(train.Step(cfg, opt, sources=SOURCES), plan, mesh)
    state = planner.init_state(cfg, opt, planner.shard_params(cfg, params0, mesh), mesh)
    losses, comm = [], []
    for b in batches:
        state, m = sharded(state, local_batch(b, mesh.coords["dp"], mesh.plan.dp))
        losses.append(float(m["loss"]))
        comm.append(m["comm_bytes"])
    full = planner.gather_params(cfg, state.params, mesh)
    return {"loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            "param_rel": max(rel(full[k], ref_state.params[k]) for k in full),
            "param_norm_rel": max(norm_rel(full[k], ref_state.params[k]) for k in full),
            "comm_bytes": comm}


def main(out_path):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    batches = global_batches(TINY["vocab_size"])
    results = {}
    for fam, cfg in CONFIGS.items():
        params0 = initial_params(cfg)
        state, losses = train.init_state(tree.clone(params0), OPT), []
        for b in batches:
            state, m = train.Step(cfg, OPT, sources=SOURCES)(state, b)
            losses.append(float(m["loss"]))
        for name, (plan, world) in PLANS.items():
            results[f"{fam}/{name}"] = check(cfg, plan, world, batches, (params0, state, losses))
            dist.barrier()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
