"""What a run reports: metrics.jsonl (its schema), TensorBoard event files read back with
tensorboard's own reader, per-source loss, alerts reaching a local webhook server, the profiler,
and the progress output on a terminal and on a pipe."""
import http.server
import io
import json
import math
import os
import threading

import pytest
import torch

from evo import Experiment, Plan, config, data, monitor, optim, run, train
from evo.models import llama

CFG = llama.Config(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=48, max_seq_len=128)

# Every record of metrics.jsonl: field -> type (docs/metrics.md describes each).
SCHEMA = {"step": int, "loss": float, "grad_norm": float, "lr": float, "tokens": int,
          "tokens_per_second": float, "tflops": float, "mfu": type(None), "step_time": float,
          "time": dict, "memory_peak": int, "skipped": int, "comm_bytes": dict,
          "source_loss": dict, "source_tokens": dict}
TIME_KEYS = {"data", "forward_backward", "comm", "optimizer"}


def write_sources(folder, names, seed):
    g = torch.Generator().manual_seed(seed)
    for name in names:
        os.makedirs(folder / name)
        docs = [torch.randint(1, CFG.vocab_size, (int(n),), generator=g).tolist()
                for n in torch.randint(5, 60, (40,), generator=g)]
        data.write_bin(str(folder / name / "part.bin"), docs)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_sources(root / "train", ["code", "prose"], 0)
    write_sources(root / "valid", ["held_code", "held_prose"], 1)
    return root


def experiment(folders, run_dir, **kw):
    return Experiment(model=CFG, data=data.Packed(folder=str(folders / "train"),
                                                  valid_folder=str(folders / "valid"),
                                                  seq_len=64, micro_batch=2, micro_num=2),
                      optimizer=optim.adamw(lr=1e-2), plan=Plan(), steps=6, eval_every=3,
                      eval_batches=2, run_dir=str(run_dir), log_every=2, **kw)


@pytest.fixture(scope="module")
def finished(folders, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    out = io.StringIO()
    summary = run.run(experiment(folders, run_dir), stream=out)
    return run_dir, summary, out.getvalue()


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_metrics_jsonl_schema(finished):
    run_dir, _, _ = finished
    rows = records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert set(r) == set(SCHEMA), set(r) ^ set(SCHEMA)
        for k, t in SCHEMA.items():
            assert isinstance(r[k], t) and not isinstance(r[k], bool), (k, r[k])
        assert set(r["time"]) == TIME_KEYS and all(v >= 0 for v in r["time"].values())
        assert r["step_time"] >= r["time"]["forward_backward"]
        assert r["tokens"] == r["step"] * 2 * 2 * 64 and r["memory_peak"] > 0
        # The sources partition the labelled tokens: their token-weighted losses give the loss.
        assert set(r["source_loss"]) == {"code", "prose"}
        n = sum(r["source_tokens"].values())
        mean = sum(r["source_loss"][s] * r["source_tokens"][s] for s in r["source_loss"]) / n
        assert abs(mean - r["loss"]) <= 1e-5 * r["loss"]   # fp32 sums in two orders
    evals = records(run_dir / "eval.jsonl")
    assert {(e["step"], e["set"]) for e in evals} == {
        (s, n) for s in (0, 3, 6) for n in ("held_code", "held_prose")}
    for e in evals:
        assert set(e) == {"step", "set", "loss", "perplexity", "accuracy", "tokens"}
        assert abs(e["perplexity"] - math.exp(e["loss"])) <= 1e-9 * e["perplexity"]


def test_first_loss_equals_the_step_called_directly(folders, finished):
    run_dir, _, _ = finished
    exp = experiment(folders, run_dir)
    loader = data.Loader(exp.data, vocab_size=CFG.vocab_size)
    step = train.Step(CFG, exp.optimizer.with_total_steps(exp.steps), sources=2)
    _, m = step(train.init_state(llama.init(CFG, exp.seed), exp.optimizer), next(loader))
    first = records(run_dir / "metrics.jsonl")[0]
    assert abs(first["loss"] - float(m["loss"])) <= 1e-6 * first["loss"]
    ref = (m["source_loss_sum"] / m["source_tokens"]).tolist()
    assert max(abs(a - b) for a, b in zip(first["source_loss"].values(), ref)) <= 1e-6


def test_tensorboard_events_read_back(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, _, _ = finished
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_second",
                "train/tflops", "train/step_time", "train/memory_peak", "train/skipped",
                "train/time/data", "train/time/forward_backward", "train/time/optimizer",
                "train/source_loss/code", "train/source_loss/prose",
                "eval/held_code/loss", "eval/held_code/perplexity", "eval/held_prose/accuracy"}
    assert expected <= tags, expected - tags
    rows = records(run_dir / "metrics.jsonl")
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows]
    for e, r in zip(loss, rows):  # event files hold fp32
        assert abs(e.value - r["loss"]) <= 1e-6 * r["loss"]
    assert [e.step for e in acc.Scalars("eval/held_code/loss")] == [0, 3, 6]


def test_plain_progress_lines_when_piped(finished):
    _, _, out = finished
    lines = [x for x in out.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["1/6", "2/6", "4/6", "6/6"]
    assert "\r" not in out and all("tok/s" in x and "eta" in x for x in lines)


def test_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    p = monitor.Progress(5, stream=term)
    for s in range(1, 6):
        p.update({"step": s, "loss": 3.0 / s, "tokens_per_second": 1e4, "tflops": 0.1})
    p.message("a message above the bar")
    p.close()
    out = term.getvalue()
    assert "\r" in out and "5/5" in out and "loss 0.6000" in out and "a message above the bar" in out


# ------------------------------------------------------------------------------------------ alerts

class Hook:
    """A local HTTP server collecting the JSON bodies POSTed to it."""

    def __init__(self):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def test_alert_rules(hook, tmp_path):
    """One alert per event: a NaN, a spike lasting three steps, a slow spell lasting two."""
    alerts = monitor.Alerts(str(tmp_path / "alerts.jsonl"), webhook=hook.url)
    loss = 4.0
    for step in range(1, 61):
        loss *= 0.99
        r = {"step": step, "loss": loss, "grad_norm": 1.0, "step_time": 0.1 + 0.001 * (step % 3)}
        if step == 20:
            r["loss"] = r["grad_norm"] = float("nan")
        if step in (30, 31, 32):
            r["loss"] = 2.0 * loss
        if step in (45, 46):
            r["step_time"] = 1.0
        alerts.check(r)
    alerts.close()
    kinds = [(a["kind"], a["step"]) for a in alerts.raised]
    assert kinds == [("nonfinite", 20), ("loss_spike", 30), ("slow_step", 45)]
    # POSTs travel on their own threads: they may arrive in any order
    assert sorted((a["kind"], a["step"]) for a in hook.received) == sorted(kinds)
    assert [(a["kind"], a["step"]) for a in records(tmp_path / "alerts.jsonl")] == kinds


def test_unreachable_webhook_does_not_stop_training(tmp_path):
    logged = []
    alerts = monitor.Alerts(None, webhook="http://127.0.0.1:9/nothing", log=logged.append)
    alerts.raise_("sigterm", 3, "test")
    alerts.close()
    assert any("could not POST" in x for x in logged)


def test_injected_nan_and_spike_in_a_run(folders, tmp_path, hook, monkeypatch):
    """A run whose step 8 reports a NaN loss and gradient and whose step 12 reports a tripled loss
    raises exactly those two alerts, written to alerts.jsonl and POSTed to the webhook."""
    real_shard = run.shard

    def faulty_shard(step, plan, mesh):
        inner = real_shard(step, plan, mesh)

        def call(state, batch):
            state, m = inner(state, batch)
            if int(state.step) == 8:
                m["loss"], m["grad_norm"] = torch.tensor(float("nan")), torch.tensor(float("inf"))
            if int(state.step) == 12:
                m["loss"] = m["loss"] * 3
            return state, m
        return call

    monkeypatch.setattr(run, "shard", faulty_shard)
    exp = config.apply_overrides(experiment(folders, tmp_path / "run"),
                                 ["steps=16", "eval_every=0", f"alert_webhook={hook.url}",
                                  "tensorboard=false"])
    out = io.StringIO()
    summary = run.run(exp, stream=out)
    kinds = [(a["kind"], a["step"]) for a in summary["alerts"]]
    assert kinds == [("nonfinite", 8), ("loss_spike", 12)], out.getvalue()
    # POSTs travel on their own threads: they may arrive in any order
    assert sorted((a["kind"], a["step"]) for a in hook.received) == sorted(kinds)
    assert [(a["kind"], a["step"]) for a in records(tmp_path / "run" / "alerts.jsonl")] == kinds
    assert out.getvalue().count("evo: alert [") == 2
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.parametrize("override, culprit", [
    ("profile=5:2", "profile"), ("profile=x", "profile"), ("profile=0:3", "profile"),
    ("alert_webhook=ftp://x", "alert_webhook"), ("peak_tflops=-1.0", "peak_tflops")])
def test_bad_monitoring_fields(folders, tmp_path, override, culprit):
    with pytest.raises(config.ConfigError, match=culprit):
        config.apply_overrides(experiment(folders, tmp_path), [override])


def test_profiler_writes_a_chrome_trace(folders, tmp_path):
    exp = config.apply_overrides(experiment(folders, tmp_path / "run"),
                                 ["steps=3", "eval_every=0", "profile=2:3", "tensorboard=false"])
    out = io.StringIO()
    run.run(exp, stream=out)
    prof = tmp_path / "run" / "profile"
    trace = json.loads((prof / "trace_rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("aten::mm" in n for n in names)         # the model's matmuls were recorded
    assert "Self CPU Mem" in (prof / "memory_rank0.txt").read_text()
    assert "profiled steps 2..3" in out.getvalue()
    ops = (prof / "ops_rank0.md").read_text().splitlines()
    assert ops[0] == "| kernel / operator | ms | share | calls |" and len(ops) == 22


def test_top_ops_ranks_self_time():
    """One 512³ matmul among a few small adds: the matmul tops the list, its time is the
    profiler's own figure for it, the rows run from most to least and the shares sum to at most
    one."""
    from torch.profiler import ProfilerActivity, profile
    a, b, c = torch.randn(512, 512), torch.randn(512, 512), torch.randn(8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            c = c + 1
        a @ b
    rows = monitor.top_ops(prof, cuda=False, n=5)
    mm = [e for e in prof.key_averages() if e.key == "aten::mm"][0]
    assert rows[0]["name"] == "aten::mm" and rows[0]["calls"] == 1
    assert rows[0]["ms"] == mm.self_cpu_time_total / 1e3 and rows[0]["share"] > 0.5
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    assert {"aten::add"} <= {r["name"] for r in rows} and sum(r["share"] for r in rows) <= 1 + 1e-9
    assert monitor.ops_table(rows).splitlines()[2].startswith("| `aten::mm` |")
