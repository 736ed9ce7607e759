"""One process of the plan-equivalence sweep (launched by tests/test_sharding.py under torchrun).

Every process computes the single-process reference itself (a tiny model: cheap), then runs each
plan of the sweep on a mesh over the first ``plan world size`` ranks, and rank 0 writes, per plan,
the largest relative differences of the losses and of the gathered final params, the measured
communication bytes, and the per-rank state bytes.
"""
import dataclasses
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

from evo import optim, train, tree
from evo.models import llama
from evo.sharding import Plan, planner
from evo.sharding.mesh import build_mesh

CFG = llama.Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4,
                   intermediate_size=48)
TIED = dataclasses.replace(CFG, tie_embeddings=True)


def config_for(name):
    return TIED if name.endswith("-tied") else CFG
OPT = optim.adamw(lr=optim.warmup_cosine(peak=1e-3, warmup=1, total_steps=3), weight_decay=0.1,
                  clip_norm=1.0)
STEPS, GLOBAL_MICRO, T = 3, 4, 32
SOURCES = 3  # per-source loss: every token carries a source id in [-1, SOURCES)

# (name, plan, world size)
PLANS = [
    *[(f"dp2-zero{z}", Plan(dp=2, zero=z), 2) for z in range(4)],
    *[(f"dp4-zero{z}", Plan(dp=4, zero=z), 4) for z in range(4)],
    ("dp4-zero1-group2", Plan(dp=4, zero=1, zero_group=2), 4),
    ("dp4-zero3-group2", Plan(dp=4, zero=3, zero_group=2), 4),
    ("tp2", Plan(dp=1, tp=2), 2),
    ("tp2-sp", Plan(dp=1, tp=2, sequence_parallel=True), 2),
    ("tp4", Plan(dp=1, tp=4), 4),
    ("tp4-sp-zero3", Plan(dp=1, tp=4, zero=3, sequence_parallel=True), 4),
    ("dp2-tp2-zero1", Plan(dp=2, tp=2, zero=1), 4),
    ("dp2-tp2-zero3", Plan(dp=2, tp=2, zero=3), 4),
    ("dp4-zero3-tied", Plan(dp=4, zero=3), 4),
    ("dp2-tp2-zero2-sp", Plan(dp=2, tp=2, zero=2, sequence_parallel=True), 4),
    # gradient reduction after backward (bucket_mb=0) and in many small buckets during it
    ("dp2-zero0-unbucketed", Plan(dp=2, zero=0, bucket_mb=0), 2),
    ("dp2-zero1-buckets", Plan(dp=2, zero=1, bucket_mb=0.01), 2),
    ("dp4-zero2-group2-buckets", Plan(dp=4, zero=2, zero_group=2, bucket_mb=0.01), 4),
]


def global_batches():
    """STEPS global batches of GLOBAL_MICRO packed micro-batches of T tokens."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, CFG.vocab_size, (GLOBAL_MICRO, T), generator=g)
        labels = torch.roll(tokens, -1, dims=-1)
        cus = []
        for i in range(GLOBAL_MICRO):
            cuts = sorted(torch.randperm(T - 1, generator=g)[:2].add(1).tolist())
            cu = [0, *cuts, T]
            for end in cu[1:]:
                labels[i, end - 1] = -100
            cus.append(cu)
        source = torch.randint(-1, SOURCES, (GLOBAL_MICRO, T), generator=g)
        out.append({"tokens": tokens, "labels": labels, "source": source,
                    "cu_seqlens": torch.tensor(cus, dtype=torch.int32)})
    return out


def local_batch(batch, dp_index, dp):
    m = GLOBAL_MICRO // dp
    return {k: v[dp_index * m:(dp_index + 1) * m] for k, v in batch.items()}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def norm_rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def func_grad_check(cfg, params, mesh, batch):
    """torch.func.grad through the plan's collectives equals autograd (evo's autograd.Functions
    define setup_context): the largest relative difference over this rank's gradients."""
    from evo.sharding import comm as C
    from evo.sharding.layout import model_layouts
    regions = planner.ShardedRegions(C.Comm(mesh.groups, mesh.sizes, C.CommLog()), mesh,
                                     model_layouts(mesh.plan, cfg))
    tokens, labels, _, cu = next(train.micro_batches(batch))
    step = train.Step(cfg, OPT)

    def loss(p):
        return step.loss_sum(p, tokens, labels, None, cu, regions)[0]
    g_func = torch.func.grad(loss)(params)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    g_auto = torch.autograd.grad(loss(leaves), list(leaves.values()))
    return max(rel(g_func[k], g) for k, g in zip(leaves, g_auto))


def main(out_path):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    rank = dist.get_rank()
    batches = global_batches()
    reference = {}
    for cfg in (CFG, TIED):
        params0 = llama.init(cfg, seed=0)
        state, losses, sources = train.init_state(tree.clone(params0), OPT), [], []
        for b in batches:
            state, m = train.Step(cfg, OPT, sources=SOURCES)(state, b)
            losses.append(float(m["loss"]))
            sources.append(m["source_loss_sum"] / m["source_tokens"])
        reference[cfg] = (params0, state, losses, sources)

    results = {"reference_losses": reference[CFG][2], "plans": {}}
    only = os.environ.get("SWEEP_ONLY")
    for name, plan, world in PLANS:
        if only and name not in only.split(","):
            continue
        print(rank, name, flush=True)
        cfg = config_for(name)
        params0, ref_state, ref_losses, ref_sources = reference[cfg]
        mesh = build_mesh(plan, ranks=list(range(world)))
        if mesh is not None:
            sharded = planner.shard(train.Step(cfg, OPT, sources=SOURCES), plan, mesh)
            state = planner.init_state(cfg, OPT, planner.shard_params(cfg, params0, mesh), mesh)
            pieces = {"params": tree.num_bytes(state.params),
                      "optimizer": tree.num_bytes((state.opt_state.mu, state.opt_state.nu))}
            losses, comm, source_rel = [], [], 0.0
            for b, ref_src in zip(batches, ref_sources):
                state, m = sharded(state, local_batch(b, mesh.coords["dp"], mesh.plan.dp))
                losses.append(float(m["loss"]))
                source_rel = max(source_rel, rel(m["source_loss_sum"] / m["source_tokens"],
                                                 ref_src))
                comm.append(m["comm_bytes"])
            full = planner.gather_params(cfg, state.params, mesh)
            func_rel = func_grad_check(cfg, state.params, mesh, local_batch(batches[0],
                                       mesh.coords["dp"], mesh.plan.dp))
            if mesh.rank == 0:
                results["plans"][name] = {
                    "plan": repr(mesh.plan), "world": world, "losses": losses,
                    "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
                    "param_rel": max(rel(full[k], ref_state.params[k]) for k in full),
                    "param_norm_rel": max(norm_rel(full[k], ref_state.params[k]) for k in full),
                    "worst": max(full, key=lambda k: rel(full[k], ref_state.params[k])),
                    "comm_bytes": comm, "state_bytes": pieces, "func_grad_rel": func_rel,
                    "source_loss_rel": source_rel}
        dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
