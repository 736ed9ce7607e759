"""What the planner costs when there is nothing to distribute: `evo.shard(step, Plan())` on a
one-process mesh against the plain `train.Step`, same model, same batch, one process, CPU.

Alternating steps (so both see the same machine), warm-up first, then the median of each.

    python benchmarks/plan_overhead.py --steps 15
"""
import argparse
import statistics
import time

import torch

from evo import optim, train, tree
from evo.models import llama
from evo.sharding import Plan, planner, shard
from evo.sharding.mesh import build_mesh


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    cfg = llama.Config(vocab_size=8192, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=8, num_kv_heads=4, intermediate_size=688)
    opt = optim.adamw(lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.batch, args.seq), generator=g)
    batch = {"tokens": tokens, "labels": tokens}
    plain = train.Step(cfg, opt, donate=True)
    mesh = build_mesh(Plan())
    sharded = shard(plain, Plan(), mesh)
    params = llama.init(cfg, seed=0)
    states = {"plain": train.init_state(tree.clone(params), opt),
              "planned": planner.init_state(cfg, opt, tree.clone(params), mesh)}
    fns = {"plain": plain, "planned": sharded}
    times = {k: [] for k in fns}
    for i in range(args.steps + 2):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            states[name], m = fn(states[name], batch)
            float(m["loss"])
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    same = all(torch.equal(states["plain"].params[k], states["planned"].params[k])
               for k in params)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\none process, CPU ({torch.get_num_threads()} threads), h{args.hidden} "
          f"L{args.layers}, {args.batch}x{args.seq} tokens, {args.steps} steps each")
    print(f"{'step':<10}{'median ms':>10}{'tokens/s':>10}")
    for k, t in med.items():
        print(f"{k:<10}{t * 1e3:>10.1f}{args.batch * args.seq / t:>10.0f}")
    print(f"\nplanned / plain = {med['planned'] / med['plain']:.3f} (target <= 1.02); "
          f"params after {args.steps + 2} steps bitwise equal: {same}")


if __name__ == "__main__":
    main()
