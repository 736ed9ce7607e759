"""Plan search (evo.sharding.search) and its command line: every ranked plan is valid and fits,
the ranking is by predicted tokens/s per device, and bad input gets one error naming it."""
import dataclasses
import json
import os

import pytest

from evo import cli, config, sweep
from evo.sharding import Plan, cost, pipeline, planner, search
from evo.sharding.layout import model_layouts

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
A800 = cost.load_profile("a800-80gb-roce")


def _exp(name):
    return config.load(os.path.join(ROOT, "experiments", name))


def test_70b_at_world_1024_answers():
    """The LLaMA-2 70B shape at 1024 A800s: a ranked answer (its timing is a benchmark:
    benchmarks/plan_accuracy.py --search)."""
    exp = _exp("llama_70b.py")
    r = search.search(exp.model, 1024, sweep.base_of(exp, 1024), A800)
    best = r.ranked[0]
    assert best.plan.world_size == 1024 and best.peak_gib <= 80
    assert 100 < best.tokens_per_second_per_device < 1000   # 6·70e9 FLOPs per token on 312 TFLOP/s
    rates = [p.tokens_per_second_per_device for p in r.ranked]
    assert rates == sorted(rates, reverse=True)


def test_every_ranked_plan_is_valid_and_fits():
    exp = _exp("plan_cpu.py")
    base = sweep.base_of(exp, 4)
    r = search.search(exp.model, 4, base, A800, every_remat=True)
    kinds = set()
    for p in r.ranked:
        assert p.plan == p.plan.resolve(4)
        model_layouts(cost.base_plan(p.plan), exp.model)
        assert p.memory["total"] <= 80 * 2**30
        assert p.workload.micro_num * p.workload.micro_batch * p.plan.dp == base.rows
        kinds.add((p.plan.tp > 1, p.plan.zero, p.plan.pp > 1, p.plan.sp > 1, p.plan.cp > 1))
    assert len(kinds) >= 10


def test_a_world_no_plan_divides_says_divisibility():
    exp = _exp("plan_cpu.py")
    with pytest.raises(search.NoPlanFits, match="no plan divides it"):
        search.search(exp.model, 3, search.Base(rows=4, seq_len=128), A800)


def test_a_world_too_small_for_the_model_says_memory():
    exp = _exp("llama_70b.py")
    with pytest.raises(search.NoPlanFits, match=r"no plan fits memory: .* leanest needs"):
        search.search(exp.model, 2, sweep.base_of(exp, 2), A800)


def test_cli_plan_search_writes_every_plan(tmp_path, capsys):
    out = tmp_path / "plans.json"
    rc = cli.main(["plan", os.path.join(ROOT, "experiments", "plan_cpu.py"), "--world", "4",
                   "--search", "--profile", "h100-80gb-ib", "--json", str(out), "--top", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert f"{len(d['plans'])} plans fit 4 devices" in printed
    first = d["plans"][0]
    assert set(first) >= {"plan", "step_seconds", "tokens_per_second_per_device", "peak_gib",
                          "time", "memory_gib"}
    assert set(first["time"]) >= {"compute", "exposed_comm", "bubble"}
    assert first["plan"]["dp"] * first["plan"]["tp"] * first["plan"]["pp"] * \
        first["plan"]["sp"] * first["plan"]["cp"] == 4
    # the planner's models for every plan it accepts; the formulas, labelled, for the others
    exp = _exp("plan_cpu.py")
    for p in d["plans"]:
        plan = dataclasses.replace(Plan(), **{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in p["plan"].items()})
        try:
            planner.check_plan(plan, exp.model)
            pipeline.check(exp.model, plan)
            assert p["modelled"] == "planner", p["plan"]
        except ValueError:
            assert p["modelled"] == "formula", p["plan"]
    assert {p["modelled"] for p in d["plans"]} == {"planner", "formula"}
    assert any(line.rstrip().endswith("  model") for line in printed.splitlines())


def test_cli_bad_profile_is_one_error(tmp_path, capsys):
    bad = tmp_path / "p.json"
    d = json.load(open(os.path.join(cost.PROFILE_DIR, "h100-80gb-ib.json")))
    del d["device"]["memory_gib"]
    bad.write_text(json.dumps(d))
    rc = cli.main(["plan", os.path.join(ROOT, "experiments", "plan_cpu.py"), "--world", "4",
                   "--search", "--profile", str(bad)])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"evo: error: {bad}: missing field device.memory_gib"


def test_sweep_top_beyond_the_plans_that_fit_is_an_error(tmp_path, capsys):
    rc = cli.main(["sweep", os.path.join(ROOT, "experiments", "plan_cpu.py"), "--top", "100000",
                   "--steps", "2", "--nproc", "4", "--out", str(tmp_path),
                   "--profile", "h100-80gb-ib"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--top 100000: only" in err and "plans that evo runs fit 4 processes" in err
    assert not (tmp_path / "sweep.json").exists()


def test_sweep_recalibrating_with_a_given_profile_is_an_error(tmp_path, capsys):
    rc = cli.main(["sweep", os.path.join(ROOT, "experiments", "plan_cpu.py"), "--top", "2",
                   "--steps", "2", "--nproc", "2", "--out", str(tmp_path / "out"),
                   "--profile", "h100-80gb-ib", "--recalibrate", "--repeat", "2"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        "evo: error: --recalibrate measures this machine before every launch: it takes no "
        "--profile (got h100-80gb-ib)")
    assert not (tmp_path / "out").exists()


def test_spearman_and_spread():
    assert sweep.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert sweep.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == -1.0
    assert sweep.choose(list(range(10)), 4, True) == [0, 3, 6, 9]
    assert sweep.choose(list(range(10)), 4, False) == [0, 1, 2, 3]
