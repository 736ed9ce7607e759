"""Pipeline schedules on 4 CPU processes (gloo): the measured idle fraction next to its formula,
and each stage's peak of activations held for backward next to ``evo plan``'s prediction.

    python benchmarks/pipeline_bubble.py            # launches itself under torchrun (4 processes)

For each schedule (1F1B, interleaved with 2 stages per rank, ZB-H1, ZB-V) and 4, 8 and 16
micro-batches, a pp=4 plan trains a small LLaMA (6 layers: 8 blocks) for 3 steps with every layer
recomputed in backward (``remat=1``: a stage keeps each layer's input per micro-batch in flight,
what ``evo plan`` counts). Reported, over the last two steps:

- ``idle``: the step's ``pp_idle`` metric (time waiting in receives over the schedule's time,
  averaged over the pp ranks), next to the formula (as a fraction of the whole time:
  b / (1 + b) with b = (p−1)/m for 1F1B, (p−1)/(v·m) interleaved, 0 for zero-bubble);
- ``act peak / plan``: the largest bytes of non-parameter floating tensors saved for backward
  that are alive at once on a rank (saved-tensor hooks, released when autograd frees them), worst
  rank relative to ``pipeline.stage_report``'s activations of that rank.

The stages with the embedding or the head are lighter than the others, so the zero-bubble
schedules idle where F ≈ B ≈ W does not hold, and the idle fraction means something only with a
core per process. Saved-tensor hooks never release what a node run only in a
``retain_graph=True`` pass packed (ZB-V's head-only stage: its norm's input gradient), so there
the peak over-counts (docs/plans.md, Pipeline).
"""
import datetime
import os
import subprocess
import sys
import weakref

import torch
import torch.distributed as dist

SCHEDULES = (("1f1b", 1), ("interleaved", 2), ("zbh1", 1), ("zbv", 2))
MICRO = (4, 8, 16)
PP, T, STEPS = 4, 128, 3


class SavedBytes:
    """Saved-tensor hooks counting the bytes of distinct non-parameter floating storages alive."""

    def __init__(self, params):
        self.params = {v.untyped_storage().data_ptr() for v in params.values()}
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params or not t.dtype.is_floating_point:
            return t
        if ptr not in self.refs:
            self.live += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        weakref.finalize(t, self.release, ptr, t.untyped_storage().nbytes())
        return t

    def release(self, ptr, nbytes):
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= nbytes


def formula(schedule: str, v: int, m: int) -> float:
    b = 0.0 if schedule in ("zbh1", "zbv") else (PP - 1) / (v * m)
    return b / (1 + b)


def worker():
    from evo import models, optim, train
    from evo.models import llama
    from evo.sharding import Plan, pipeline, planner
    from evo.sharding.mesh import build_mesh
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    cfg = llama.Config(vocab_size=256, hidden_size=128, num_layers=6, num_heads=4,
                       intermediate_size=256)
    opt = optim.adamw(lr=1e-3)
    rows = []
    for schedule, v in SCHEDULES:
        for m in MICRO:
            plan = Plan(dp=1, pp=PP, pp_schedule=schedule, pp_virtual=v)
            mesh = build_mesh(plan)
            step = planner.shard(train.Step(cfg, opt, remat=1.0), plan, mesh)
            state = planner.init_state(cfg, opt, planner.shard_params(cfg, models.init(cfg), mesh),
                                       mesh)
            g = torch.Generator().manual_seed(0)
            idle, peak = [], 0
            for i in range(STEPS):
                tokens = torch.randint(0, cfg.vocab_size, (m, 1, T), generator=g)
                counter = SavedBytes(state.params)
                with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                    state, metrics = step(state, {"tokens": tokens, "labels": tokens})
                if i:
                    idle.append(float(metrics["pp_idle"]))
                peak = max(peak, counter.peak)
            report = pipeline.stage_report(cfg, mesh.plan, micro_num=m, tokens_per_micro=T,
                                           compute_dtype=torch.float32)
            plan_bytes = report[mesh.coords["pp"]]["activations"]
            ratio = torch.tensor([peak / plan_bytes if plan_bytes else float(peak == 0)])
            every = [torch.zeros(1) for _ in range(PP)]
            dist.all_gather(every, ratio)
            rows.append((schedule, v, m, sum(idle) / len(idle), formula(schedule, v, m),
                         [float(r) for r in every]))
    if dist.get_rank() == 0:
        print(f"{'schedule':<12}{'m':>4}{'idle':>8}{'formula':>9}   act peak / plan per rank")
        for schedule, v, m, idle, f, ratios in rows:
            print(f"{schedule:<12}{m:>4}{idle:>8.3f}{f:>9.3f}   "
                  + " ".join(f"{r:.2f}" for r in ratios))
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker()
    else:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
        sys.exit(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node", str(PP), os.path.abspath(__file__)],
                                env=env).returncode)
