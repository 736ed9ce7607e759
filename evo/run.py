"""The training loop: experiment → state → steps → metrics. No argument parsing (that is cli.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import IO

import torch
import torch.distributed as dist

from evo import checkpoint, data, generate, models, monitor, orbax_io, train
from evo.config import Experiment
from evo.lock import RunDirError, RunDirLock
from evo.sharding import pipeline, planner, shard
from evo.sharding.mesh import build_mesh


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def evaluate_sets(exp: Experiment, params, sets: dict[str, list], device,
                  text_bytes: dict[str, int] | None = None) -> dict[str, dict]:
    """Loss, perplexity and next-token accuracy per named validation set; bits per byte too where
    ``text_bytes`` gives the bytes of text each set's targets spell."""
    out = {}
    for name, batches in sets.items():
        loss_sum, count, correct = 0.0, 0, 0
        for batch in batches:
            r = train.evaluate(exp.model, params, _to(batch, device),
                               compute_dtype=_dtype(exp.compute_dtype), attention=exp.attention)
            loss_sum += float(r["loss_sum"])
            count += int(r["count"])
            correct += int(r["correct"])
        loss = loss_sum / max(count, 1)
        out[name] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                     "accuracy": correct / max(count, 1), "tokens": count}
        if text_bytes and text_bytes.get(name):
            out[name]["bits_per_byte"] = loss_sum / math.log(2) / text_bytes[name]
    return out


def _text_bytes(exp: Experiment, sets: dict[str, list]) -> dict[str, int] | None:
    """Bytes of text the targets of each validation set spell, where the tokenizer knows them."""
    table = data.load_tokenizer(exp.tokenizer).token_bytes() if exp.tokenizer and sets else None
    if table is None:
        return None
    return {name: sum(data.target_bytes(b["labels"], table) for b in batches)
            for name, batches in sets.items()}


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class DistributedFailure(RuntimeError):
    """A multi-process run lost a peer (or a collective timed out)."""


def _distributed(world: int, device_type: str) -> None:
    """Join the process group torchrun (or slurm) describes in the environment."""
    if dist.is_initialized():
        return
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    timeout = datetime.timedelta(seconds=float(os.environ.get("EVO_DIST_TIMEOUT", "300")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)


def run(exp: Experiment, *, device: str | None = None, stream: IO[str] | None = None) -> dict:
    """Train ``exp`` and return a summary: final metrics, evaluations, and the sample if asked.

    One process, or every process of a ``torchrun`` / slurm launch: the world size comes from the
    environment (``WORLD_SIZE`` or ``SLURM_NPROCS``) and the plan distributes the step. Rank 0
    writes metrics and progress; the others stay quiet.
    """
    stream = stream or sys.stderr
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NPROCS", "1")))
    exp.plan.resolve(world)  # a plan that does not fit the world fails before anything starts
    planner.model_layouts(exp.plan.resolve(world), exp.model)
    pipeline.check(exp.model, exp.plan, exp.data.micro_num)
    planner.check_plan(exp.plan, exp.model, exp.attention)
    _check_init_from(exp)
    cuda = torch.cuda.is_available() and device != "cpu"
    if world > 1:
        _distributed(world, "cuda" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device or (f"cuda:{local}" if cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        with _run_dir_locked(exp.run_dir, stream):
            return _train(exp, device, stream)
    except (RuntimeError, dist.DistError) as e:
        if world == 1:
            raise
        # A peer that died or hung surfaces here as a failed or timed-out collective.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedFailure(
            f"rank {os.environ.get('RANK', '?')} of {world} stopped: a collective failed or timed "
            f"out (EVO_DIST_TIMEOUT={os.environ.get('EVO_DIST_TIMEOUT', '300')}s); another process "
            f"has probably died, and its own log says why. Cause: {first[:300]}") from None
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _check_init_from(exp: Experiment) -> None:
    """An HF directory given as ``init_from`` holds a model of this run's family and shapes:
    checked from its config.json before the run writes anything."""
    if exp.init_from is not None and os.path.isfile(os.path.join(exp.init_from, "config.json")):
        from evo import hf
        cfg = hf.read_config(exp.init_from)
        checkpoint.check_model(checkpoint.model_record(cfg), exp.model, exp.init_from)


@contextlib.contextmanager
def _run_dir_locked(run_dir: str, stream: IO[str]):
    """Hold the run directory's lock (rank 0) for the run; every rank of a run that may not
    start raises the same RunDirError before anything is written."""
    lead = not dist.is_initialized() or dist.get_rank() == 0
    lock = RunDirLock(run_dir, log=lambda text: print(text, file=stream, flush=True))
    refused = None
    if lead:
        try:
            lock.acquire()
        except RunDirError as e:
            refused = str(e)
    if dist.is_initialized():
        box = [refused]
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused is not None:
        raise RunDirError(refused)
    try:
        yield
    finally:
        lock.release()


def _keep_records(path: str, last_step: int) -> None:
    """Drop JSONL records past ``last_step`` (written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [x for x in f if x.strip()]
    kept = []
    for x in lines:
        try:
            if json.loads(x)["step"] <= last_step:
                kept.append(x)
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by a crash, and anything after it
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def _stop_request(run_dir: str) -> int:
    """The step written in ``RUN_DIR/stop`` (InternEvo's stop file), 0 when absent or unreadable."""
    try:
        with open(os.path.join(run_dir, "stop")) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _initial_params(exp: Experiment, mesh, device):
    """Fresh parameters, or those of ``exp.init_from`` (an HF directory, an evo Orbax export or an
    evo run/checkpoint: parameters only, optimizer fresh)."""
    if exp.init_from is None:
        return planner.init_params(exp.model, exp.seed, mesh, device=device)
    orbax = orbax_io.is_export(exp.init_from)
    if orbax or os.path.isfile(os.path.join(exp.init_from, "config.json")):
        from evo import hf
        cfg, params = (orbax_io.load if orbax else hf.load_hf)(exp.init_from)
        checkpoint.check_model(checkpoint.model_record(cfg), exp.model, exp.init_from)
        return {k: v.to(device) for k, v in planner.shard_params(exp.model, params, mesh).items()}
    return checkpoint.load_params(checkpoint.resolve(exp.init_from), exp.model, mesh,
                                  device=device)


@dataclasses.dataclass
class _Run:
    """What one process of a run works with: the pieces built once, the writers (rank 0 only;
    None elsewhere), and what the loop has produced so far."""
    exp: Experiment
    mesh: object
    device: torch.device
    loader: data.Loader
    step_fn: object
    saver: checkpoint.Saver
    valid: dict
    text_bytes: dict | None           # bytes of text each validation set spells (bits per byte)
    meta: dict
    progress: monitor.Progress
    metrics_out: monitor.JsonlWriter | None
    eval_out: monitor.JsonlWriter | None
    board: monitor.TensorBoardWriter | None
    alerts: monitor.Alerts
    speed: monitor.Throughput
    profiler: monitor.Profiler
    saved_step: int | None = None     # the step of the last checkpoint written or resumed from
    last_record: dict = dataclasses.field(default_factory=dict)
    evals: dict = dataclasses.field(default_factory=dict)

    @property
    def lead(self) -> bool:
        return self.mesh.rank == 0

    def close(self) -> None:
        self.profiler.close()
        self.alerts.close()
        self.progress.close()
        for w in (self.metrics_out, self.eval_out, self.board):
            if w is not None:
                w.close()


def _train(exp: Experiment, device: torch.device, stream: IO[str]) -> dict:
    """Resume (or start), run the steps, save, and end with the final sample."""
    mesh = build_mesh(exp.plan)
    progress = monitor.Progress(exp.steps, every=exp.log_every,
                                stream=stream if mesh.rank == 0 else io.StringIO())
    loader = data.Loader(exp.data, vocab_size=exp.model.vocab_size, dp_rank=mesh.coords["dp"],
                         dp_size=mesh.plan.dp)
    state, resumed_from, meta = _resume_or_init(exp, mesh, loader, device, progress)
    r = _open_run(exp, mesh, device, loader, progress, int(state.step), meta)
    r.saved_step = resumed_from
    try:
        with _sigterm_flag() as terminated:
            state, stopped = _loop(r, state, terminated)
        if stopped is None and exp.final_checkpoint and r.saved_step != int(state.step):
            _save(r, state)
        r.saver.wait()
    finally:
        r.close()
    summary = {"final": r.last_record, "eval": r.evals, "plan": mesh.plan, "stopped": stopped,
               "alerts": r.alerts.raised}
    if exp.sample_prompt is not None and stopped is None:
        sample = _final_sample(r, state)
        if sample is not None:
            summary["sample"] = sample
    return summary


def _resume_or_init(exp: Experiment, mesh, loader: data.Loader, device, progress
                    ) -> tuple[train.TrainState, int | None, dict]:
    """The state to start from: the latest complete checkpoint of ``run_dir`` (incomplete ones
    removed), else a fresh state; its step (None when fresh) and the meta every checkpoint of
    this run records."""
    opt = exp.optimizer.with_total_steps(exp.steps)
    root = os.path.join(exp.run_dir, "checkpoints")
    meta = {"experiment": repr(exp), "tokenizer": exp.tokenizer}
    if mesh.rank == 0:
        for path in checkpoint.incomplete_checkpoints(root):
            progress.message(f"evo: skipping incomplete checkpoint {path} (removed)")
            shutil.rmtree(path, ignore_errors=True)
    done = checkpoint.complete_checkpoints(root)
    if not done:
        params = _initial_params(exp, mesh, device)
        return planner.init_state(exp.model, opt, params, mesh), None, meta
    path = done[-1][1]
    meta["resumed_with_changes"] = _accepted_changes(exp, path, progress)
    state, loader_state = checkpoint.load_state(path, exp.model, opt, mesh, device=device)
    loader.load_state_dict(loader_state)
    progress.message(f"evo: resuming from {path} (step {int(state.step)})")
    return state, int(state.step), meta


def _accepted_changes(exp: Experiment, path: str, progress) -> list[dict]:
    """The model-config changes since the checkpoint ``path`` (refused unless
    ``resume_with_changes``), appended to those its run already accepted."""
    index = checkpoint.read_index(path)
    checkpoint.check_model(index, exp.model, path)  # a change of shape cannot be resumed at all
    history = list((index.get("meta") or {}).get("resumed_with_changes") or [])
    changes = checkpoint.model_changes(index, exp.model)
    if changes and not exp.resume_with_changes:
        field, (saved, now) = next(iter(changes.items()))
        more = f" (and {', '.join(f'model.{k}' for k in list(changes)[1:])})" \
            if len(changes) > 1 else ""
        raise checkpoint.CheckpointError(
            f"{path} was saved with model.{field}={saved!r}, this run has model.{field}="
            f"{now!r}{more}: resuming would continue another function. Set it back, use another "
            f"run_dir, or resume anyway with --set resume_with_changes=true (recorded in the "
            f"checkpoints' meta)")
    step = int(index["scalars"]["step"])
    for field, (saved, now) in changes.items():
        progress.message(f"evo: resuming step {step} with model.{field} changed from {saved!r} "
                         f"to {now!r} (resume_with_changes)")
        history.append({"step": step, "field": f"model.{field}", "saved": saved, "now": now})
    return history


def _open_run(exp: Experiment, mesh, device, loader, progress, first: int, meta: dict) -> _Run:
    """The step, the saver, the validation sets and the writers of a run starting at ``first``."""
    plan, lead = mesh.plan, mesh.rank == 0
    step_fn = shard(train.Step(exp.model, exp.optimizer.with_total_steps(exp.steps),
                               compute_dtype=_dtype(exp.compute_dtype), remat=exp.remat,
                               attention=exp.attention, donate=True,
                               sources=len(loader.sources) if len(loader.sources) > 1 else 0,
                               compile=exp.compile, kernels=exp.kernels,
                               loss_scale=exp.loss_scale), plan, mesh)
    saver = checkpoint.Saver(os.path.join(exp.run_dir, "checkpoints"), mesh,
                             keep_last=exp.keep_last, keep_every=exp.keep_every,
                             asynchronous=exp.async_checkpoint)
    valid = {}
    if exp.data.valid_folder:
        valid = {name: list(b)[:exp.eval_batches] for name, b in data.eval_batches(
            exp.data.valid_folder, seq_len=exp.data.seq_len, micro_batch=exp.data.micro_batch,
            vocab_size=exp.model.vocab_size, max_batches=exp.eval_batches).items()}
    metrics_path = os.path.join(exp.run_dir, "metrics.jsonl")
    eval_path = os.path.join(exp.run_dir, "eval.jsonl")
    if lead:
        for path in (metrics_path, eval_path):
            _keep_records(path, first)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    speed = monitor.Throughput(
        models.flops_per_token(exp.model, exp.data.seq_len),
        exp.peak_tflops or monitor.peak_tflops(device_name), devices=plan.world_size)
    n_params = models.num_params(exp.model)
    progress.message(f"evo: {exp.steps} steps of {n_params / 1e6:.2f}M params on "
                     f"{plan.world_size} × {device_name or device.type}, plan {plan}")
    return _Run(
        exp, mesh, device, loader, step_fn, saver, valid, _text_bytes(exp, valid), meta, progress,
        metrics_out=monitor.JsonlWriter(metrics_path, append=True) if lead else None,
        eval_out=monitor.JsonlWriter(eval_path, append=True) if lead else None,
        board=monitor.TensorBoardWriter(os.path.join(exp.run_dir, "tensorboard"),
                                        purge_step=first + 1) if lead and exp.tensorboard else None,
        alerts=monitor.Alerts(os.path.join(exp.run_dir, "alerts.jsonl") if lead else None,
                              webhook=exp.alert_webhook if lead else None,
                              log=progress.message, run_dir=exp.run_dir),
        speed=speed,
        profiler=monitor.Profiler(exp.profile_steps(), os.path.join(exp.run_dir, "profile"),
                                  rank=mesh.rank, device=device, log=progress.message))


@contextlib.contextmanager
def _sigterm_flag():
    """A list that gains an element when SIGTERM arrives (handled in the main thread only)."""
    terminated: list[bool] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: terminated.append(True)) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        yield terminated
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _loop(r: _Run, state: train.TrainState, terminated: list) -> tuple[train.TrainState,
                                                                      str | None]:
    """Steps from the state's step to ``exp.steps`` with evaluations and saves; returns the
    final state and what stopped the run early (None: it ran to the end)."""
    exp, first = r.exp, int(state.step)
    if r.valid and first == 0:
        r.evals[0] = _evaluate(r, state, 0)
    for i in range(first, exp.steps):
        r.saver.check()  # a failed asynchronous save stops the run at the next step
        r.profiler.before(i + 1)
        state, record = _one_step(r, state, i + 1)
        _report(r, record)
        r.profiler.after(i + 1)
        if r.valid and exp.eval_every and (i + 1) % exp.eval_every == 0:
            r.evals[i + 1] = _evaluate(r, state, i + 1)
        stopped = _maybe_save(r, state, i + 1, terminated)
        if stopped is not None:
            return state, stopped
    if r.valid and exp.steps not in r.evals and first < exp.steps:
        r.evals[exp.steps] = _evaluate(r, state, exp.steps)
    return state, None


def _one_step(r: _Run, state: train.TrainState, step: int) -> tuple[train.TrainState, dict]:
    """One optimizer step on the next batch, and its metrics record."""
    t0 = time.perf_counter()
    batch = _to(next(r.loader), r.device)
    t1 = time.perf_counter()
    state, m = r.step_fn(state, batch)
    comm_bytes, times = m.pop("comm_bytes"), m.pop("time")
    m.pop("comm_calls", None)   # how many collectives (evo sweep compares them with the model)
    expert_traffic = m.pop("expert_traffic", None)   # under plan.ep: the rows dispatched
    m.pop("pp_seconds", None)   # a pipeline rank's per-action compute seconds (benchmarks)
    per_source = {}
    if "source_tokens" in m:
        sums, counts = m.pop("source_loss_sum").tolist(), m.pop("source_tokens").tolist()
        names = r.loader.sources
        per_source = {"source_loss": {name: sums[j] / counts[j] for j, name in enumerate(names)
                                      if counts[j] > 0},
                      "source_tokens": {name: int(counts[j]) for j, name in enumerate(names)
                                        if counts[j] > 0}}
    experts = {"moe": monitor.expert_record(
        m.pop("expert_load").tolist(), list(r.exp.model.moe_layers),
        m.pop("dropped_tokens").item(), m.pop("aux_loss").item())} if "expert_load" in m else {}
    m = {k: v.item() for k, v in m.items()}
    t2 = time.perf_counter()
    record = {"step": step, "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
              "tokens": step * int(m["tokens"]),  # every step has the same shape
              **r.speed.rate(int(m["tokens"]), t2 - t0), "step_time": t2 - t1,
              "time": {"data": t1 - t0, **times},
              **monitor.memory_stats(r.device),
              "skipped": int(state.opt_state.skipped), "comm_bytes": comm_bytes}
    if "loss_scale" in m:
        record["loss_scale"] = m["loss_scale"]
    if expert_traffic is not None:
        record["expert_traffic"] = expert_traffic
    if "pp_idle" in m:  # the pipeline's measured idle fraction
        record["pp_idle"] = m["pp_idle"]
    record.update(per_source)
    record.update(experts)
    return state, record


class RunWriteError(ValueError):
    """A file of the run directory could not be written (a full disk, a permission)."""


def _report(r: _Run, record: dict) -> None:
    if r.lead:
        try:
            r.metrics_out.write(record)
        except OSError as e:
            r.saver.wait()  # a save that filled the disk is the likelier culprit: its error first
            raise RunWriteError(f"{r.metrics_out.path} could not be written ({e.strerror or e}); "
                                f"it holds the records up to step {record['step'] - 1}") from None
        if r.board:
            r.board.write(record)
    r.alerts.check(record)
    r.progress.update(record)
    r.last_record = record


def _maybe_save(r: _Run, state: train.TrainState, step: int, terminated: list) -> str | None:
    """Save when SIGTERM, the stop file or ``checkpoint_every`` asks; returns what stopped the
    run (None: go on)."""
    exp = r.exp
    stop = _stop_request(exp.run_dir)
    if terminated or abs(stop) == step:
        _save(r, state)
        if not terminated and stop < 0:
            return None
        stopped = "SIGTERM" if terminated else f"the stop file ({stop})"
        if terminated:
            r.alerts.raise_("sigterm", step, f"SIGTERM at step {step}: saved a checkpoint and "
                                             f"stopped")
        r.progress.message(f"evo: saved step {step} and stopped, as asked by {stopped}")
        return stopped
    if exp.checkpoint_every and (step % exp.checkpoint_every == 0 or step == exp.steps):
        _save(r, state)
    return None


def _save(r: _Run, state: train.TrainState) -> None:
    r.saver.save(r.exp.model, state, loader_state=r.loader.state_dict(), meta=r.meta)
    r.saved_step = int(state.step)


def _evaluate(r: _Run, state: train.TrainState, step: int) -> dict:
    """Loss, perplexity and accuracy on every validation set, written and printed."""
    params = planner.gather_params(r.exp.model, state.params, r.mesh)
    results = evaluate_sets(r.exp, params, r.valid, r.device, r.text_bytes)
    for name, res in results.items():
        if r.lead:
            r.eval_out.write({"step": step, "set": name, **res})
            if r.board:
                r.board.write({"step": step, **res}, group=f"eval/{name}")
        bpb = f"  {res['bits_per_byte']:.3f} bits/byte" if "bits_per_byte" in res else ""
        r.progress.message(f"eval step {step} [{name}]  loss {res['loss']:.4f}{bpb}  "
                           f"ppl {res['perplexity']:.2f}  acc {res['accuracy']:.3f}")
    return results


def _final_sample(r: _Run, state: train.TrainState) -> str | None:
    """The sampled continuation of ``sample_prompt`` (rank 0; None elsewhere)."""
    exp = r.exp
    params = planner.gather_params(exp.model, state.params, r.mesh)  # a collective: every rank
    if not r.lead:
        return None
    tok = data.load_tokenizer(exp.tokenizer)
    new = generate.sample(exp.model, params, tok.encode(exp.sample_prompt), exp.sample_tokens,
                          temperature=exp.sample_temperature, seed=exp.seed,
                          stop_token=tok.eos_id)
    text = exp.sample_prompt + tok.decode(new)
    r.progress.message("sample:\n" + text)
    return text
