"""Experiment files, --set overrides and the `evo train` command, end to end on CPU.

The metrics a run writes are checked against an independent computation: the train step called
directly on the same batch (fp32, 1e-6 relative).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import repo_env
from evo import config, data, optim, train
from evo.models import llama

EXPERIMENT = textwrap.dedent("""
    from evo import Experiment, Plan, data, models, optim
    experiment = Experiment(
        model=models.llama.Config(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, intermediate_size=48),
        data=data.Packed(folder=None, seq_len=32, micro_batch=2, micro_num=2, seed=3),
        optimizer=optim.adamw(lr=optim.warmup_cosine(peak=1e-2, warmup=2, floor=1e-3)),
        plan=Plan(),
        steps=4,
        run_dir=RUN_DIR,
    )
""")


@pytest.fixture
def exp_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(EXPERIMENT.replace("RUN_DIR", repr(str(tmp_path / "run"))))
    return str(path)


def evo(*args, cwd=None):
    env = repo_env()
    return subprocess.run([sys.executable, "-m", "evo", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


def test_overrides_replace_fields_with_typed_values(exp_file):
    exp = config.apply_overrides(config.load(exp_file), [
        "steps=7", "plan.tp=2", "plan.sequence_parallel=true", "data.seq_len=64",
        "optimizer.lr=5e-2", "seed=11", "run_dir=/tmp/x", "checkpoint_every=3",
        "plan.zero=1", "plan.zero_group=2", "plan.dp=2", "data.micro_batch=3",
        "data.micro_num=5"])
    assert exp.steps == 7 and exp.seed == 11 and exp.run_dir == "/tmp/x"
    assert exp.plan.tp == 2 and exp.plan.sequence_parallel is True and exp.plan.zero == 1
    assert exp.plan.zero_group == 2 and exp.plan.dp == 2 and exp.checkpoint_every == 3
    assert (exp.data.seq_len, exp.data.micro_batch, exp.data.micro_num) == (64, 3, 5)
    assert exp.optimizer.lr.peak == 5e-2  # a schedule's peak
    const = config.apply_overrides(
        config.Experiment(model=exp.model, data=exp.data, optimizer=optim.adamw(lr=1e-3)),
        ["optimizer.lr=2e-3"])
    assert const.optimizer.lr == 2e-3


@pytest.mark.parametrize("override, culprit", [
    ("nonsense=1", "nonsense"), ("plan.bogus=2", "plan.bogus"), ("steps=abc", "steps"),
    ("steps=-1", "steps"), ("plan.zero=7", "plan.zero"), ("data.seq_len=0", "seq_len"),
    ("steps", "steps"), ("plan.tp=x", "plan.tp")])
def test_bad_overrides_name_the_key(exp_file, override, culprit):
    with pytest.raises(config.ConfigError, match=culprit.replace(".", r"\.")):
        config.apply_overrides(config.load(exp_file), [override])


def test_experiment_file_errors(tmp_path):
    with pytest.raises(config.ConfigError, match="nope.py"):
        config.load(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = (\n")
    with pytest.raises(config.ConfigError, match=r"bad\.py:\d+: syntax error"):
        config.load(str(bad))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(config.ConfigError, match="experiment"):
        config.load(str(empty))
    invalid = tmp_path / "invalid.py"
    invalid.write_text("from evo import models\n"
                       "cfg = models.llama.Config(hidden_size=30, num_heads=4)\n")
    with pytest.raises(config.ConfigError, match=r"invalid\.py:2: .*num_heads"):
        config.load(str(invalid))


@pytest.mark.parametrize("args, culprit", [
    (["train", "missing_experiment.py"], "missing_experiment.py"),
    (["train", "EXP", "--set", "unknown.key=3"], "unknown.key"),
    (["train", "EXP", "--set", "plan.tp=3"], "plan.tp"),
    (["frobnicate"], "frobnicate"),
])
def test_cli_bad_input_exits_nonzero_with_one_message(exp_file, args, culprit):
    r = evo(*[exp_file if a == "EXP" else a for a in args])
    assert r.returncode != 0
    assert culprit in r.stderr
    assert "Traceback" not in r.stderr


def test_evo_train_writes_metrics_matching_the_step(exp_file, tmp_path):
    r = evo("train", exp_file, "--set", "steps=3")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [x["step"] for x in records] == [1, 2, 3]
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_second", "tflops", "mfu",
                "skipped"):
        assert all(key in x for x in records), key
    assert records[0]["mfu"] is None and records[-1]["tokens"] == 3 * 2 * 2 * 32
    assert records[-1]["skipped"] == 0

    # The same three steps, computed directly from the library.
    exp = config.apply_overrides(config.load(exp_file), ["steps=3"])
    opt = exp.optimizer.with_total_steps(3)
    state = train.init_state(llama.init(exp.model, seed=exp.seed), opt)
    loader = data.Loader(exp.data, vocab_size=exp.model.vocab_size)
    step = train.Step(exp.model, opt)
    for rec in records:
        state, m = step(state, next(loader))
        assert abs(rec["loss"] - m["loss"].item()) <= 1e-6 * abs(m["loss"].item())
        assert abs(rec["lr"] - m["lr"].item()) <= 1e-12 + 1e-6 * abs(m["lr"].item())
    assert "loss" in r.stderr  # the progress lines


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_dead_rank_stops_the_others_with_a_clear_error(exp_file, tmp_path):
    """Two processes train; once steps are running, rank 1 is killed (SIGKILL). Rank 0 exits
    non-zero with one message naming what happened within a bounded time instead of hanging."""
    import signal
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = repo_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                   EVO_DIST_TIMEOUT="30", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "evo", "train", exp_file, "--set", "plan.dp=2",
           "--set", "steps=100000"]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    try:
        _, err = procs[0].communicate(timeout=900)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0
    assert "rank 0 of 2 stopped" in err and "Traceback" not in err, err[-2000:]
    assert time.time() - killed < 300  # 10 × EVO_DIST_TIMEOUT: bounded, even on a loaded machine

