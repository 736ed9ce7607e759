"""Long context on 4 CPU processes: activation memory per rank against sequence length for one
process, Ulysses (sp4) and ring attention (cp4), next to ``evo plan``'s prediction; and the bytes
per layer each sends.

Launch under torchrun (4 processes; the one-process baseline runs on rank 0 in the same run):

    torchrun --nproc-per-node 4 benchmarks/long_context.py --seqs 8192 16384 32768 65536
    torchrun --nproc-per-node 4 benchmarks/long_context.py --plans one cp4   # some of the plans

Memory measured: the bytes autograd keeps for backward during one micro-batch's forward (every
tensor saved by an op, counted once per storage, parameters excluded), on each rank; the table
shows the largest rank. The prediction is ``evo.sharding.context.activation_bytes``, the model
``evo plan`` prints. Next to it the process's peak resident memory during that micro-batch's
forward and backward over its resident memory just before (Linux: the high-water mark reset
through ``/proc/self/clear_refs``, freed heap returned by ``malloc_trim`` first): activations,
gradients and every transient (attention's blocks of scores, the logits), the largest rank. Bytes sent: the step's ``comm_bytes`` per layer, Ulysses all-to-all (sp) and
ring send/receive (cp), next to ``context.bytes_per_layer``.
"""
import argparse
import ctypes
import dataclasses
import datetime
import json

import torch
import torch.distributed as dist

from evo import optim, train
from evo.models import llama
from evo.sharding import Plan, context, planner
from evo.sharding import comm as C
from evo.sharding.mesh import build_mesh

CFG = llama.Config(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                   intermediate_size=128)


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, but ``exclude``'s."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def resident(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def rss_growth(fn) -> int:
    """This process's peak resident bytes while ``fn`` runs, over its resident bytes before."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to the current VmRSS
    before = resident("VmRSS")
    fn()
    return resident("VmHWM") - before


def measure(plan: Plan, seq: int, ranks: list[int]) -> dict | None:
    """Activation bytes and bytes sent per layer on this rank, for one packed row of ``seq``
    tokens (3 documents) under ``plan`` over ``ranks``."""
    mesh = build_mesh(plan, ranks=ranks)
    if mesh is None:
        return None
    step = train.Step(CFG, optim.adamw(lr=1e-3))
    planner.shard(step, plan, mesh)   # the plan's checks
    params = planner.init_params(CFG, 0, mesh)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (1, seq), generator=g)
    cu = torch.tensor([[0, seq // 3, seq // 2, seq]], dtype=torch.int32)
    batch = {"tokens": tokens, "labels": tokens.roll(-1, -1), "cu_seqlens": cu}
    local = context.split_batch(batch, mesh.plan, mesh.coords) \
        if plan.cp * plan.sp > 1 else batch
    comm = C.Comm(mesh.groups, mesh.sizes, C.CommLog())
    regions = planner.ShardedRegions(comm, mesh, planner.model_layouts(mesh.plan, CFG), CFG)
    leaves = {k: v.requires_grad_(True) for k, v in params.items()}
    micro = next(train.micro_batches(local))
    exclude = {v.untyped_storage().data_ptr() for v in leaves.values()}

    def forward_backward():
        losses = step.token_losses(leaves, micro[0], micro[1], micro[2], micro[3], regions)
        forward_backward.loss = losses.sum()
    def run():
        run.act = saved_bytes(forward_backward, exclude)
        forward_backward.loss.backward()
    rss = rss_growth(run)
    act = run.act
    sent = {k: v // CFG.num_layers for k, v in comm.log.bytes.items()
            if k.split("/")[0] in ("all_to_all", "send_recv")}
    return {"measured": act, "rss": rss, "sent": sent}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    ap.add_argument("--plans", nargs="+", default=["one", "sp4", "cp4"],
                    choices=["one", "sp4", "cp4"], help="the plans to measure (one: one process)")
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3600))
    rank, world = dist.get_rank(), dist.get_world_size()
    plans = {"one process": (Plan(dp=1), [0]), "sp4": (Plan(dp=1, sp=world), list(range(world))),
             "cp4": (Plan(dp=1, cp=world), list(range(world)))}
    plans = {k: v for k, v in plans.items() if k.split()[0] in args.plans}
    rows = []
    for seq in args.seqs:
        for name, (plan, ranks) in plans.items():
            r = measure(plan, seq, ranks)
            worst = torch.tensor([r["measured"], r["rss"]] if r else [0, 0])
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            dist.barrier()
            if rank == 0:
                resolved = plan.resolve(len(ranks))
                predicted = context.activation_bytes(CFG, resolved, seq)["total"]
                rows.append({"seq": seq, "plan": name, "measured": int(worst[0]),
                             "rss": int(worst[1]), "predicted": predicted, "sent": r["sent"],
                             "sent_predicted": context.bytes_per_layer(CFG, resolved, seq, 4)})
                print(f"# {datetime.datetime.now():%H:%M:%S} {rows[-1]}", flush=True)
                if args.out:   # as it goes: the longest rows take minutes each
                    with open(args.out, "w") as f:
                        json.dump(rows, f, indent=1)
    if rank == 0:
        print(f"model {dataclasses.asdict(CFG)}; activation MiB per rank (largest rank), "
              "bytes sent per layer and micro-batch (fp32)")
        print("| seq | plan | activations MiB | predicted MiB | error | vs one process | "
              "peak RSS growth MiB | sent per layer (measured = model) |")
        print("|---|---|---|---|---|---|---|---|")
        base = {r["seq"]: r["measured"] for r in rows if r["plan"] == "one process"}
        for r in rows:
            err = r["predicted"] / r["measured"] - 1
            sent = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(r["sent"].items()))
            same = "=" if r["sent"] == r["sent_predicted"] else "≠"
            print(f"| {r['seq']} | {r['plan']} | {r['measured'] / 2**20:.1f} | "
                  f"{r['predicted'] / 2**20:.1f} | {err:+.1%} | "
                  f"{r['measured'] / base[r['seq']] if r['seq'] in base else float('nan'):.2f}"
                  f" | {r['rss'] / 2**20:.0f} | "
                  f"{sent or '-'} {same if sent else ''} |", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
