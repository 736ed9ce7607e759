"""``evo sweep EXP --top K --steps N --nproc P --out DIR [--repeat R]``: run the best predicted
plans, measure.

The plans come from ``evo.sharding.search`` at world ``P`` on a profile of this machine (``--profile``
or a fresh ``evo calibrate``); every plan the planner runs is launched (``cost.modelled(cfg, plan)
== "planner"``: dp, tp, ZeRO, pipeline stages under each schedule, Ulysses, ring, weight parallel,
experts); plans combining axes it does not run together are predicted, skipped and counted in the
output. Each plan runs under torchrun (gloo, one thread per process, on the CPU) on random tokens
of the experiment's shape: first one untimed, profiled step, then ``N`` timed steps. Each rank
records:

- its peak memory: the most bytes of tensors alive at once in the CPU allocator during the
  profiled step (``live_peak``: the allocator's count of live bytes at every allocation and free
  the profiler records, from before the model and its state are built, with the frees of every
  thread counted — the counterpart of ``torch.cuda.max_memory_allocated``); beside it, reported
  only, the growth of the peak resident set (``getrusage`` max RSS) over a baseline taken before
  the model exists (glibc told to map every allocation above 64 KiB, ``MALLOC_MMAP_THRESHOLD_``,
  so freed tensors leave it), which also counts per-process buffers that are no tensor of the
  step;
- every timed step's wall time (after a barrier), with glibc's allocator set back to keep freed
  memory for reuse (``steady_allocator``): what a training run has after its first step. Mapping
  every allocation afresh costs a page fault per 4 KiB touched — about 10⁵ per step of the CPU
  sweep's plans, a fifth to a third of their step time on a VM.

The step time is the least over timed steps after the first of the slowest rank's time
(``step_seconds``; the median beside it) — what the calibration's timings are, the least of
their samples: the plan's cost when nothing else took a core; with
``--repeat R`` every plan is launched R times, in rounds over all the plans, and the least of
its launches counts (``least``). With ``--recalibrate`` (and no ``--profile``) the machine is
measured again before every launch (``DIR/profile.I.R.json``, the first launch's being the
ranking's ``DIR/profile.json``) and every plan is predicted as the median of its predictions
from all of them (``typical``): a plan's error is the median of its rounds' (``by_round``) —
on a shared machine one calibration is disturbed by a fifth and more, the median of a sweep's
calibrations is the machine's usual state.
``DIR/sweep.json`` holds predicted and measured side by side (and every rank's measured
communication bytes against ``planner.expected_comm_bytes`` of its pipeline stage);
``DIR/sweep.png`` charts them (needs matplotlib).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


def base_of(exp, world: int):
    """The experiment's step at ``world`` devices as a search base: its global rows (micro-batch ×
    micro-batches × its data-parallel degree at that world) of ``data.seq_len`` tokens."""
    from evo.sharding.search import Base
    plan = exp.plan
    dp = plan.dp if plan.dp != -1 else max(1, world // plan.model_parallel)
    return Base(rows=exp.data.micro_batch * exp.data.micro_num * dp, seq_len=exp.data.seq_len,
                compute_dtype=exp.compute_dtype)


def choose(ranked: list, top: int, spread: bool, kind=lambda p: p) -> list:
    """The first ``top`` predictions, or ``top`` spread over the ranking: over its kinds (``kind``
    of a prediction, e.g. its plan's fields, in the order of their best prediction) while there
    are at least ``top`` of them — each kind's prediction at the same relative position in that
    kind's own ranking, so the best kinds give their best and the worst their worst —, else
    evenly over the predictions."""
    if not spread or top >= len(ranked):
        return ranked[:top]
    if top == 1:
        return ranked[:1]
    kinds: dict = {}
    for p in ranked:
        kinds.setdefault(kind(p), []).append(p)
    groups = list(kinds.values())
    if len(groups) < top:
        groups = [[p] for p in ranked]
    out = []
    for i in range(top):
        group = groups[round(i * (len(groups) - 1) / (top - 1))]
        out.append(group[round(i * (len(group) - 1) / (top - 1))])
    return out


def plan_kind(pred) -> str:
    """A prediction's kind for ``choose``: its plan's fields (micro-batch and recomputation
    aside)."""
    from evo.sharding import search
    return search.plan_fields(pred.plan)


def runnable(cfg, result, nproc: int, top: int) -> tuple[list, int]:
    """The predictions the planner runs (``cost.modelled(cfg, plan) == "planner"``: dp, tp, ZeRO,
    pipeline stages under every schedule, Ulysses, ring, weight parallel and experts where the
    planner accepts them), and how many were skipped; ``--top`` beyond them is an error naming
    both counts."""
    from evo.sharding import cost
    ok = [p for p in result.ranked if cost.modelled(cfg, p.plan) == "planner"]
    skipped = len(result.ranked) - len(ok)
    if top > len(ok):
        raise ValueError(f"--top {top}: only {len(ok)} plans that evo runs fit {nproc} processes "
                         f"({len(result.ranked)} fit in all; {skipped} combine axes the planner "
                         "does not run together yet)")
    return ok, skipped


def sweep(exp, *, top: int, steps: int, nproc: int, out: str, profile: str | None = None,
          spread: bool = False, repeat: int = 1, recalibrate: bool = False) -> dict:
    from evo import calibrate
    from evo.sharding import cost, search
    if recalibrate and profile is not None:
        raise ValueError(f"--recalibrate measures this machine before every launch: it takes no "
                         f"--profile (got {profile})")

    def measured_profile(path: str):
        print(f"evo: calibrating this machine into {path} ({nproc} processes)", flush=True)
        calibrate.calibrate(path, nproc)
        return cost.load_profile(path)
    os.makedirs(out, exist_ok=True)
    prof = cost.load_profile(profile) if profile else \
        measured_profile(os.path.join(out, "profile.json"))
    result = search.search(exp.model, nproc, base_of(exp, nproc), prof, every_remat=True)
    ok, skipped = runnable(exp.model, result, nproc, top)
    chosen = choose(ok, top, spread, plan_kind)
    rounds, profiles = [], [prof]      # profiles: the one measured before each launch
    for r in range(repeat):
        rounds.append([])
        for i, pred in enumerate(chosen):
            name = i if repeat == 1 else f"{i}.{r}"
            if recalibrate and (r or i):     # the first launch has the ranking's profile
                profiles.append(measured_profile(os.path.join(out, f"profile.{name}.json")))
            print(f"evo: [{i + 1}/{top}{f', round {r + 1}/{repeat}' if repeat > 1 else ''}] "
                  f"{search.plan_fields(pred.plan)} mb={pred.workload.micro_batch}"
                  f" remat={pred.workload.remat}", flush=True)
            rounds[-1].append(run_plan(exp, pred, steps, nproc, out, name))
    rows = [compare(exp.model, pred, least([rd[i] for rd in rounds]))
            for i, pred in enumerate(chosen)]
    if recalibrate:
        each = [[cost.predict(exp.model, pred.plan, pred.workload, p).step_seconds
                 for p in profiles] for pred in chosen]
        rows = [by_round(row, [typical(each[i])] * repeat,
                         [rd[i]["step_seconds"] for rd in rounds],
                         [each[i][r * len(chosen) + i] for r in range(repeat)])
                for i, row in enumerate(rows)]
    report = {"experiment": exp.run_dir, "profile": prof.name, "nproc": nproc, "steps": steps,
              "repeat": repeat, "recalibrate": recalibrate,
              "fit": len(result.ranked), "runnable": len(ok),
              "skipped_not_implemented": skipped,
              "note": (f"{skipped} plans that fit combine axes the planner does not run "
                       "together yet: predicted, not run") if skipped else "",
              "plans": rows, "summary": summary(rows)}
    with open(os.path.join(out, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    chart(rows, os.path.join(out, "sweep.png"), prof.name)
    print(summary_text(report))
    return report


def least(runs: list[dict]) -> dict:
    """One plan measured in several launches (``--repeat``, rounds over all the plans, so that
    each plan's launches lie minutes apart): the least step time and the least peak of each
    rank — what the plan costs when nothing else disturbed it (the machine's load comes and
    goes; ``live_peak`` is an upper bound) —, the rest from the fastest launch, and every
    launch's step time under ``"round_seconds"``."""
    fastest = min(runs, key=lambda m: m["step_seconds"])
    return {**fastest, "peak_bytes": [min(p) for p in zip(*(m["peak_bytes"] for m in runs))],
            "round_seconds": [m["step_seconds"] for m in runs]}


def step_seconds(times_by_rank: list[list[float]]) -> dict:
    """A launch's step time from every rank's timed steps: per step the slowest rank's time
    (the step ends when its last rank does); of those after the first (the allocator and
    caches settling), the least as ``step_seconds`` — the statistic of the calibration's
    timings (``calibrate._timed``: the least of its samples), so that a prediction and its
    measurement both say what the plan costs when nothing else took a core — and the median
    as ``median_step_seconds``."""
    slowest = [max(step) for step in zip(*times_by_rank, strict=True)]
    timed = slowest[1:] or slowest
    return {"step_seconds": min(timed), "median_step_seconds": statistics.median(timed),
            "step_times": slowest}


def typical(seconds: list[float]) -> float:
    """A plan's step seconds on the machine as the sweep's calibrations found it: the median of
    its predictions from every profile measured during the sweep (``--recalibrate``: one before
    each launch). On a shared machine one calibration's own disturbance moves a prediction by a
    fifth and more (a small all-gather's latency 1.0 to 4.0 ms, the layer's efficiency 0.5 to
    1.0, in calibrations minutes apart) while the launches stay put; the median of them all is
    the machine's usual state, as a launch's least step is the plan's cost when nothing else
    took a core. No profile saw a launch."""
    return statistics.median(seconds)


def by_round(row: dict, predicted: list[float], measured: list[float],
             launch_predicted: list[float] | None = None) -> dict:
    """A compared plan (``compare``) launched once per round (``--recalibrate``): each round's
    predicted and measured seconds and error, the median of the errors as the plan's
    ``step_error``; beside them (``launch_predicted_seconds``), what the profile measured just
    before each launch alone predicted."""
    errors = [p / m - 1 for p, m in zip(predicted, measured, strict=True)]
    return {**row, "round_predicted_seconds": predicted, "round_step_errors": errors,
            "step_error": statistics.median(errors),
            **({"launch_predicted_seconds": launch_predicted} if launch_predicted else {})}


def run_plan(exp, pred, steps: int, nproc: int, out: str, index: int | str,
             tries: int = 2) -> dict:
    """One plan under torchrun; the rank-0 JSON of every rank's measurements. A launch that
    fails is said and launched once more (a sweep is half an hour of launches; one rank of one
    launch in a few hundred has died in gloo on this shared machine, not to be reproduced), and
    one that fails ``tries`` times raises with its workers' output."""
    from evo import models
    fam = models.family_of(exp.model)
    spec = {"family": fam.name, "model": fam.config_to_dict(exp.model),
            "plan": {k: v for k, v in dataclasses.asdict(pred.plan).items() if k != "rules"},
            "workload": dataclasses.asdict(pred.workload), "steps": steps}
    spec_path = os.path.join(out, f"plan{index}.spec.json")
    result_path = os.path.join(out, f"plan{index}.measured.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    for attempt in range(1, tries + 1):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", str(nproc), "-m", "evo.sweep", spec_path,
                            result_path], env={**os.environ, **WORKER_ENV},
                           capture_output=True, text=True)
        if not r.returncode:
            break
        if attempt == tries:
            raise RuntimeError(f"evo sweep: plan {spec['plan']} failed {tries} times; the "
                               f"last:\n{r.stderr[-3000:]}")
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"evo: plan {index} failed ({last[-200:]}); launching it once more", flush=True)
    with open(result_path, encoding="utf-8") as f:
        return json.load(f)


def compare(cfg, pred, measured: dict) -> dict:
    from evo.sharding import cost, search
    step = measured["step_seconds"]
    peak = max(measured["peak_bytes"])
    wl = pred.workload
    expected = {pp: cost.planner_comm_bytes(cfg, pred.plan, wl.micro_num, wl.tokens_per_micro,
                                            wl.compute_dtype, wl.remat, pp)
                for pp, _ in measured["comm_bytes_by_rank"]}
    return {"plan": search.plan_fields(pred.plan), "micro_batch": wl.micro_batch,
            "micro_num": wl.micro_num, "remat": wl.remat,
            "predicted": pred.as_dict(), "measured": measured,
            "step_error": pred.step_seconds / step - 1,
            "memory_error": pred.memory["total"] / peak - 1,
            "rss_error": pred.memory["total"] / max(max(measured["rss_growth_bytes"]), 1) - 1,
            "comm_bytes_equal": all(bytes_ == {k: int(v) for k, v in expected[pp].items()}
                                    for pp, bytes_ in measured["comm_bytes_by_rank"])}


def predicted_seconds(row: dict) -> float:
    """A compared plan's predicted step time: the median of its rounds' under ``by_round``."""
    return statistics.median(row.get("round_predicted_seconds",
                                     [row["predicted"]["step_seconds"]]))


def measured_seconds(row: dict) -> float:
    """A compared plan's measured step time: the median of its rounds' under ``by_round``, else
    the least of its launches."""
    if "round_step_errors" in row:
        return statistics.median(row["measured"]["round_seconds"])
    return row["measured"]["step_seconds"]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among measured times)."""
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    if n < 2:
        return 1.0
    d2 = sum((x - y) ** 2 for x, y in zip(ra, rb))
    return 1 - 6 * d2 / (n * (n * n - 1))


def summary(rows: list[dict]) -> dict:
    if not rows:
        return {}
    pred, meas = [predicted_seconds(r) for r in rows], [measured_seconds(r) for r in rows]
    return {"max_abs_step_error": max(abs(r["step_error"]) for r in rows),
            "max_abs_memory_error": max(abs(r["memory_error"]) for r in rows),
            "spearman_step_time": spearman(pred, meas),
            "comm_bytes_all_equal": all(r["comm_bytes_equal"] for r in rows)}


def summary_text(report: dict) -> str:
    lines = [f"{'plan':<44}{'mb':>3}{'remat':>6}{'pred s':>9}{'meas s':>9}{'err':>7}"
             f"{'pred MiB':>10}{'meas MiB':>10}{'err':>7}{'RSS MiB':>9}"]
    for r in report["plans"]:
        lines.append(f"{r['plan']:<44}{r['micro_batch']:>3}{r['remat']:>6.1f}"
                     f"{predicted_seconds(r):>9.3f}{measured_seconds(r):>9.3f}"
                     f"{r['step_error']:>+7.0%}{r['predicted']['peak_gib'] * 1024:>10.1f}"
                     f"{max(r['measured']['peak_bytes']) / 2**20:>10.1f}{r['memory_error']:>+7.0%}"
                     f"{max(r['measured']['rss_growth_bytes']) / 2**20:>9.1f}")
    s = report["summary"]
    if s:
        lines.append(f"max |time error| {s['max_abs_step_error']:.1%}, max |memory error| "
                     f"{s['max_abs_memory_error']:.1%}, Spearman {s['spearman_step_time']:.2f}, "
                     f"comm bytes equal: {s['comm_bytes_all_equal']}")
    if report.get("note"):
        lines.append(report["note"])
    return "\n".join(lines)


def chart(rows: list[dict], path: str, profile: str) -> bool:
    """Predicted against measured step time and peak memory per plan; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("evo: matplotlib is not installed (pip install 'evo-train[dev]'): no sweep.png")
        return False
    names = [f"{r['plan']}\nmb={r['micro_batch']} remat={r['remat']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.5 * len(rows) + 2.5))
    y = range(len(rows))
    series = ((axes[0], "step seconds", predicted_seconds, measured_seconds),
              (axes[1], "peak MiB per rank", lambda r: r["predicted"]["peak_gib"] * 1024,
               lambda r: max(r["measured"]["peak_bytes"]) / 2**20))
    for ax, label, p, m in series:
        ax.barh([i - 0.2 for i in y], [p(r) for r in rows], 0.4, label="predicted")
        ax.barh([i + 0.2 for i in y], [m(r) for r in rows], 0.4, label="measured")
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.legend()
    axes[0].set_yticks(list(y), names, fontsize=7)
    axes[1].set_yticks([])
    fig.suptitle(f"evo sweep: predicted vs measured ({profile})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ the worker

MEASURED = "evo.sweep.measured"   # the profiled step's region


@contextlib.contextmanager
def allocator_profile():
    """A profiler recording every allocation and free of the CPU allocator with the allocator's
    count of live bytes after each; while it runs, c10's CPU allocator counts the frees of every
    thread (``_frees_of_every_thread``), not only the threads the profiler follows — gloo's
    threads drop collectives' buffers, about a hundred blocks per step of a weight-parallel plan.
    What is allocated before it starts is not counted. Mark the region to measure with
    ``torch.profiler.record_function(MEASURED)``; ``live_peak`` reads it."""
    from torch.profiler import ProfilerActivity, profile
    with _frees_of_every_thread(), profile(activities=[ProfilerActivity.CPU],
                                           profile_memory=True) as prof:
        yield prof


@contextlib.contextmanager
def _frees_of_every_thread():
    """c10's flag ``caffe2_report_cpu_memory_usage`` on for the block: its CPU allocator then
    keeps its count of live bytes on every thread (otherwise only on threads with the profiler
    on, so that a block freed elsewhere stays counted). A RuntimeWarning, and the count of the
    profiled threads alone (an upper bound), where the flag is not found."""
    import ctypes
    import glob
    import warnings
    flag = None
    for path in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*c10.*")):
        try:
            flag = ctypes.c_bool.in_dll(ctypes.CDLL(path), "FLAGS_caffe2_report_cpu_memory_usage")
            break
        except (OSError, ValueError):
            continue
    if flag is None:
        warnings.warn("evo sweep: c10's caffe2_report_cpu_memory_usage flag was not found: the "
                      "peak counts blocks freed on threads the profiler does not follow (an "
                      "upper bound)", RuntimeWarning, stacklevel=3)
        yield
        return
    was, flag.value = flag.value, True
    try:
        yield
    finally:
        flag.value = was


def live_peak(prof, region: str = MEASURED) -> int:
    """The most bytes the CPU allocator held at once during ``region`` of ``prof``, counting the
    tensors allocated since the profile started (the CPU counterpart of
    ``torch.cuda.max_memory_allocated``): ``peak_of`` the allocator's count after each event."""
    results = prof.profiler.kineto_results
    marks = [e for e in results.events() if e.name() == region]
    if len(marks) != 1:
        raise ValueError(f"live_peak: {len(marks)} regions named {region!r} in the profile, "
                         "expected one")
    start = marks[0].start_ns()
    return peak_of(_allocations(results.experimental_event_tree()), start,
                   start + marks[0].duration_ns())


def _allocations(nodes) -> list[tuple[int, int, int]]:
    """(time ns, bytes: + allocated, − freed, the allocator's count of live bytes after it) of
    every CPU allocator event in the profiler's event tree."""
    out, stack = [], list(nodes)
    while stack:
        n = stack.pop()
        f = n.extra_fields
        if type(f).__name__ == "_ExtraFields_Allocation":
            if f.device.type == "cpu":
                out.append((n.start_time_ns, f.alloc_size, f.total_allocated))
        else:
            stack.extend(n.children)
    return out


def peak_of(events: list[tuple[int, int, int]], start: int, end: int) -> int:
    """The largest count of live bytes (``events``: time, ± bytes, the allocator's count after
    it) inside ``[start, end]`` or on entering it, over the count before the first event — the
    allocator counts for its whole process, and an earlier profile may have left blocks in its
    count. A block freed on a thread the profiler does not follow has no event, but every later
    event's count has it."""
    if not events:
        return 0
    events = sorted(events, key=lambda e: e[0])
    base = events[0][2] - events[0][1]
    before = [count for t, _, count in events if t < start][-1:]
    inside = [count for t, _, count in events if start <= t <= end]
    return max(before + inside, default=base) - base


def steady_allocator() -> bool:
    """Undo ``MALLOC_MMAP_THRESHOLD_`` for what follows: glibc's malloc serves allocations up to
    32 MiB (its dynamic threshold's ceiling) from its heap and keeps up to 64 MiB free there for
    reuse, as its dynamic threshold does once a training step has freed its large tensors. False
    where the C library is not glibc (nothing to undo: the variable is glibc's)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 64 << 20))


def _rss_bytes() -> int:
    """The process's peak resident set so far (``getrusage`` max RSS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load_code_paths() -> None:
    """Run recomputation once on a toy function before the baseline: its first call loads code
    (about 150 MB of resident modules on a CPU) that is no tensor of the step."""
    from torch.utils.checkpoint import checkpoint
    x = torch.ones(2, requires_grad=True)
    checkpoint(lambda t: (t * 2).sin(), x, use_reentrant=False).sum().backward()


def _build(spec: dict, plan, mesh):
    """The sharded step, its state and this data-parallel rank's batch of random tokens."""
    from evo import models, optim, train
    from evo.sharding import planner, shard
    cfg = models.get(spec["family"]).config_from_dict(spec["model"])
    wl = spec["workload"]
    g = torch.Generator().manual_seed(mesh.coords["dp"])
    tokens = torch.randint(0, cfg.vocab_size, (wl["micro_num"], wl["micro_batch"], wl["seq_len"]),
                           generator=g)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=-1)}
    opt = optim.adamw(lr=1e-4, weight_decay=0.1)
    step = shard(train.Step(cfg, opt, compute_dtype=getattr(torch, wl["compute_dtype"]),
                            remat=wl["remat"], donate=True), plan, mesh)
    state = planner.init_state(cfg, opt, planner.init_params(cfg, 0, mesh), mesh)
    return step, state, batch


def _measure(spec: dict, plan, mesh) -> dict:
    """One profiled step (untimed: the live-bytes peak, and on a GPU ``max_memory_allocated``),
    then ``spec["steps"]`` timed ones under the steady allocator; the growth of the peak resident
    set over a baseline taken before the model exists, to the end of the profiled step, is
    reported beside it."""
    import torch.distributed as dist
    from torch.profiler import record_function
    _load_code_paths()
    rss0 = _rss_bytes()
    with allocator_profile() as prof:
        step, state, batch = _build(spec, plan, mesh)
        with record_function(MEASURED):
            state, _ = step(state, batch)
    peak = live_peak(prof)
    del prof
    rss = _rss_bytes() - rss0
    steady_allocator()
    times = []
    for _ in range(spec["steps"]):
        dist.barrier()
        start = time.perf_counter()
        state, metrics = step(state, batch)
        times.append(time.perf_counter() - start)
    return {"times": times, "peak": peak, "rss": rss, "pp": mesh.coords["pp"],
            "comm_bytes": dict(metrics["comm_bytes"]), "comm_calls": dict(metrics["comm_calls"])}


def worker(spec_path: str, out_path: str) -> None:
    import datetime

    import torch.distributed as dist

    from evo.sharding import Plan
    from evo.sharding.mesh import build_mesh
    spec = json.load(open(spec_path, encoding="utf-8"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["plan"].items()})
    mesh = build_mesh(plan)
    mine = _measure(spec, plan, mesh)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump({**step_seconds([e["times"] for e in every]),
                       "peak_bytes": [e["peak"] for e in every],
                       "rss_growth_bytes": [e["rss"] for e in every],
                       "comm_bytes": every[0]["comm_bytes"],
                       "comm_bytes_by_rank": [[e["pp"], e["comm_bytes"]] for e in every],
                       "comm_calls_by_rank": [[e["pp"], e["comm_calls"]] for e in every]},
                      f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
