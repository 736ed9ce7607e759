"""evo sweep's pieces that need no process group: the plans it runs (every plan the planner
accepts), the spread over plan kinds, and the peak of live tensor bytes it measures (against
allocations of known sizes)."""
import json
import os
import queue
import threading

import pytest
import torch
from torch.profiler import record_function

from evo import config, sweep
from evo.sharding import Plan, cost, search

ROOT = os.path.dirname(os.path.dirname(__file__))
H100 = cost.load_profile("h100-80gb-ib")
MIB = 2**20


def _result(world):
    exp = config.load(os.path.join(ROOT, "experiments", "plan_cpu.py"))
    return exp, search.search(exp.model, world, sweep.base_of(exp, world), H100, every_remat=True)


def test_sweep_runs_every_plan_kind_the_planner_accepts():
    """At two processes every plan of experiments/plan_cpu.py that fits is one the planner runs —
    ZeRO 0-3, tp ± sequence parallel, pp under all four schedules, sp, cp, weight parallel — and
    a spread of 14 covers all 14 kinds. At four, a plan combining axes the planner does not run
    together (pp with cp) is skipped and counted."""
    exp, r = _result(2)
    ok, skipped = sweep.runnable(exp.model, r, 2, 10)
    assert skipped == 0 and len(ok) == len(r.ranked)
    kinds = {sweep.plan_kind(p) for p in ok}
    assert {f"dp=2,zero={z}" for z in (1, 2, 3)} | {"dp=2", "dp=1,tp=2",
                                                    "dp=1,tp=2,sequence_parallel"} <= kinds
    for schedule in ("", ",pp_schedule=interleaved,pp_virtual=2", ",pp_schedule=zbh1",
                     ",pp_schedule=zbv,pp_virtual=2"):
        assert f"dp=1,pp=2{schedule}" in kinds
    assert {"dp=1,sp=2", "dp=1,cp=2", "dp=1,sp=2,weight_parallel"} <= kinds
    chosen = sweep.choose(ok, len(kinds), True, sweep.plan_kind)
    assert {sweep.plan_kind(p) for p in chosen} == kinds
    assert chosen[0] is ok[0]
    # four processes: pp with cp is predicted (formulas) but not run
    wl = cost.Workload(4, 1, 128, "float32")
    both = [cost.predict(exp.model, Plan(pp=2, cp=2).resolve(4), wl, H100),
            cost.predict(exp.model, Plan(pp=2, dp=2).resolve(4), wl, H100)]
    four = search.SearchResult(both, 2, 0, 0.0)
    assert sweep.runnable(exp.model, four, 4, 1) == ([both[1]], 1)
    with pytest.raises(ValueError, match="--top 2: only 1 plans that evo runs fit 4 processes "
                                         r"\(2 fit in all; 1 combine axes"):
        sweep.runnable(exp.model, four, 4, 2)


def test_interleaved_plans_get_a_balanced_split_when_blocks_do_not_divide():
    exp, _ = _result(2)
    assert search.stage_split(exp.model, 4) == (1, 2, 2, 1)   # embed | 2 layers | 2 | head
    assert search.stage_split(exp.model, 3) is None


def test_live_peak_is_the_most_tensor_bytes_alive_at_once():
    """4 MiB alive before the measured region, then 2 MiB, the 4 freed, 8 allocated: 10 MiB at
    once. A 16 MiB tensor freed before the region and one allocated before the profile do not
    count."""
    before = torch.empty(8 * MIB // 4)
    with sweep.allocator_profile() as prof:
        scratch = torch.empty(16 * MIB // 4)
        del scratch
        a = torch.empty(4 * MIB // 4)
        with record_function(sweep.MEASURED):
            b = torch.empty(2 * MIB // 4)
            del a
            c = torch.empty(8 * MIB // 4)
            del b, c
            del before
    assert sweep.live_peak(prof) == 10 * MIB


def test_live_peak_counts_what_is_alive_on_entering():
    with sweep.allocator_profile() as prof:
        a = torch.empty(6 * MIB // 4)
        with record_function(sweep.MEASURED):
            del a
            b = torch.empty(MIB // 4)
            del b
    assert sweep.live_peak(prof) == 6 * MIB
    with pytest.raises(ValueError, match="0 regions named 'elsewhere'"):
        sweep.live_peak(prof, "elsewhere")


def test_a_block_freed_on_another_thread_is_no_longer_counted():
    """A 4 MiB tensor handed to a thread the profiler does not follow, freed there, then 2 MiB
    allocated: 4 MiB at most, not 6 — c10's allocator counts every thread's frees while the
    profile runs."""
    drop: queue.Queue = queue.Queue()
    thread = threading.Thread(target=lambda: drop.get())
    with sweep.allocator_profile() as prof:
        thread.start()
        with record_function(sweep.MEASURED):
            a = torch.empty(4 * MIB // 4)
            drop.put(a)
            del a
            thread.join()
            b = torch.empty(2 * MIB // 4)
            del b
    assert sweep.live_peak(prof) == 4 * MIB


def test_peak_of_counts_from_the_allocators_count_before_the_profile():
    """Events (time, ± bytes, the allocator's count after it): an earlier profile left 100 MiB
    in the count; 4 MiB, a free of it on an unseen thread (no event: the next count has it), 2
    MiB, 3 MiB: 5 MiB at most, not 9, nor 105; alive on entering."""
    events = [(1, 4 * MIB, 104 * MIB), (3, 2 * MIB, 102 * MIB), (4, 3 * MIB, 105 * MIB),
              (6, -2 * MIB, 103 * MIB), (7, -3 * MIB, 100 * MIB)]
    assert sweep.peak_of(events, 2, 10) == 5 * MIB
    assert sweep.peak_of(events, 5, 10) == 5 * MIB          # alive on entering
    assert sweep.peak_of(events, 7, 10) == 3 * MIB
    assert sweep.peak_of([], 0, 9) == 0


def test_a_launchs_step_time_is_the_least_of_its_slowest_ranks_steps():
    """Per step the slowest rank (rank 1 at steps 2 and 4, rank 0 at 3); the first step left
    out; the least of the rest (as the calibration's timings are the least of their samples),
    the median beside it."""
    times = [[9.0, 1.0, 1.5, 1.2, 1.1],
             [8.0, 1.3, 1.4, 1.6, 1.0]]
    got = sweep.step_seconds(times)
    assert got == {"step_seconds": 1.1, "median_step_seconds": (1.3 + 1.5) / 2,
                   "step_times": [9.0, 1.3, 1.5, 1.6, 1.1]}
    assert sweep.step_seconds([[2.0]]) == {"step_seconds": 2.0, "median_step_seconds": 2.0,
                                           "step_times": [2.0]}


def test_a_failed_launch_is_launched_once_more_then_raises(tmp_path, monkeypatch, capsys):
    """A launch whose workers die is said and run again (the second's measurements count); one
    that fails twice raises with the workers' output."""
    import subprocess
    import types
    exp = config.load(os.path.join(ROOT, "experiments", "plan_cpu.py"))
    pred = types.SimpleNamespace(plan=Plan(dp=2).resolve(2),
                                 workload=cost.Workload(1, 1, 8, "float32", 0.0))
    outcomes = iter([1, 0, 1, 1])

    def fake_run(cmd, **kw):
        rc = next(outcomes)
        if not rc:
            with open(cmd[-1], "w") as f:
                json.dump({"step_seconds": 1.0}, f)
        return subprocess.CompletedProcess(cmd, rc, "", "gloo: Connection reset by peer\n")
    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    assert sweep.run_plan(exp, pred, 2, 2, str(tmp_path), 0) == {"step_seconds": 1.0}
    assert "plan 0 failed (gloo: Connection reset by peer); launching it once more" in \
        capsys.readouterr().out
    with pytest.raises(RuntimeError, match=r"failed 2 times; the last:\ngloo: Connection reset"):
        sweep.run_plan(exp, pred, 2, 2, str(tmp_path), 1)


def test_repeated_launches_count_their_least():
    """--repeat: the fastest launch's step time and fields, each rank's least peak (an upper
    bound), every launch's time kept."""
    runs = [{"step_seconds": 2.0, "peak_bytes": [5, 9], "comm_bytes": {"a": 1}},
            {"step_seconds": 1.5, "peak_bytes": [7, 8], "comm_bytes": {"a": 2}},
            {"step_seconds": 3.0, "peak_bytes": [6, 6], "comm_bytes": {"a": 3}}]
    got = sweep.least(runs)
    assert got == {"step_seconds": 1.5, "peak_bytes": [5, 6], "comm_bytes": {"a": 2},
                   "round_seconds": [2.0, 1.5, 3.0]}


def test_recalibrated_rounds_each_compare_with_their_own_profile():
    """--recalibrate: round r's launch against the prediction of the profile measured just
    before round r; the plan's error is the median of its rounds' (0.9 s predicted for 1.0 s,
    then 1.2 s for 1.0 s, then 1.0 s for 0.8 s: −10 %, +20 %, +25 % → +20 %)."""
    row = {"plan": "dp=2", "step_error": 0.5}
    got = sweep.by_round(row, [0.9, 1.2, 1.0], [1.0, 1.0, 0.8])
    assert got["round_step_errors"] == pytest.approx([-0.1, 0.2, 0.25])
    assert got["step_error"] == pytest.approx(0.2)
    assert got["round_predicted_seconds"] == [0.9, 1.2, 1.0] and got["plan"] == "dp=2"


def test_recalibrated_plans_are_predicted_from_the_median_of_every_calibration(tmp_path,
                                                                              monkeypatch):
    """--recalibrate --repeat 2 over two plans: the machine measured before every launch but the
    first (whose profile ranked the plans): four calibrations, the k-th at 1/(k+1) of H100's
    matmul rate. Every plan is predicted as the median of its four predictions — halfway
    between the second and the third profile's —, and what each launch's own profile said is
    kept beside it; the fake launch takes that median: every error is 0."""
    from evo import calibrate
    exp = config.load(os.path.join(ROOT, "experiments", "plan_cpu.py"))
    made, launched, preds = [], [], {}

    def profile_k(k):
        d = json.load(open(os.path.join(ROOT, "evo", "profiles", "h100-80gb-ib.json")))
        d["device"]["matmul_tflops"] = {n: v / (k + 1)
                                        for n, v in d["device"]["matmul_tflops"].items()}
        return cost.profile_from_dict(d)

    def fake_calibrate(path, nproc):
        d = json.load(open(os.path.join(ROOT, "evo", "profiles", "h100-80gb-ib.json")))
        d["device"]["matmul_tflops"] = {n: v / (len(made) + 1)
                                        for n, v in d["device"]["matmul_tflops"].items()}
        json.dump(d, open(path, "w"))
        made.append(os.path.basename(path))

    def seconds(pred, k):
        return cost.predict(exp.model, pred.plan, pred.workload, profile_k(k)).step_seconds

    def fake_launch(exp_, pred, steps, nproc, out, index):
        launched.append((index, made[-1]))
        preds[index] = pred
        return {"step_seconds": (seconds(pred, 1) + seconds(pred, 2)) / 2,
                "peak_bytes": [1, 1], "rss_growth_bytes": [1, 1], "comm_bytes_by_rank": []}
    monkeypatch.setattr(calibrate, "calibrate", fake_calibrate)
    monkeypatch.setattr(sweep, "run_plan", fake_launch)
    monkeypatch.setattr(sweep, "chart", lambda *a: False)
    report = sweep.sweep(exp, top=2, steps=1, nproc=2, out=str(tmp_path), repeat=2,
                         recalibrate=True)
    assert made == ["profile.json", "profile.1.0.json", "profile.0.1.json", "profile.1.1.json"]
    assert launched == [("0.0", "profile.json"), ("1.0", "profile.1.0.json"),
                        ("0.1", "profile.0.1.json"), ("1.1", "profile.1.1.json")]
    for i, row in enumerate(report["plans"]):
        assert row["round_step_errors"] == pytest.approx([0.0, 0.0], abs=1e-12)
        pred = preds[f"{i}.0"]
        assert row["launch_predicted_seconds"] == pytest.approx(
            [seconds(pred, i), seconds(pred, 2 + i)])


def test_a_layer_faster_than_the_matmul_timing_raises_the_peak(monkeypatch):
    """A disturbed matmul timing below the layer's fitted rate: the profile's peak becomes that
    rate (efficiency 1) instead of clipping the efficiency — the predicted layer time stays the
    measured one. The layer's matmuls at 40 GFLOP/s, its attention 0.5 ms per call and its
    causal flops at 10 GFLOP/s, its norms and residual adds 20 ns per value: the fit is of the
    matmuls alone (efficiency 1, no overhead), the attention's a quarter of the peak and 500 µs,
    the norms 20 ns."""
    from evo import calibrate
    cfg = calibrate._reference_config()
    h, f = cfg.hidden_size, cfg.intermediate_size
    attention = lambda s: 0.5e-3 + 12 * s * h * s / 2 / 10e9  # noqa: E731
    norms = lambda s: s * h * 20e-9                  # noqa: E731
    monkeypatch.setattr(calibrate, "_layer_seconds", lambda c, s, d: (
        6 * s * (4 * h * h + 3 * h * f)) / 40e9 + attention(s) + norms(s))
    monkeypatch.setattr(calibrate, "_attention_seconds", lambda s, d: attention(s))
    monkeypatch.setattr(calibrate, "_norm_seconds", lambda s, hidden, d: norms(s))
    monkeypatch.setattr(calibrate, "_timed", lambda fn, *a: 1.0)   # evo's attention: slow
    fit = calibrate.compute_fit(0.02, torch.float32)               # matmuls "at" 20 GFLOP/s
    assert fit["peak_tflops"] == pytest.approx(0.04)
    assert fit["compute_efficiency"] == pytest.approx(1.0)
    assert fit["block_overhead_us"] == pytest.approx(0.0, abs=1e-6)
    assert fit["attention_efficiency"] == pytest.approx(0.25)
    assert fit["attention_overhead_us"] == pytest.approx(500.0)
    assert fit["logit_ns_per_value"] == pytest.approx(1e9 / (1024 * 4096))  # 1 s: _timed's
    assert fit["norm_ns_per_value"] == pytest.approx(20.0)


def test_a_timing_is_the_least_of_its_samples(monkeypatch):
    """Five samples of a call taking 1 ms, the first three disturbed to 5 ms (a clock the call
    advances): 1 ms, not the median's 5."""
    from evo import calibrate
    clock = [0.0]
    monkeypatch.setattr(calibrate.time, "perf_counter", lambda: clock[0])
    costs = iter([1e-3] + [5e-3] * 3 + [1e-3] * 4 * 2)   # the warm-up, then the samples

    def call():
        clock[0] += next(costs)
    assert calibrate._timed(call, min_seconds=3.5e-3) == pytest.approx(1e-3)


def test_collectives_are_timed_apart_and_averaged_without_their_extremes():
    """``calibrate._spaced``: the mean of the calls without the slowest and fastest tenth — a
    50 ms stall among 2 ms calls is left out (a median would hide a step's slow collectives, a
    plain mean the stall would triple)."""
    import time as _time

    from evo import calibrate
    waits = iter([0.002] + [0.002] * 9 + [0.05])      # the first call warms up, uncounted

    def fn():
        _time.sleep(next(waits))
    assert calibrate._spaced(fn, 10, gap=0.0) == pytest.approx(0.002, rel=0.5, abs=1e-3)


def test_collectives_are_charged_the_mean_of_their_fits_after_1_and_10_ms(monkeypatch):
    """``calibrate.collectives`` times every kind and size after 1 ms and after 10 ms of compute
    and keeps both fits; the fit the cost model reads is their mean line: the mean latency and
    the mean seconds per byte (here 1.0 ms + bytes / 1 GB/s after 1 ms, 2.0 ms + bytes /
    0.5 GB/s after 10 ms: 1.5 ms and 1.5 ns per byte, 0.667 GB/s)."""
    from evo import calibrate
    lines = {1e-3: (1e-3, 1e9), 10e-3: (2e-3, 0.5e9)}
    monkeypatch.setattr(calibrate.dist, "new_group", lambda ranks: tuple(ranks))
    monkeypatch.setattr(calibrate.dist, "barrier", lambda: None)
    monkeypatch.setattr(calibrate, "_collective", lambda kind, nbytes, group, size: nbytes)
    monkeypatch.setattr(calibrate, "_spaced", lambda nbytes, calls, gap=10e-3:
                        lines[gap][0] + nbytes / lines[gap][1])
    out = calibrate.collectives(2, 0)
    assert set(out) == set(calibrate.KINDS)
    for kind in calibrate.KINDS:
        fit = out[kind]["2"]
        assert fit["latency_us"] == pytest.approx(1500.0)
        assert fit["bandwidth_gbs"] == pytest.approx(2 / 3)
        assert fit["after_1ms"]["latency_us"] == pytest.approx(1000.0)
        assert fit["after_10ms"]["bandwidth_gbs"] == pytest.approx(0.5)


def test_calibrate_fits_latency_and_bandwidth_in_relative_error():
    """t = 50 µs + bytes / 1 GB/s at 4 KiB ... 4 MiB is recovered exactly; with the largest
    size 20 % slow (a noisy sample) the latency stays within 10 % — plain least squares, which
    the largest seconds dominate, would put it below zero."""
    from evo import calibrate
    sizes = (1 << 12, 1 << 17, 1 << 20, 1 << 22)
    exact = [(b, 50e-6 + b / 1e9) for b in sizes]
    assert calibrate._fit(exact)["latency_us"] == pytest.approx(50.0)
    assert calibrate._fit(exact)["bandwidth_gbs"] == pytest.approx(1.0)
    noisy = exact[:-1] + [(sizes[-1], 1.2 * exact[-1][1])]
    assert calibrate._fit(noisy)["latency_us"] == pytest.approx(50.0, rel=0.1)
