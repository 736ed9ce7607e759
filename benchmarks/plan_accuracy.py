"""Plan science benchmarks: how right the predictions are here, and what they say at scale.

    python benchmarks/plan_accuracy.py cpu --out sweeps/cpu [--top 14 --steps 6 --nproc 2
                                                             --repeat 2]
        evo sweep --recalibrate of plans spread over the kinds of the ranking of
        experiments/plan_cpu.py (at 2 processes: 14 kinds, ZeRO 0-3, tp ± sequence parallel, pp
        under four schedules, sp, cp, weight parallel), --repeat rounds, evo calibrate with
        --nproc processes before every launch: predicted (the median of a plan's predictions
        from all the calibrations) against measured step time (the median of the rounds' errors)
        and peak memory per rank, Spearman of the
        ranking, and the table of docs/plans.md; the chart is also copied to
        docs/img/plan_sweep_cpu.png with --docs.
    python benchmarks/plan_accuracy.py memory [--kinds pipeline,gathered,sequence] [--nproc 2]
        every plan evo runs of those kinds (pipeline stages; ZeRO-3 and weight parallelism;
        Ulysses and ring) that fits --nproc processes, at every micro-batch size and
        recomputation, launched once (one step, ``evo.sweep``'s worker): the memory model's
        peak per rank (no allocator overhead) against the busiest rank's measured live peak,
        a table and each kind's range of errors.
    python benchmarks/plan_accuracy.py search [--out DIR]
        evo plan --search for LLaMA 7B and 70B at worlds 8, 64 and 1024 on the bundled A800 and
        H100 profiles: time to answer, best plan, tokens/s per GPU, scaling efficiency against
        world 8 (the baseline, searched in the same run); and the 7B scaling curve from 8 to 1024
        GPUs (DIR/scaling_7b.png with matplotlib).
"""
import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evo import config, sweep  # noqa: E402
from evo.sharding import cost, planner, search  # noqa: E402

PROFILES = ("a800-80gb-roce", "h100-80gb-ib")
REMAT_TEXT = {0.0: "0", 0.5: "½", 1.0: "1"}


def cpu(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    exp = config.load(os.path.join(ROOT, "experiments", "plan_cpu.py"))
    report = sweep.sweep(exp, top=args.top, steps=args.steps, nproc=args.nproc, out=args.out,
                         spread=True, repeat=args.repeat, recalibrate=True)
    print(f"calibration and sweep took {time.perf_counter() - start:.0f} s\n")
    print(markdown(report))
    if args.docs:
        shutil.copyfile(os.path.join(args.out, "sweep.png"),
                        os.path.join(ROOT, "docs", "img", "plan_sweep_cpu.png"))


KINDS = {"pipeline": lambda p: p.pp > 1,
         "gathered": lambda p: planner.stored_shard_axis(p) is not None,
         "sequence": lambda p: p.sp * p.cp > 1 and not p.weight_parallel}


def memory(args) -> None:
    import dataclasses
    import tempfile
    exp = config.load(os.path.join(ROOT, "experiments", "plan_cpu.py"))
    a800 = cost.load_profile("a800-80gb-roce")
    exact = dataclasses.replace(a800, device={**a800.device, "memory_overhead": 0.0})
    result = search.search(exp.model, args.nproc, sweep.base_of(exp, args.nproc), exact,
                           every_remat=True)
    runnable, _ = sweep.runnable(exp.model, result, args.nproc, 1)
    pct = lambda x: f"{x:+.1%}".replace("-", "−").replace("%", " %")  # noqa: E731
    print("| kind | plan | mb | remat | predicted MiB | measured MiB | error |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    errors = {}
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            raise SystemExit(f"--kinds: {kind!r} is not one of {', '.join(KINDS)}")
        for i, pred in enumerate(p for p in runnable if KINDS[kind](p.plan)):
            with tempfile.TemporaryDirectory() as d:
                measured = max(sweep.run_plan(exp, pred, 1, args.nproc, d, i)["peak_bytes"])
            err = pred.memory["total"] / measured - 1
            errors.setdefault(kind, []).append(err)
            print(f"| {kind} | {search.plan_fields(pred.plan)} | {pred.workload.micro_batch} | "
                  f"{REMAT_TEXT.get(pred.workload.remat, pred.workload.remat)} | "
                  f"{pred.memory['total'] / 2**20:.1f} | {measured / 2**20:.1f} | {pct(err)} |",
                  flush=True)
    for kind, e in errors.items():
        print(f"{kind}: {len(e)} plans, {pct(min(e))} to {pct(max(e))}")


def markdown(report: dict) -> str:
    """The sweep as the table of docs/plans.md ("How right it is here")."""
    pct = lambda x: f"{x:+.0%}".replace("-", "−").replace("%", " %")  # noqa: E731
    rows = ["| plan | mb | remat | predicted s | measured s, each round | "
            "error, each round | error (median) | each launch's own profile: predicted s | "
            "predicted MiB | measured MiB | error | RSS growth MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["plans"]:
        m = r["measured"]
        each = ", ".join(f"{t:.2f}" for t in m.get("round_seconds", [m["step_seconds"]]))
        pred = sweep.predicted_seconds(r)
        own = ", ".join(f"{t:.2f}" for t in r.get("launch_predicted_seconds", [pred]))
        errors = ", ".join(pct(e) for e in r.get("round_step_errors", [r["step_error"]]))
        rows.append(f"| {r['plan']} | {r['micro_batch']} | "
                    f"{REMAT_TEXT.get(r['remat'], r['remat'])} | {pred:.2f} | {each} | "
                    f"{errors} | {pct(r['step_error'])} | {own} | "
                    f"{r['predicted']['peak_gib'] * 1024:.1f} | "
                    f"{max(m['peak_bytes']) / 2**20:.1f} | {pct(r['memory_error'])} | "
                    f"{max(m['rss_growth_bytes']) / 2**20:.1f} |")
    return "\n".join(rows)


def _search(exp, world: int, profile) -> tuple[float, object]:
    start = time.perf_counter()
    r = search.search(exp.model, world, sweep.base_of(exp, world), profile)
    return time.perf_counter() - start, r.ranked[0]


def scale(args) -> None:
    rows = ["| model | profile | world | search s | best plan | mb | remat | tokens/s/GPU | "
            "GiB | scaling vs the smallest world that fits |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    for name in ("llama_7b", "llama_70b"):
        exp = config.load(os.path.join(ROOT, "experiments", f"{name}.py"))
        for prof_name in PROFILES:
            prof = cost.load_profile(prof_name)
            base = None
            for world in (8, 64, 1024):
                try:
                    took, best = _search(exp, world, prof)
                except search.NoPlanFits as e:
                    rows.append(f"| {name} | {prof_name} | {world} | | {e} | | | | | |")
                    print(rows[-1], flush=True)
                    continue
                rate = best.tokens_per_second_per_device
                base = base or rate
                results[f"{name}/{prof_name}/{world}"] = {"seconds": took, **best.as_dict()}
                rows.append(f"| {name} | {prof_name} | {world} | {took:.1f} | "
                            f"{search.plan_fields(best.plan)} | {best.workload.micro_batch} | "
                            f"{best.workload.remat} | {rate:.0f} | {best.peak_gib:.1f} | "
                            f"{rate / base:.2f} |")
                print(rows[-1], flush=True)
    curve = scaling_curve()
    print("\n".join(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "plan_search.json"), "w", encoding="utf-8") as f:
            json.dump({"search": results, "scaling_7b": curve}, f, indent=1)
        plot_curve(curve, os.path.join(args.out, "scaling_7b.png"))


def scaling_curve() -> dict:
    """Best predicted tokens/s per GPU of the 7B experiment from 8 to 1024 GPUs, per profile."""
    exp = config.load(os.path.join(ROOT, "experiments", "llama_7b.py"))
    curve = {}
    for prof_name in PROFILES:
        prof = cost.load_profile(prof_name)
        curve[prof_name] = {}
        for world in (8, 16, 32, 64, 128, 256, 512, 1024):
            _, best = _search(exp, world, prof)
            curve[prof_name][world] = best.tokens_per_second_per_device
            print(f"7B {prof_name} world {world}: {best.tokens_per_second_per_device:.0f} "
                  f"tokens/s/GPU ({search.plan_fields(best.plan)})", flush=True)
    return curve


def plot_curve(curve: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curve.items():
        worlds = sorted(points)
        ax.plot(worlds, [points[w] for w in worlds], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("predicted tokens/s per GPU (best plan)")
    ax.set_title("LLaMA 7B, 4 sequences of 4096 tokens per data-parallel rank")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--out", required=True)
    c.add_argument("--top", type=int, default=14)
    c.add_argument("--steps", type=int, default=6)
    c.add_argument("--nproc", type=int, default=2, help="2 on a 2-core machine: a core per rank")
    c.add_argument("--repeat", type=int, default=2,
                   help="rounds: each plan launched once per round, each launch after its own "
                        "calibration; a plan's error is the median of its rounds'")
    c.add_argument("--docs", action="store_true", help="copy the chart to docs/img")
    m = sub.add_parser("memory")
    m.add_argument("--kinds", default="pipeline,gathered,sequence")
    m.add_argument("--nproc", type=int, default=2)
    s = sub.add_parser("search")
    s.add_argument("--out", default=None)
    args = p.parse_args()
    {"cpu": cpu, "memory": memory, "search": scale}[args.what](args)


if __name__ == "__main__":
    main()
