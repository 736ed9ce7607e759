"""Nothing lost, nothing silently wrong: the run-directory lock, float16 loss scaling, resuming
with a changed model config, a checkpoint that cannot be written, the final checkpoint.

Processes are real (`evo train` subprocesses) where the behaviour is between processes or at the
command line; the rest runs `run.run` in this process. float16 figures are measured against the
fp32 gradients of the same batch; tolerances are stated where they are used.
"""
import dataclasses
import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from evo import Experiment, checkpoint, data, optim, run, scaler, train
from evo.lock import RunDirError, RunDirLock
from evo.models import llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = llama.Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=48)

EXPERIMENT = textwrap.dedent("""
    from evo import Experiment, Plan, data, models, optim
    experiment = Experiment(
        model=models.llama.Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, intermediate_size=48),
        data=data.Packed(folder=None, seq_len=32, micro_batch=2, micro_num=2, seed=5),
        optimizer=optim.adamw(lr=1e-2),
        steps=STEPS, checkpoint_every=EVERY, run_dir=RUN_DIR, tokenizer="byte",
    )
""")


def write_experiment(tmp_path, run_dir, steps=4, every=0):
    path = tmp_path / f"exp_{steps}_{every}.py"
    path.write_text(EXPERIMENT.replace("STEPS", str(steps)).replace("EVERY", str(every))
                    .replace("RUN_DIR", repr(str(run_dir))))
    return str(path)


def env():
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")


def evo(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "evo", *args], capture_output=True, text=True,
                          env=env(), timeout=timeout)


def experiment(run_dir, **kw) -> Experiment:
    fields = dict(model=CFG, data=data.Packed(folder=None, seq_len=32, micro_batch=2, micro_num=2,
                                              seed=5),
                  optimizer=optim.adamw(lr=1e-2), steps=4, run_dir=str(run_dir),
                  tensorboard=False, tokenizer="byte")
    return Experiment(**{**fields, **kw})


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]  # a cut line fails here


def steps_of(run_dir):
    return [s for s, _ in checkpoint.complete_checkpoints(os.path.join(run_dir, "checkpoints"))]


# ----------------------------------------------------------------------------- run_dir lock

def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with RunDirLock(str(tmp_path)):
        with pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} on "
                                              rf"{socket.gethostname()}"):
            RunDirLock(str(tmp_path)).acquire()
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly: nothing to take over
    messages = []
    with RunDirLock(str(tmp_path), log=messages.append):
        pass
    assert messages == []


def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
    """Run A trains; run B on the same run_dir (another seed) is refused with one line naming
    A's pid and host, and writes nothing (A's metrics go on 1, 2, 3 ... with no gap or repeat).
    A is then killed with SIGKILL; run C takes its lock over, says so, and resumes."""
    run_dir = tmp_path / "run"
    exp = write_experiment(tmp_path, run_dir, steps=2000, every=3)
    a = subprocess.Popen([sys.executable, "-m", "evo", "train", exp], env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics, deadline = run_dir / "metrics.jsonl", time.time() + 120
        while time.time() < deadline and not (metrics.exists() and
                                               metrics.read_text().count("\n") >= 4):
            time.sleep(0.05)
        b = evo("train", exp, "--set", "seed=1")
        assert b.returncode == 2
        assert b.stderr.strip() == (
            f"evo: error: run_dir {run_dir} is in use by pid {a.pid} on {socket.gethostname()} "
            f"(it holds {run_dir / '.lock'}); wait for that run to end or give this run another "
            f"run_dir"), b.stderr
        # under torchrun, rank 0 tries the lock and every rank learns the answer
        b2 = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", "-m", "evo", "train", exp, "--set", "plan.dp=2", "--set", "data.micro_num=1"],
            capture_output=True, text=True, env=env(), timeout=300)
        assert b2.returncode != 0
        assert b2.stderr.count(f"evo: error: run_dir {run_dir} is in use by pid {a.pid}") == 2
        time.sleep(1.0)  # A goes on writing
        a.send_signal(signal.SIGKILL)
        a.wait()
        steps = [r["step"] for r in records(run_dir)]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
    finally:
        a.kill()
    c = evo("train", exp, "--set", "steps=" + str(max(steps_of(run_dir)) + 1))
    assert c.returncode == 0, c.stderr[-2000:]
    assert f"taking over the lock of {run_dir} from pid {a.pid} on {socket.gethostname()}" \
        in c.stderr
    assert "resuming from" in c.stderr


# ------------------------------------------------------------------------ float16 loss scaling

DEMO = llama.Config(vocab_size=258, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2,
                    intermediate_size=512, max_seq_len=256)


def _flushed_and_norm_error(grads, ref):
    """Fraction of the non-zero fp32 gradients that are zero in ``grads``, and the relative
    error of the global gradient norm."""
    nonzero = torch.cat([r.flatten() != 0 for r in ref.values()])
    zero = torch.cat([g.flatten() == 0 for g in grads.values()])
    norm = lambda gs: torch.linalg.vector_norm(torch.stack(  # noqa: E731
        [torch.linalg.vector_norm(g.double()) for g in gs.values()]))
    return float((nonzero & zero).sum() / nonzero.sum()), float(abs(norm(grads) - norm(ref))
                                                                / norm(ref))


def test_float16_gradients_of_a_large_batch_with_and_without_the_scaler():
    """The demo's model on one batch of Python source (4 × 256 bytes), the mean taken as over a
    1M-token global batch (normalizer 2**20, what each data-parallel rank divides by). Without
    loss scaling float16 flushes a quarter of the gradients to zero; with the default scale
    (2**16) the gradients are the fp32 ones to float16 precision: norm within 1e-3 relative (two
    float16 ulps, 2 × 4.9e-4) and fewer than 1e-4 of them flushed."""
    params = llama.init(DEMO, seed=0)
    text = open(os.__file__, "rb").read()[:4 * 257]
    ids = torch.tensor(list(text), dtype=torch.int64).view(4, 257)
    batch = {"tokens": ids[None, :, :-1], "labels": ids[None, :, 1:]}
    n = torch.tensor(2 ** 20)
    opt = optim.adamw(lr=1e-3)
    ref, _ = train.Step(DEMO, opt).grads(params, batch, normalizer=n)
    half = train.Step(DEMO, opt, compute_dtype=torch.float16)
    plain, _ = half.grads(params, batch, normalizer=n)
    state = half.scaling.init()
    scaled, _ = half.grads(params, batch, normalizer=n, loss_scale=state.scale)
    scaler.unscale_(scaled, state)
    flushed, norm_error = _flushed_and_norm_error(plain, ref)
    flushed_s, norm_error_s = _flushed_and_norm_error(scaled, ref)
    print(f"\nfloat16 without loss scaling: {flushed:.1%} of non-zero gradients flushed to zero, "
          f"gradient norm {norm_error:.1%} off; with: {flushed_s:.2e} flushed, norm "
          f"{norm_error_s:.2e} off")
    assert flushed > 0.2 and norm_error > 0.2  # the defect the scaler removes
    assert flushed_s < 1e-4 and norm_error_s < 1e-3


def test_scale_schedule_backoff_hysteresis_growth_and_bounds():
    """InternEvo's schedule, step by step against values worked out by hand."""
    ls = scaler.LossScale(initial_scale=1024.0, growth_interval=3, hysteresis=2, min_scale=256.0,
                          max_scale=4096.0)
    s = ls.init()
    seen = []
    for overflow in [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]:
        s = ls.update(s, torch.tensor(bool(overflow)))
        seen.append((float(s.scale), int(s.growth_step), int(s.hysteresis_step)))
    assert seen == [
        (1024, 0, 1),   # first overflow: hysteresis holds the scale
        (512, 0, 2),    # second: back off
        (256, 0, 3),    # every further one backs off too ...
        (256, 0, 4),    # ... not below min_scale
        (256, 1, 4), (256, 2, 4), (512, 0, 0),  # 3 clean steps: grow, counters reset
        (512, 1, 0), (512, 2, 0), (1024, 0, 0),
        (1024, 1, 0), (1024, 2, 0), (2048, 0, 0),
        (2048, 0, 1),   # an overflow after growth: hysteresis again
    ]
    with pytest.raises(ValueError, match="LossScale.backoff_factor"):
        scaler.LossScale(backoff_factor=1.5)


def test_an_overflowing_step_is_skipped_counted_and_backs_the_scale_off():
    """A scale of 2**60 overflows float16's backward: the step changes no parameter, counts as
    skipped, and (hysteresis 2) the second overflow halves the scale; a scale that fits trains
    and grows after ``growth_interval`` clean steps."""
    opt = optim.adamw(lr=1e-2)
    tokens = torch.randint(0, CFG.vocab_size, (2, 2, 16),
                           generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": tokens}
    params = llama.init(CFG, seed=0)
    step = train.Step(CFG, opt, compute_dtype=torch.float16,
                      loss_scale=scaler.LossScale(initial_scale=2.0 ** 60, max_scale=2.0 ** 60))
    state = train.init_state(params, opt)
    for k in (1, 2):
        state, m = step(state, batch)
        assert bool(m["skipped"]) and not torch.isfinite(m["grad_norm"])
        assert int(state.opt_state.skipped) == k
        assert all(torch.equal(state.params[n], params[n]) for n in params)
    assert float(m["loss_scale"]) == 2.0 ** 60 and float(state.scaler.scale) == 2.0 ** 59
    assert torch.isfinite(m["loss"])  # the reported loss is the unscaled one

    step = dataclasses.replace(step, loss_scale=scaler.LossScale(initial_scale=256.0,
                                                                 growth_interval=2))
    state = train.init_state(params, opt)
    scales = []
    for _ in range(3):
        state, m = step(state, batch)
        scales.append(float(m["loss_scale"]))
        assert not bool(m["skipped"])
    assert scales == [256.0, 256.0, 512.0] and int(state.opt_state.skipped) == 0
    # bf16 and fp32 steps do not scale: no scaler state, no metric
    state, m = train.Step(CFG, opt, compute_dtype=torch.bfloat16)(train.init_state(params, opt),
                                                                 batch)
    assert state.scaler == () and "loss_scale" not in m


def test_float16_resume_is_bitwise_with_the_scaler_state(tmp_path):
    """A float16 run whose first steps overflow (initial scale 2**40) saved at step 3 and resumed
    logs exactly what the uninterrupted run logs: the scale, its counters and the skip count
    travel in the checkpoint."""
    kw = dict(compute_dtype="float16", steps=6, async_checkpoint=False,
              loss_scale=scaler.LossScale(initial_scale=2.0 ** 40, max_scale=2.0 ** 40,
                                          growth_interval=2))
    run.run(experiment(tmp_path / "ref", **kw), stream=io.StringIO())
    run.run(experiment(tmp_path / "cut", **{**kw, "steps": 3}), stream=io.StringIO())
    run.run(experiment(tmp_path / "cut", **kw), stream=io.StringIO())
    keys = ("step", "loss", "grad_norm", "loss_scale", "skipped")
    ref = [{k: r[k] for k in keys} for r in records(tmp_path / "ref")]
    assert ref == [{k: r[k] for k in keys} for r in records(tmp_path / "cut")]
    assert ref[0]["skipped"] == 1 and ref[0]["loss_scale"] == 2.0 ** 40
    assert ref[-1]["skipped"] >= 2 and ref[-1]["loss_scale"] < 2.0 ** 40


# ------------------------------------------------------------------------ resume with changes

def test_resume_with_a_changed_model_field_is_refused_unless_asked(tmp_path):
    run_dir = tmp_path / "run"
    exp = write_experiment(tmp_path, run_dir, steps=2)
    assert evo("train", exp).returncode == 0
    r = evo("train", exp, "--set", "steps=3", "--set", "model.rope_theta=500000.0",
            "--set", "model.norm_eps=1e-5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"evo: error: {run_dir / 'checkpoints' / 'step-00000002'} was saved with "
        f"model.norm_eps=1e-06, this run has model.norm_eps=1e-05 (and model.rope_theta): "
        f"resuming would continue another function. Set it back, use another run_dir, or resume "
        f"anyway with --set resume_with_changes=true (recorded in the checkpoints' meta)")
    assert [x["step"] for x in records(run_dir)] == [1, 2]  # nothing written
    # a field that does not change the function resumes freely
    ok = evo("train", exp, "--set", "steps=3", "--set", "log_every=1")
    assert ok.returncode == 0 and "resuming from" in ok.stderr, ok.stderr[-2000:]
    # asked for: resumes, says so, and every later checkpoint records it
    ok = evo("train", exp, "--set", "steps=4", "--set", "model.rope_theta=500000.0",
             "--set", "resume_with_changes=true")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "with model.rope_theta changed from 10000.0 to 500000.0" in ok.stderr
    meta = checkpoint.read_index(checkpoint.resolve(str(run_dir)))["meta"]
    assert meta["resumed_with_changes"] == [
        {"step": 3, "field": "model.rope_theta", "saved": 10000.0, "now": 500000.0}]
    assert [x["step"] for x in records(run_dir)] == [1, 2, 3, 4]


def test_model_changes_compares_the_whole_config_as_saved():
    """The comparison is generic: nested values (rope scaling) and any field, in the JSON form
    index.json holds; an unchanged config has no changes."""
    scaled = dataclasses.replace(CFG, rope_scaling=llama.RopeScaling(factor=8.0))
    index = json.loads(json.dumps({"model": dataclasses.asdict(scaled)}))
    assert checkpoint.model_changes(index, scaled) == {}
    other = dataclasses.replace(scaled, rope_scaling=llama.RopeScaling(factor=4.0))
    changes = checkpoint.model_changes(index, other)
    assert list(changes) == ["rope_scaling"]
    saved, now = changes["rope_scaling"]
    assert saved["factor"] == 8.0 and now["factor"] == 4.0
    assert list(checkpoint.model_changes(index, dataclasses.replace(CFG))) == ["rope_scaling"]


# --------------------------------------------------------------------------- disk full

ENOSPC_AT = """
import errno, sys
from evo import checkpoint
from evo.cli import main
real = checkpoint.save_file
def save_file(tensors, path):
    if "step-{bad:08d}" in path:
        real(tensors, path)  # part of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)
    real(tensors, path)
checkpoint.save_file = save_file
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("asynchronous", [False, True])
def test_disk_full_during_a_checkpoint(tmp_path, asynchronous):
    """The save of step 4 fails with ENOSPC (checkpoints every 2 steps of 40): one line naming
    the checkpoint, its path and the last good one, exit 2, at once (the asynchronous save's
    error at the next step, not at the end), no temporary directory left, step 2 intact, and
    metrics.jsonl whole."""
    run_dir = tmp_path / "run"
    exp = write_experiment(tmp_path, run_dir, steps=40, every=2)
    r = subprocess.run([sys.executable, "-c", ENOSPC_AT.format(bad=4), "train", exp,
                        "--set", f"async_checkpoint={asynchronous}"],
                       capture_output=True, text=True, env=env(), timeout=300)
    root = run_dir / "checkpoints"
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"evo: error: checkpoint step-00000004 could not be written to {root / 'step-00000004'} "
        f"(No space left on device); the last good checkpoint is {root / 'step-00000002'}")
    assert sorted(os.listdir(root)) == ["step-00000002"]
    steps = [x["step"] for x in records(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and 4 <= len(steps) <= (6 if asynchronous
                                                                           else 4)
    cfg = checkpoint.model_config(checkpoint.read_index(str(root / "step-00000002")))
    state, _ = checkpoint.load_state(str(root / "step-00000002"), cfg, optim.adamw(lr=1e-2),
                                     _one_rank())
    assert int(state.step) == 2


def _one_rank():
    from evo.sharding import Plan
    from evo.sharding.mesh import Mesh
    return Mesh(Plan().resolve(1), 0)


def test_a_failed_write_is_one_checkpoint_error(tmp_path, monkeypatch):
    """The Saver itself, synchronous: the error names the step, the path and 'none' when no
    checkpoint is complete; the temporary directory is gone."""
    def full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_file", full)
    saver = checkpoint.Saver(str(tmp_path), _one_rank(), asynchronous=False)
    opt = optim.adamw(lr=1e-2)
    state = train.init_state(llama.init(CFG, seed=0), opt)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint step-00000000 could not be "
                       r"written to .*step-00000000 \(No space left on device\); the last good "
                       r"checkpoint is none"):
        saver.save(CFG, state, loader_state={}, meta={})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------- final checkpoint

def test_every_run_ends_with_a_checkpoint_that_generate_reads(tmp_path):
    byte_model = dataclasses.replace(CFG, vocab_size=258)  # the byte tokenizer's vocabulary
    run.run(experiment(tmp_path / "run", steps=3, model=byte_model), stream=io.StringIO())
    assert steps_of(tmp_path / "run") == [3]
    r = evo("generate", str(tmp_path / "run"), "--prompt", "ab", "--max-new-tokens", "4",
            "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("ab"), r.stderr[-2000:]
    # checkpoint_every that already saved the last step: not saved twice
    run.run(experiment(tmp_path / "every", steps=4, checkpoint_every=2, async_checkpoint=False),
            stream=io.StringIO())
    assert steps_of(tmp_path / "every") == [2, 4]
    run.run(experiment(tmp_path / "off", steps=3, final_checkpoint=False), stream=io.StringIO())
    assert steps_of(tmp_path / "off") == []


def test_float16_loss_scaling_is_the_same_under_a_4_process_plan(tmp_path):
    """dp2×tp2 ZeRO-1 on 4 processes against one process, float16 with an initial scale that
    overflows (2**24) and growth every 2 clean steps: every rank takes the same skip and scale
    decisions as the one process (the global gradient norm decides), so the skips and scales are
    equal and the losses agree to 1e-4 relative (the plans sum the float16 matmuls' partial
    products in other orders; measured ~2e-6, float16's own resolution is 9.8e-4)."""
    exp = write_experiment(tmp_path, tmp_path / "one", steps=8)
    common = ["--set", "compute_dtype=float16", "--set", "loss_scale.initial_scale=16777216.0",
              "--set", "loss_scale.growth_interval=2"]
    one = evo("train", exp, *common)
    assert one.returncode == 0, one.stderr[-2000:]
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "-m", "evo", "train", exp, *common, "--set", "plan.dp=2", "--set", "plan.tp=2",
         "--set", "plan.zero=1", "--set", "data.micro_num=1",
         "--set", f"run_dir={tmp_path / 'dist'}"],
        capture_output=True, text=True, env=env(), timeout=600)
    assert dist.returncode == 0, dist.stderr[-3000:]
    a, b = records(tmp_path / "one"), records(tmp_path / "dist")
    assert [(r["loss_scale"], r["skipped"]) for r in a] == \
        [(r["loss_scale"], r["skipped"]) for r in b]
    assert a[0]["skipped"] == 1 and a[-1]["skipped"] < 8  # overflows and clean steps both
    assert "alert" not in one.stderr  # the scaler's overflows are handled, not alerts
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * abs(ra["loss"]), (ra["loss"], rb["loss"])


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs "
                               "/mnt"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm to mount a tmpfs")
@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_really_full_disk(tmp_path, asynchronous):
    """run_dir on a 640 KiB tmpfs (in a user and mount namespace): two checkpoints of ~260 KiB
    fit, the third does not. One line names it and the last good one, exit 2, the full
    checkpoint's files are gone, and metrics.jsonl is whole."""
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    os.makedirs(run_dir)
    exp = write_experiment(tmp_path, run_dir, steps=40, every=2)
    script = (f"mount -t tmpfs -o size=640k tmpfs {run_dir} && "
              f"{{ {sys.executable} -m evo train {exp} --set tensorboard=false "
              f"--set async_checkpoint={asynchronous} 2> {tmp_path / 'err'}; echo $? > "
              f"{tmp_path / 'rc'}; }}; cp -a {run_dir} {copy}")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env(), timeout=300, check=True)
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2" and "Traceback" not in err, err[-2000:]
    root = run_dir / "checkpoints"
    assert err.strip().splitlines()[-1] == (
        f"evo: error: checkpoint step-00000006 could not be written to {root / 'step-00000006'} "
        f"(No space left on device); the last good checkpoint is {root / 'step-00000004'}")
    assert sorted(os.listdir(copy / "checkpoints")) == ["step-00000002", "step-00000004"]
    steps = [x["step"] for x in records(copy)]
    assert steps == list(range(1, len(steps) + 1)) and 6 <= len(steps) <= 8
