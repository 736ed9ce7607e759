"""One process of the plan-equivalence sweep (launched by tests/test_sharding.py under torchrun).

Every process computes the single-process reference steps itself (tiny models: cheap), then runs
each case of the sweep on a mesh over the first ``world`` ranks, and rank 0 writes, per case, the
largest relative differences of the losses, the gradient norms, the per-source losses and the
final params (gathered), the measured communication bytes and the per-rank state bytes.

A case is ``(name, plan, world, model, dtype, remat)``: ``model`` names an entry of ``MODELS``, so
adding a model family to the sweep is one entry there and one line per plan in ``CASES``.
"""
import dataclasses
import datetime
import json
import os
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist

from evo import models, optim, train, tree
from evo.models import llama, mixtral, qwen3
from evo.sharding import Plan, planner
from evo.sharding.mesh import build_mesh

_EVEN = llama.Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4,
                     intermediate_size=48)
_ODD = dataclasses.replace(_EVEN, vocab_size=66, intermediate_size=50)
MODELS = {
    # tp=4 divides every dimension, and so do the ZeRO groups: no padding
    "llama": _EVEN,
    # tp=2 divides vocab and ffn (66 = 2·33, 50 = 2·25) but ZeRO groups of 2 and 4 do not divide
    # the pieces' first dimension (embed, lm_head's rows hold 32; w2, embed: 25, 33, 50, 66), so
    # ZeRO padding runs
    "llama-odd": _ODD,
    "llama-odd-tied": dataclasses.replace(_ODD, tie_embeddings=True),
    # Qwen3: per-head q/k norms (replicated weights whose gradients tensor parallelism completes
    # through regions.inside) and a head_dim (12) independent of hidden_size / num_heads
    "qwen3-odd": qwen3.Config(vocab_size=66, hidden_size=32, num_layers=2, num_heads=8,
                              num_kv_heads=4, intermediate_size=50, head_dim=12),
    # two kv heads: Ulysses over 4 ranks replicates each kv head twice
    "llama-kv2": dataclasses.replace(_ODD, num_kv_heads=2),
    # Mixtral: 4 experts, top-2, the balancing loss in the gradient and the balancing bias moved
    # by the dp-summed expert loads each step; the router is a replicated weight inside the
    # tensor-parallel region (regions.inside)
    "mixtral-odd": mixtral.Config(vocab_size=66, hidden_size=32, num_layers=2, num_heads=8,
                                  num_kv_heads=4, intermediate_size=50, num_experts=4, top_k=2,
                                  aux_loss_coef=0.05, bias_update_rate=0.01),
}


def init_params(cfg):
    return models.init(cfg, seed=0)


# clip_norm sits below every step's gradient norm (≈ 0.84–1.12 on this data): clipping is active
CLIP = 0.5
OPT = optim.adamw(lr=optim.warmup_cosine(peak=1e-2, warmup=1, total_steps=3), weight_decay=0.1,
                  clip_norm=CLIP)
# The mixture of experts' optimizer: eps 1e-6 bounds AdamW's gain on a gradient's rounding,
# lr·eps / (|g| + eps)² at the first step, to lr / eps = 1e4 (1e6 at eps 1e-8, where a few expert
# weights whose exact gradient is 1e-9..1e-8, a cancellation, carry fp32 rounding errors of 1e-11
# that differ with the summation order tensor parallelism takes: the params of one fp32 process are
# then 6e-6 from fp64 and a tp plan 1.3e-5 from one fp32 process); elements with |g| ≫ eps still
# move by ≈ ±lr. tests/test_sharding.py asserts the one-process fp32 run within 3e-6 of fp64.
OPTIMIZERS = {"mixtral-odd": dataclasses.replace(OPT, eps=1e-6)}
STEPS, GLOBAL_MICRO, T = 3, 4, 32
SOURCES = 3  # per-source loss: every token carries a source id in [-1, SOURCES)


class Case(NamedTuple):
    name: str
    plan: Plan
    world: int
    model: str = "llama-odd"
    dtype: str = "float32"     # the step's compute dtype
    remat: float = 0.0         # fraction of layers recomputed in backward


CASES = [
    *[Case(f"dp2-zero{z}", Plan(dp=2, zero=z), 2) for z in range(4)],
    *[Case(f"dp4-zero{z}", Plan(dp=4, zero=z), 4) for z in range(4)],
    # hybrid ZeRO: shards inside groups of 2, replicated across the two groups
    Case("dp4-zero1-group2", Plan(dp=4, zero=1, zero_group=2), 4),
    Case("dp4-zero3-group2", Plan(dp=4, zero=3, zero_group=2), 4),
    Case("tp2", Plan(dp=1, tp=2), 2),
    Case("tp2-sp", Plan(dp=1, tp=2, sequence_parallel=True), 2),
    Case("tp4", Plan(dp=1, tp=4), 4, "llama"),
    Case("tp4-sp-zero3", Plan(dp=1, tp=4, zero=3, sequence_parallel=True), 4, "llama"),
    Case("dp2-tp2-zero1", Plan(dp=2, tp=2, zero=1), 4),
    Case("dp2-tp2-zero3", Plan(dp=2, tp=2, zero=3), 4),
    Case("dp2-tp2-zero2-sp", Plan(dp=2, tp=2, zero=2, sequence_parallel=True), 4),
    Case("dp2-tp2-zero1-sp", Plan(dp=2, tp=2, zero=1, sequence_parallel=True), 4),
    # tied embeddings: the embedding is also the (vocab-parallel under tp) output projection
    Case("dp4-zero3-tied", Plan(dp=4, zero=3), 4, "llama-odd-tied"),
    Case("dp2-tp2-zero1-tied", Plan(dp=2, tp=2, zero=1), 4, "llama-odd-tied"),
    # gradient reduction after backward (bucket_mb=0), for every ZeRO stage, and in many small
    # buckets during backward
    Case("dp2-zero0-unbucketed", Plan(dp=2, zero=0, bucket_mb=0), 2),
    Case("dp2-zero1-unbucketed", Plan(dp=2, zero=1, bucket_mb=0), 2),
    Case("dp4-zero2-group2-unbucketed", Plan(dp=4, zero=2, zero_group=2, bucket_mb=0), 4),
    Case("dp4-zero3-unbucketed", Plan(dp=4, zero=3, bucket_mb=0), 4),
    Case("dp2-zero1-buckets", Plan(dp=2, zero=1, bucket_mb=0.01), 2),
    Case("dp4-zero2-group2-buckets", Plan(dp=4, zero=2, zero_group=2, bucket_mb=0.01), 4),
    # recomputation, and bf16 compute (compared with the single-process bf16 step)
    Case("dp2-tp2-zero2-remat", Plan(dp=2, tp=2, zero=2), 4, remat=0.5),
    Case("dp2-zero1-bf16", Plan(dp=2, zero=1), 2, dtype="bfloat16"),
    Case("tp2-sp-bf16-remat", Plan(dp=1, tp=2, sequence_parallel=True), 2, dtype="bfloat16",
         remat=1.0),
    Case("dp2-tp2-zero3-bf16", Plan(dp=2, tp=2, zero=3), 4, dtype="bfloat16"),
    # a second family on the same plans
    Case("qwen3-dp4-zero1-group2", Plan(dp=4, zero=1, zero_group=2), 4, "qwen3-odd"),
    Case("qwen3-dp2-zero3-unbucketed", Plan(dp=2, zero=3, bucket_mb=0), 2, "qwen3-odd"),
    Case("qwen3-tp2-sp", Plan(dp=1, tp=2, sequence_parallel=True), 2, "qwen3-odd"),
    Case("qwen3-dp2-tp2-zero3", Plan(dp=2, tp=2, zero=3), 4, "qwen3-odd"),
    Case("qwen3-dp2-tp2-zero2-sp-remat", Plan(dp=2, tp=2, zero=2, sequence_parallel=True), 4,
         "qwen3-odd", remat=0.5),
    # long context: each packed row (documents crossing the rank chunks) split over the sequence
    # group; Ulysses all-to-alls (sp), zigzag ring attention (cp), and both
    Case("sp2", Plan(dp=1, sp=2), 2),
    Case("sp4-kv2", Plan(dp=1, sp=4), 4, "llama-kv2"),
    Case("cp2", Plan(dp=1, cp=2), 2),
    Case("cp4-zigzag", Plan(dp=1, cp=4), 4),
    Case("sp2-cp2", Plan(dp=1, sp=2, cp=2), 4),
    Case("cp2-dp2-zero1", Plan(dp=2, cp=2, zero=1), 4),
    Case("cp2-tp2", Plan(dp=1, cp=2, tp=2), 4),
    Case("mixtral-dp2-tp2-zero3", Plan(dp=2, tp=2, zero=3), 4, "mixtral-odd"),
    Case("mixtral-dp2-tp2-zero1-sp-remat", Plan(dp=2, tp=2, zero=1, sequence_parallel=True), 4,
         "mixtral-odd", remat=1.0),
    # expert parallelism: experts split over ep, tokens dispatched and combined by all-to-all;
    # the balancing loss and bias stay those of one process (expert loads summed over dp)
    Case("mixtral-dp2-ep2", Plan(dp=2, ep=2), 2, "mixtral-odd"),
    Case("mixtral-dp4-ep4", Plan(dp=4, ep=4), 4, "mixtral-odd"),
    Case("mixtral-dp4-ep2-zero1", Plan(dp=4, ep=2, zero=1), 4, "mixtral-odd"),
    Case("mixtral-dp2-ep2-tp2", Plan(dp=2, ep=2, tp=2), 4, "mixtral-odd"),
    Case("mixtral-dp4-ep2-zero3", Plan(dp=4, ep=2, zero=3), 4, "mixtral-odd"),
    # ZeRO-2 (buckets: expert and other gradients in their own), and reduction after backward
    Case("mixtral-dp4-ep2-zero2", Plan(dp=4, ep=2, zero=2), 4, "mixtral-odd"),
    Case("mixtral-dp4-ep2-zero1-unbucketed", Plan(dp=4, ep=2, zero=1, bucket_mb=0), 4,
         "mixtral-odd"),
    # pipeline stages (the model's 4 blocks: embed, 2 layers, head) under each schedule, composed
    # with dp / ZeRO and tp + sequence parallelism; tied embeddings on the first and last stage
    Case("pp2-1f1b", Plan(dp=1, pp=2), 2),
    Case("pp4-1f1b", Plan(dp=1, pp=4), 4),
    Case("pp2-dp2-zero1", Plan(dp=2, pp=2, zero=1), 4),
    Case("pp2-tp2-sp", Plan(dp=1, pp=2, tp=2, sequence_parallel=True), 4),
    Case("pp2-interleaved", Plan(dp=1, pp=2, pp_schedule="interleaved", pp_virtual=2), 2),
    Case("pp2-zbh1", Plan(dp=1, pp=2, pp_schedule="zbh1"), 2),
    Case("pp2-zbv", Plan(dp=1, pp=2, pp_schedule="zbv", pp_virtual=2), 2),
    Case("pp2-tied", Plan(dp=1, pp=2), 2, "llama-odd-tied"),
    Case("pp2-dp2-zero2-unbucketed", Plan(dp=2, pp=2, zero=2, bucket_mb=0), 4),
    # weight parallelism: each block's weights sharded over the sequence group, gathered per
    # block (next one prefetched, again when recomputed), gradients reduce-scattered over it
    Case("sp2-wp", Plan(dp=1, sp=2, weight_parallel=True), 2),
]


def step_for(case: Case) -> train.Step:
    return train.Step(MODELS[case.model], OPTIMIZERS.get(case.model, OPT),
                      compute_dtype=getattr(torch, case.dtype), remat=case.remat, sources=SOURCES)


def global_batches(vocab_size: int):
    """STEPS global batches of GLOBAL_MICRO packed micro-batches of T tokens: three documents
    per micro-batch, each a random walk over the vocabulary (steps of 0, 1 or 2), so that three
    steps visibly lower the loss."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        start = torch.randint(0, vocab_size, (GLOBAL_MICRO, 1), generator=g)
        walk = torch.randint(0, 3, (GLOBAL_MICRO, T), generator=g).cumsum(-1)
        tokens = (start + walk) % vocab_size
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


def func_grad_check(step, params, mesh, batch):
    """torch.func.grad through the plan's collectives equals autograd (evo's autograd.Functions
    define setup_context): the largest relative difference over this rank's gradients."""
    from evo.sharding import comm as C
    from evo.sharding.layout import model_layouts
    if mesh.plan.pp > 1:
        return 0.0  # a pipeline stage runs no whole model; its tp collectives are checked above
    regions = planner.ShardedRegions(C.Comm(mesh.groups, mesh.sizes, C.CommLog()), mesh,
                                     model_layouts(mesh.plan, step.model), step.model)
    if mesh.plan.cp * mesh.plan.sp > 1:   # this rank's part of the sequence
        from evo.sharding import context
        batch = context.split_batch(batch, mesh.plan, mesh.coords)
    tokens, labels, positions, cu = next(train.micro_batches(batch))

    def loss(p):
        return step.loss_sum(p, tokens, labels, positions, cu, regions)[0]
    g_func = torch.func.grad(loss)(params)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    g_auto = torch.autograd.grad(loss(leaves), list(leaves.values()))
    return max(rel(g_func[k], g) for k, g in zip(leaves, g_auto))


def reference(case: Case, cache: dict):
    """The single-process run of the case's model and compute dtype (recomputation changes no
    number, so a remat case is compared with the plain step): params0, final state, metrics."""
    key = (case.model, case.dtype)
    if key not in cache:
        step = dataclasses.replace(step_for(case), remat=0.0)
        params0 = init_params(step.model)
        state, metrics = train.init_state(tree.clone(params0), step.optimizer), []
        for b in global_batches(step.model.vocab_size):
            state, m = step(state, b)
            metrics.append({"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                            "source": m["source_loss_sum"] / m["source_tokens"]})
        cache[key] = (params0, state, metrics)
    return cache[key]


def one_process_margins(step: train.Step, dtype: torch.dtype) -> tuple[list[dict], float]:
    """The sweep's steps in one process computing (master weights included) in ``dtype``: the
    params after each step, and the smallest margin of a chosen top-k expert's score (plus bias)
    over the next one in any MoE layer (``step.model`` has MoE layers)."""
    from evo.models import moe
    margins, route = [], moe.route

    def recording(scores, top_k, norm_topk_prob, bias=None):
        choose = scores if bias is None else scores + bias.to(scores.dtype)
        top = torch.topk(choose.detach(), top_k + 1, dim=-1).values
        margins.append(float((top[:, top_k - 1] - top[:, top_k]).min()))
        return route(scores, top_k, norm_topk_prob, bias)
    moe.route = recording
    try:
        one = dataclasses.replace(step, compute_dtype=dtype, remat=0.0)
        params0 = {k: v.to(dtype) for k, v in init_params(step.model).items()}
        state, out = train.init_state(params0, one.optimizer), []
        for b in global_batches(step.model.vocab_size):
            state, _ = one(state, b)
            out.append(state.params)
    finally:
        moe.route = route
    assert len(margins) == len(out) * GLOBAL_MICRO * len(step.model.moe_layers), len(margins)
    return out, min(margins)


def checkpoint_round_trip(cfg, state, full, mesh, group, root) -> bool:
    """Saved by this plan, the state loads back under it bitwise (ZeRO padding rows included), and
    its params load into one process as the gathered global params."""
    from evo import checkpoint
    from evo.sharding.mesh import Mesh
    checkpoint.Saver(root, mesh, asynchronous=False).save(cfg, state, loader_state={}, meta={})
    dist.barrier(group)  # rank 0 has published it
    path = checkpoint.resolve(root)
    loaded, _ = checkpoint.load_state(path, cfg, OPT, mesh)
    one = checkpoint.load_params(path, cfg, Mesh(Plan().resolve(1), 0))
    pairs = [(loaded.params, state.params), (loaded.opt_state.mu, state.opt_state.mu),
             (loaded.opt_state.nu, state.opt_state.nu), (one, full)]
    return all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b) for a, b in pairs)


def one_process_checkpoint_loads(cfg, ref_state, mesh, group, root) -> bool:
    """The reference's final state saved by one process loads under this plan as the pieces
    ``shard_params`` cuts from it (and ZeRO's optimizer shards), bitwise."""
    from evo import checkpoint
    from evo.sharding.mesh import Mesh
    if mesh.rank == 0:
        checkpoint.Saver(root, Mesh(Plan().resolve(1), 0), asynchronous=False).save(
            cfg, ref_state, loader_state={}, meta={})
    dist.barrier(group)
    loaded, _ = checkpoint.load_state(checkpoint.resolve(root), cfg, OPT, mesh)
    layouts = planner.local_layouts(cfg, mesh)
    cut = lambda full: planner.shard_params(cfg, full, mesh)  # noqa: E731
    pairs = [(loaded.params, cut(ref_state.params)),
             (loaded.opt_state.mu, planner._opt_view(cut(ref_state.opt_state.mu), layouts, mesh)),
             (loaded.opt_state.nu, planner._opt_view(cut(ref_state.opt_state.nu), layouts, mesh))]
    return all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b) for a, b in pairs)


def run_case(case: Case, ref, ckpt_root: str) -> dict | None:
    """The case's plan for STEPS steps; the differences from ``ref`` (on the mesh's rank 0)."""
    params0, ref_state, ref_metrics = ref
    step = step_for(case)
    mesh = build_mesh(case.plan, ranks=list(range(case.world)))
    group = dist.new_group(list(range(case.world)))  # the mesh's processes (collective call)
    if mesh is None:
        return None
    cfg, dp, dp_index = step.model, mesh.plan.dp, mesh.coords["dp"]
    sharded = planner.shard(step, case.plan, mesh)
    state = planner.init_state(cfg, step.optimizer, planner.shard_params(cfg, params0, mesh),
                               mesh)
    built = planner.init_params(cfg, 0, mesh)  # the same pieces, one parameter at a time
    init_equal = all(torch.equal(built[k], v) for k, v in state.params.items())
    pieces = {"params": tree.num_bytes(state.params),
              "optimizer": tree.num_bytes((state.opt_state.mu, state.opt_state.nu))}
    batches = global_batches(cfg.vocab_size)
    losses, norms, comm, calls, traffic, source_rel = [], [], [], [], [], 0.0
    for b, r in zip(batches, ref_metrics):
        state, m = sharded(state, local_batch(b, dp_index, dp))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
        source_rel = max(source_rel, rel(m["source_loss_sum"] / m["source_tokens"], r["source"]))
        comm.append(m["comm_bytes"])
        calls.append(m["comm_calls"])
        traffic.append(m.get("expert_traffic"))
    full = planner.gather_params(cfg, state.params, mesh)
    func_rel = func_grad_check(step, state.params, mesh, local_batch(batches[0], dp_index, dp))
    ckpt_equal = checkpoint_round_trip(cfg, state, full, mesh, group,
                                       os.path.join(ckpt_root, case.name))
    one_loads = one_process_checkpoint_loads(
        cfg, ref_state, mesh, group, os.path.join(ckpt_root, case.name + "-one")) \
        if mesh.plan.pp > 1 else True
    # every rank's checks, on rank 0: the largest gradient difference, and whether all agree
    worst = torch.tensor([func_rel, -float(ckpt_equal), -float(init_equal), -float(one_loads)],
                         dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    func_rel, ckpt_equal, init_equal = worst[0].item(), worst[1] < 0, worst[2] < 0
    one_loads = worst[3] < 0
    by_stage = [None] * case.world  # pipeline ranks differ: every rank's (pp index, bytes)
    if mesh.plan.pp > 1:
        dist.all_gather_object(by_stage, (mesh.coords["pp"], comm), group=group)
    if mesh.rank != 0:
        return None
    ref_p = ref_state.params
    # the update's error relative to the update itself: blind to nothing the step did
    update_rel = {k: norm_rel(full[k] - params0[k], ref_p[k] - params0[k]) for k in full}

    def worst_rel(xs, key):
        return max(abs(a - r[key]) / abs(r[key]) for a, r in zip(xs, ref_metrics))
    return {"plan": repr(mesh.plan), "world": case.world, "model": case.model,
            "dtype": case.dtype, "remat": case.remat, "losses": losses, "grad_norms": norms,
            "reference_losses": [r["loss"] for r in ref_metrics],
            "reference_grad_norms": [r["grad_norm"] for r in ref_metrics],
            "loss_rel": worst_rel(losses, "loss"), "grad_norm_rel": worst_rel(norms, "grad_norm"),
            "param_rel": max(rel(full[k], ref_p[k]) for k in full),
            "param_norm_rel": max(norm_rel(full[k], ref_p[k]) for k in full),
            "update_rel": max(update_rel.values()),
            "worst": max(update_rel, key=update_rel.get),
            "comm_bytes": comm, "comm_calls": calls,
            "comm_bytes_by_rank": [r for r in by_stage if r],
            "expert_traffic": traffic, "state_bytes": pieces, "func_grad_rel": func_rel,
            "source_loss_rel": source_rel, "checkpoint_equal": bool(ckpt_equal),
            "init_params_equal": bool(init_equal),
            "one_process_checkpoint_loads": bool(one_loads)}


def main(out_path):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    rank = dist.get_rank()
    results, cache = {}, {}
    only = os.environ.get("SWEEP_ONLY")
    for case in CASES:
        if only and case.name not in only.split(","):
            continue
        print(rank, case.name, flush=True)
        r = run_case(case, reference(case, cache), os.path.dirname(os.path.abspath(out_path)))
        if r is not None:
            results[case.name] = r
        dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"plans": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
