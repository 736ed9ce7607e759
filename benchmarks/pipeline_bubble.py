"""Pipeline schedules on 4 CPU processes (gloo): the idle fraction of each schedule next to its
formula, and each stage's peak of activations held for backward next to ``evo plan``'s
prediction.

    python benchmarks/pipeline_bubble.py            # launches itself under torchrun (4 processes)

For each schedule (1F1B, interleaved with 2 stages per rank, ZB-H1, ZB-V) and 4, 8 and 16
micro-batches, a pp=4 plan trains a small LLaMA (6 layers: 8 blocks) for 3 steps with every layer
recomputed in backward (``remat=1``: a stage keeps each layer's input per micro-batch in flight,
what ``evo plan`` counts), one compute thread per process. Reported, over the last two steps:

- ``wall``: the step's ``pp_idle`` metric (wall-clock time waiting in receives over the schedule's
  time, averaged over the pp ranks): with fewer cores than processes it measures the machine;
- ``replay``: ``pipeline.replay`` of the schedule's action lists with each action's measured cost
  (``pp_seconds``: the thread's CPU time of that action, receives excluded, mean of the two steps),
  messages taking no time — the measured costs are measured, the overlap of the ranks is the
  schedule's;
- ``equal``: the same replay with every stage's F, B, I, W the mean measured cost of that kind
  (balanced stages at the measured F : I : W): for 1F1B, interleaved and ZB-H1 this is the
  formula evaluated at the measured costs (tests/test_pipeline.py proves the identity: ZB-H1's
  bubble is (p−1)(F+I−min(F, W)));
- ``formula``: the idle fraction with F = I = W: (p−1)/(m+p−1) for 1F1B, (p−1)/(v·m+p−1)
  interleaved, (p−1)/(3m+p−1) ZB-H1 (its bubble (p−1)(F+I−W), arXiv 2401.10241), 0 ZB-V;
- the mean measured milliseconds of each kind of action, and each rank's compute per step.
- ``act peak / plan``: the largest bytes of non-parameter floating tensors saved for backward
  that are alive at once on a rank (saved-tensor hooks, released when autograd frees them),
  per rank relative to ``pipeline.stage_report``'s activations of that rank. The hooks pack a
  detached alias: a tensor packed itself stays alive for good once a ``retain_graph=True`` pass
  ran its node and no later pass did (the ``I`` of ZB-V's head-only stage: the norm's input
  gradient), so the count never fell (docs/plans.md, Pipeline).
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
        alias = t.detach()   # not t: see the module docstring
        weakref.finalize(alias, self.release, ptr, t.untyped_storage().nbytes())
        return alias

    def release(self, ptr, nbytes):
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= nbytes


def formula(schedule: str, v: int, m: int) -> float:
    if schedule == "zbv":
        return 0.0
    return (PP - 1) / ((3 if schedule == "zbh1" else v) * m + PP - 1)


def replays(lists, seconds: dict[int, list[float]], stages: int) -> tuple[float, float]:
    """The replayed idle fraction with the measured costs, and with every stage's cost of a
    kind the mean measured cost of that kind."""
    from evo.sharding import pipeline
    mean = mean_costs(lists, seconds)
    equal = {r: [mean[a.kind] for a in actions] for r, actions in lists.items()}
    return (pipeline.replay(lists, seconds, stages).idle,
            pipeline.replay(lists, equal, stages).idle)


def measure(cfg, opt, schedule: str, v: int, m: int):
    """This rank's wall-clock idle, per-action seconds (mean over steps 2-3) and saved peak."""
    from evo import models, train
    from evo.sharding import Plan, planner
    from evo.sharding.mesh import build_mesh
    mesh = build_mesh(Plan(dp=1, pp=PP, pp_schedule=schedule, pp_virtual=v))
    step = planner.shard(train.Step(cfg, opt, remat=1.0), mesh.plan, mesh)
    state = planner.init_state(cfg, opt, planner.shard_params(cfg, models.init(cfg), mesh), mesh)
    g = torch.Generator().manual_seed(0)
    idle, seconds, peak = [], [], 0
    for i in range(STEPS):
        tokens = torch.randint(0, cfg.vocab_size, (m, 1, T), generator=g)
        counter = SavedBytes(state.params)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            state, metrics = step(state, {"tokens": tokens, "labels": tokens})
        if i:
            idle.append(float(metrics["pp_idle"]))
            seconds.append(metrics["pp_seconds"])
        peak = max(peak, counter.peak)
    return mesh, sum(idle) / len(idle), (sum(seconds) / len(seconds)).tolist(), peak


def worker():
    from evo import optim
    from evo.models import llama
    from evo.sharding import pipeline
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    cfg = llama.Config(vocab_size=256, hidden_size=128, num_layers=6, num_heads=4,
                       intermediate_size=256)
    opt = optim.adamw(lr=1e-3)
    rows = []
    for schedule, v in SCHEDULES:
        for m in MICRO:
            mesh, idle, seconds, peak = measure(cfg, opt, schedule, v, m)
            report = pipeline.stage_report(cfg, mesh.plan, micro_num=m, tokens_per_micro=T,
                                           compute_dtype=torch.float32)
            plan_bytes = report[mesh.coords["pp"]]["activations"]
            every = [None] * PP
            dist.all_gather_object(every, (seconds, peak / plan_bytes if plan_bytes else
                                           float(peak == 0)))
            lists, seconds = pipeline.action_lists(mesh.plan, m), {r: e[0] for r, e in
                                                                   enumerate(every)}
            rows.append((schedule, m, idle, *replays(lists, seconds, mesh.plan.stages),
                         formula(schedule, v, m), [e[1] for e in every],
                         mean_costs(lists, seconds), [sum(t) for t in seconds.values()]))
    if dist.get_rank() == 0:
        print(f"{'schedule':<12}{'m':>4}{'wall':>7}{'replay':>8}{'equal':>7}{'formula':>9}"
              "   act peak / plan per rank   mean ms per F/B/I/W      compute ms per rank")
        for schedule, m, wall, rep, eq, f, ratios, costs, busy in rows:
            print(f"{schedule:<12}{m:>4}{wall:>7.3f}{rep:>8.3f}{eq:>7.3f}{f:>9.3f}   "
                  + " ".join(f"{r:.2f}" for r in ratios) + "    "
                  + " ".join(f"{k} {1e3 * t:4.1f}" for k, t in sorted(costs.items())).ljust(24)
                  + " ".join(f"{1e3 * t:5.0f}" for t in busy))
    dist.destroy_process_group()


def mean_costs(lists, seconds: dict[int, list[float]]) -> dict[str, float]:
    """The mean measured seconds of each kind of action over all ranks."""
    kinds: dict[str, list[float]] = {}
    for r, actions in lists.items():
        for a, t in zip(actions, seconds[r]):
            kinds.setdefault(a.kind, []).append(t)
    return {k: sum(v) / len(v) for k, v in kinds.items()}


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
