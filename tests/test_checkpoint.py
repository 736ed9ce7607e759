"""Checkpoints: crash-safe auto-resume, loading under another plan, HF export, bad input.

Resume after `kill -9` is compared bitwise (CPU, fp32: the same ops in the same order on the same
numbers). Continuing under another plan is compared at 1e-5 relative (fp32; another plan sums
partial results in another order). HF export at 1e-4 (fp32 logits, as tests/test_hf.py).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import repo_env
from evo import checkpoint, train
from evo.models import llama
from evo.sharding import Plan
from evo.sharding.mesh import Mesh


EXPERIMENT = textwrap.dedent("""
    from evo import Experiment, Plan, data, models, optim
    experiment = Experiment(
        model=models.llama.Config(vocab_size=64, hidden_size=64, num_layers=3, num_heads=4,
                                  num_kv_heads=2, intermediate_size=96),
        data=data.Packed(folder=None, seq_len=64, micro_batch=2, micro_num=2, seed=5),
        optimizer=optim.adamw(lr=optim.warmup_cosine(peak=3e-3, warmup=3, floor=3e-4)),
        steps=STEPS, checkpoint_every=EVERY, run_dir=RUN_DIR,
    )
""")


def write_experiment(tmp_path, steps, every, run_dir):
    path = tmp_path / f"exp_{steps}_{every}.py"
    path.write_text(EXPERIMENT.replace("STEPS", str(steps)).replace("EVERY", str(every))
                    .replace("RUN_DIR", repr(str(run_dir))))
    return str(path)


def env():
    return repo_env(OMP_NUM_THREADS="1")  # several processes at once on few cores


def evo_train(exp, *sets, nproc=1, check=True):
    extra = [a for s in sets for a in ("--set", s)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "evo", "train", exp, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(nproc), "-m", "evo", "train", exp, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=900)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def records(run_dir):
    out = []
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        r = json.loads(line)
        out.append((r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"], r["skipped"]))
    return out


def test_kill_9_then_rerun_is_bitwise_the_uninterrupted_run(tmp_path):
    steps = 24
    ref_dir = tmp_path / "ref"
    evo_train(write_experiment(tmp_path, steps, 3, ref_dir))
    reference = records(ref_dir)
    assert [r[0] for r in reference] == list(range(1, steps + 1))
    rng = random.Random(0)
    kills = sorted(rng.sample(range(1, steps - 1), 5))  # kill once this many steps are logged
    for k in kills:
        run_dir = tmp_path / f"run{k}"
        exp = write_experiment(tmp_path, steps, 3, run_dir)
        p = subprocess.Popen([sys.executable, "-m", "evo", "train", exp], env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = run_dir / "metrics.jsonl"
        deadline, logged = time.time() + 900, 0
        while time.time() < deadline and p.poll() is None and logged < k:
            logged = metrics.read_text().count("\n") if metrics.exists() else 0
            time.sleep(0.005)
        running = p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert running and p.returncode == -signal.SIGKILL, f"not running at step {k}: {logged}"
        assert k <= logged < steps, (k, logged)
        r = evo_train(exp)
        assert records(run_dir) == reference, f"killed after {k} steps"
        assert_same_final_params(run_dir, ref_dir)
        if k >= 3:
            assert "resuming from" in r.stderr
    print("killed after steps", kills)


def assert_same_final_params(run_dir, ref_dir):
    """The last checkpoints of two runs hold bitwise equal parameters."""
    loaded = []
    for d in (run_dir, ref_dir):
        ckpt = checkpoint.resolve(str(d))
        cfg = checkpoint.model_config(checkpoint.read_index(ckpt))
        loaded.append((ckpt, checkpoint.load_params(ckpt, cfg, Mesh(Plan().resolve(1), 0))))
    (ckpt, params), (ref_ckpt, ref) = loaded
    assert os.path.basename(ckpt) == os.path.basename(ref_ckpt), (ckpt, ref_ckpt)
    assert params.keys() == ref.keys()
    assert all(torch.equal(params[k], ref[k]) for k in ref), [
        k for k in ref if not torch.equal(params[k], ref[k])]


def test_save_by_4_processes_continue_on_1_and_on_tp2(tmp_path):
    """dp2×tp2 ZeRO-3 on 4 processes saves at step 2 (stop file); 1 process and tp2 on 2 processes
    continue; their steps 3-4 equal the uninterrupted 4-process run within 1e-5."""
    plan4 = ["plan.dp=2", "plan.tp=2", "plan.zero=3", "data.micro_num=1"]
    full_dir = tmp_path / "full"
    evo_train(write_experiment(tmp_path, 4, 0, full_dir), *plan4, nproc=4)
    full = records(full_dir)

    saved = tmp_path / "saved"
    os.makedirs(saved)
    (saved / "stop").write_text("2")
    evo_train(write_experiment(tmp_path, 4, 0, saved), *plan4, nproc=4)
    assert [r[0] for r in records(saved)] == [1, 2]
    (saved / "stop").unlink()
    for name, sets, nproc in (("one", ["data.micro_num=2"], 1),
                              ("tp2", ["plan.tp=2", "data.micro_num=2"], 2)):
        run_dir = tmp_path / name
        shutil.copytree(saved, run_dir)
        r = evo_train(write_experiment(tmp_path, 4, 0, run_dir), *sets, nproc=nproc)
        assert "resuming from" in r.stderr
        got = records(run_dir)
        assert [x[0] for x in got] == [1, 2, 3, 4]
        for a, b in zip(got[2:], full[2:]):
            assert abs(a[1] - b[1]) <= 1e-5 * abs(b[1]), (name, a, b)


def test_export_hf_from_a_sharded_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    evo_train(write_experiment(tmp_path, 4, 2, run_dir), "plan.tp=2", "plan.zero=3",
              "data.micro_num=2", nproc=2)
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "evo", "export-hf", str(run_dir), "--out", str(out)],
                       capture_output=True, text=True, env=env(), timeout=900)
    assert r.returncode == 0, r.stderr
    ckpt = checkpoint.resolve(str(run_dir))
    cfg = checkpoint.model_config(checkpoint.read_index(ckpt))
    params = checkpoint.load_params(ckpt, cfg, Mesh(Plan().resolve(1), 0))
    model = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens).logits
    assert (llama.apply(cfg, params, tokens) - ref).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    run_dir = tmp / "run"
    exp = write_experiment(tmp, 4, 2, run_dir)
    evo_train(exp, "async_checkpoint=false", "steps=4", "keep_last=1")
    return tmp, run_dir, exp


def _copy(saved_run, name):
    tmp, run_dir, exp = saved_run
    dst = tmp / name
    shutil.copytree(run_dir, dst)
    return dst, checkpoint.resolve(str(dst))


def test_missing_shard_names_the_file(saved_run):
    _, ckpt = _copy(saved_run, "missing")
    os.remove(os.path.join(ckpt, "rank-00000.safetensors"))
    cfg = checkpoint.model_config(checkpoint.read_index(ckpt))
    with pytest.raises(checkpoint.CheckpointError, match="rank-00000.safetensors: shard file is missing"):
        checkpoint.load_params(ckpt, cfg, Mesh(Plan().resolve(1), 0))


def test_truncated_shard_names_the_file(saved_run):
    _, ckpt = _copy(saved_run, "truncated")
    path = os.path.join(ckpt, "rank-00000.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    cfg = checkpoint.model_config(checkpoint.read_index(ckpt))
    with pytest.raises(checkpoint.CheckpointError, match="rank-00000.safetensors"):
        checkpoint.load_params(ckpt, cfg, Mesh(Plan().resolve(1), 0))


def test_checkpoint_of_another_model_shape(saved_run):
    tmp, run_dir, _ = saved_run
    other = tmp / "other_exp.py"
    other.write_text(open(write_experiment(tmp, 4, 2, run_dir)).read()
                     .replace("hidden_size=64", "hidden_size=32"))
    r = subprocess.run([sys.executable, "-m", "evo", "train", str(other)], capture_output=True,
                       text=True, env=env(), timeout=900)
    assert r.returncode != 0 and "model.hidden_size" in r.stderr and "Traceback" not in r.stderr


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no complete evo checkpoint"):
        checkpoint.resolve(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="not a complete evo checkpoint"):
        checkpoint.read_index(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "evo", "export-hf", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env())
    assert r.returncode != 0 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_auto_resume_skips_an_incomplete_checkpoint(saved_run):
    run_dir, ckpt = _copy(saved_run, "incomplete")
    partial = os.path.join(run_dir, "checkpoints", ".tmp-step-00000004")
    os.makedirs(partial)
    open(os.path.join(partial, "rank-00000.safetensors"), "wb").close()
    exp = write_experiment(saved_run[0], 6, 2, run_dir)
    r = evo_train(exp)
    assert "skipping incomplete checkpoint" in r.stderr and "resuming from" in r.stderr
    assert not os.path.exists(partial)
    assert [x[0] for x in records(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in checkpoint.complete_checkpoints(os.path.join(run_dir, "checkpoints"))] \
        == [4, 6]


def test_pruning_keeps_last_k_and_every_m(tmp_path):
    exp = write_experiment(tmp_path, 10, 1, tmp_path / "run")
    evo_train(exp, "keep_last=2", "keep_every=4", "async_checkpoint=false")
    steps = [s for s, _ in checkpoint.complete_checkpoints(str(tmp_path / "run" / "checkpoints"))]
    assert steps == [4, 8, 9, 10]


SLOW_SAVE = """
import sys, time
import evo.checkpoint as c
write = c.save_file
c.save_file = lambda *a, **k: (time.sleep(0.4), write(*a, **k))[1]
from evo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_save(tmp_path):
    """Saves slowed down (0.4 s) so the kill lands while `.tmp-step-N` is being written: the
    rerun skips the partial checkpoint and still logs the uninterrupted run's metrics."""
    steps = 12
    ref_dir = tmp_path / "ref"
    evo_train(write_experiment(tmp_path, steps, 3, ref_dir))
    run_dir = tmp_path / "run"
    exp = write_experiment(tmp_path, steps, 3, run_dir)
    p = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "train", exp], env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run_dir / "checkpoints"
    deadline, seen = time.time() + 900, False
    while time.time() < deadline and p.poll() is None and not seen:
        seen = ckpts.exists() and any(n.startswith(".tmp-step-00000006") for n in os.listdir(ckpts))
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert seen
    r = evo_train(exp)
    assert "skipping incomplete checkpoint" in r.stderr and "step 3" in r.stderr
    assert records(run_dir) == records(ref_dir)


def test_sigterm_saves_before_exiting(tmp_path):
    run_dir = tmp_path / "run"
    exp = write_experiment(tmp_path, 400, 0, run_dir)
    p = subprocess.Popen([sys.executable, "-m", "evo", "train", exp], env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0 and "stopped, as asked by SIGTERM" in err
    done = checkpoint.complete_checkpoints(str(run_dir / "checkpoints"))
    assert len(done) == 1 and done[0][0] == len(records(run_dir))


def test_init_from_a_checkpoint_or_hf_loads_params_only(saved_run, tmp_path):
    """`init_from` takes the weights (params only: fresh optimizer, step 0) of an evo checkpoint
    or of an HF directory (`evo import-hf`); the first logged loss equals the loss of those
    weights computed directly."""
    _, src_run, exp = saved_run
    ckpt = checkpoint.resolve(str(src_run))
    cfg = checkpoint.model_config(checkpoint.read_index(ckpt))
    params = checkpoint.load_params(ckpt, cfg, Mesh(Plan().resolve(1), 0))
    from evo import config, data, hf
    e = config.load(exp)
    batch = next(data.Loader(e.data, vocab_size=cfg.vocab_size))
    _, aux = train.Step(cfg, e.optimizer.with_total_steps(e.steps)).grads(params, batch)
    expected = aux["loss"]
    hf_dir = tmp_path / "hf"
    hf.save_hf(cfg, params, str(hf_dir))
    for name, cmd in (("from_ckpt", ["train", exp, "--set", f"init_from={src_run}"]),
                      ("from_hf", ["import-hf", str(hf_dir), exp])):
        run_dir = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "evo", *cmd, "--set", f"run_dir={run_dir}",
                            "--set", "steps=4"], capture_output=True, text=True, env=env(),
                           timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        first = records(run_dir)[0]
        assert first[0] == 1 and abs(first[1] - float(expected)) <= 1e-6 * float(expected), name


def test_stop_file_with_a_negative_step_saves_and_continues(tmp_path):
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    (run_dir / "stop").write_text("-3")
    evo_train(write_experiment(tmp_path, 5, 0, run_dir))
    assert [x[0] for x in records(run_dir)] == [1, 2, 3, 4, 5]
    # step 3 for the stop file, step 5 the final checkpoint every run ends with
    assert [s for s, _ in checkpoint.complete_checkpoints(str(run_dir / "checkpoints"))] == [3, 5]
