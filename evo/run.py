"""The training loop: experiment → state → steps → metrics. No argument parsing (that is cli.py)."""
from __future__ import annotations

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

from evo import checkpoint, data, generate, monitor, orbax_io, train
from evo.config import Experiment
from evo.models import llama
from evo.sharding import planner, shard
from evo.sharding.mesh import build_mesh


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def non_embedding_params(cfg: llama.Config) -> int:
    """Parameters the FLOPs formula counts: all but the input embedding (the output projection
    counts, tied or not)."""
    specs = llama.param_specs(cfg)
    n = sum(math.prod(s.shape) for k, s in specs.items() if k != "embed")
    return n + (cfg.vocab_size * cfg.hidden_size if cfg.tie_embeddings else 0)


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
    cuda = torch.cuda.is_available() and device != "cpu"
    if world > 1:
        _distributed(world, "cuda" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device or (f"cuda:{local}" if cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
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
        checkpoint.check_model({"model": dataclasses.asdict(cfg)}, exp.model, exp.init_from)
        return {k: v.to(device) for k, v in planner.shard_params(exp.model, params, mesh).items()}
    return checkpoint.load_params(checkpoint.resolve(exp.init_from), exp.model, mesh,
                                  device=device)


def _train(exp: Experiment, device: torch.device, stream: IO[str]) -> dict:
    mesh = build_mesh(exp.plan)
    plan, lead = mesh.plan, mesh.rank == 0
    quiet = io.StringIO()
    progress = monitor.Progress(exp.steps, every=exp.log_every, stream=stream if lead else quiet)
    opt = exp.optimizer.with_total_steps(exp.steps)
    loader = data.Loader(exp.data, vocab_size=exp.model.vocab_size, dp_rank=mesh.coords["dp"],
                         dp_size=plan.dp)
    ckpt_root = os.path.join(exp.run_dir, "checkpoints")
    if lead:
        for path in checkpoint.incomplete_checkpoints(ckpt_root):
            progress.message(f"evo: skipping incomplete checkpoint {path} (removed)")
            shutil.rmtree(path, ignore_errors=True)
    done = checkpoint.complete_checkpoints(ckpt_root)
    if done:
        state, loader_state = checkpoint.load_state(done[-1][1], exp.model, opt, mesh,
                                                    device=device)
        loader.load_state_dict(loader_state)
        progress.message(f"evo: resuming from {done[-1][1]} (step {int(state.step)})")
    else:
        state = planner.init_state(exp.model, opt, _initial_params(exp, mesh, device), mesh)
    first = int(state.step)
    step_fn = shard(train.Step(exp.model, opt, compute_dtype=_dtype(exp.compute_dtype),
                               remat=exp.remat, attention=exp.attention, donate=True,
                               sources=len(loader.sources) if len(loader.sources) > 1 else 0,
                               compile=exp.compile, kernels=exp.kernels),
                    plan, mesh)
    saver = checkpoint.Saver(ckpt_root, mesh, keep_last=exp.keep_last,
                             keep_every=exp.keep_every, asynchronous=exp.async_checkpoint)
    valid = {}
    if exp.data.valid_folder:
        valid = {name: list(b)[:exp.eval_batches] for name, b in data.eval_batches(
            exp.data.valid_folder, seq_len=exp.data.seq_len, micro_batch=exp.data.micro_batch,
            vocab_size=exp.model.vocab_size, max_batches=exp.eval_batches).items()}

    os.makedirs(exp.run_dir, exist_ok=True)
    metrics_path = os.path.join(exp.run_dir, "metrics.jsonl")
    eval_path = os.path.join(exp.run_dir, "eval.jsonl")
    if lead:
        for path in (metrics_path, eval_path):
            _keep_records(path, first)
    metrics_out = monitor.JsonlWriter(metrics_path, append=True) if lead else None
    eval_out = monitor.JsonlWriter(eval_path, append=True) if lead else None
    board = monitor.TensorBoardWriter(os.path.join(exp.run_dir, "tensorboard"),
                                      purge_step=first + 1) \
        if lead and exp.tensorboard else None
    alerts = monitor.Alerts(os.path.join(exp.run_dir, "alerts.jsonl") if lead else None,
                            webhook=exp.alert_webhook if lead else None,
                            log=progress.message, run_dir=exp.run_dir)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    speed = monitor.Throughput(
        monitor.flops_per_token(non_embedding_params(exp.model), exp.model.num_layers,
                                exp.model.hidden_size, exp.data.seq_len),
        exp.peak_tflops or monitor.peak_tflops(device_name), devices=plan.world_size)
    n_params = sum(math.prod(s.shape) for s in llama.param_specs(exp.model).values())
    progress.message(f"evo: {exp.steps} steps of {n_params / 1e6:.2f}M params on "
                     f"{plan.world_size} × {device_name or device.type}, plan {plan}")
    profiler = monitor.Profiler(exp.profile_steps(), os.path.join(exp.run_dir, "profile"),
                                rank=mesh.rank, device=device, log=progress.message)

    def full_params():
        return planner.gather_params(exp.model, state.params, mesh)

    text_bytes = _text_bytes(exp, valid)

    def run_eval(step: int) -> dict:
        results = evaluate_sets(exp, full_params(), valid, device, text_bytes)
        for name, r in results.items():
            if lead:
                eval_out.write({"step": step, "set": name, **r})
                if board:
                    board.write({"step": step, **r}, group=f"eval/{name}")
            bpb = f"  {r['bits_per_byte']:.3f} bits/byte" if "bits_per_byte" in r else ""
            progress.message(f"eval step {step} [{name}]  loss {r['loss']:.4f}{bpb}  "
                             f"ppl {r['perplexity']:.2f}  acc {r['accuracy']:.3f}")
        return results

    def save():
        saver.save(exp.model, state, loader_state=loader.state_dict(),
                   meta={"experiment": repr(exp), "tokenizer": exp.tokenizer})

    terminated = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: terminated.append(True)) \
        if threading.current_thread() is threading.main_thread() else None
    evals = {0: run_eval(0)} if valid and first == 0 else {}
    record, stopped = {}, None
    try:
        for i in range(first, exp.steps):
            profiler.before(i + 1)
            t0 = time.perf_counter()
            batch = _to(next(loader), device)
            t1 = time.perf_counter()
            state, m = step_fn(state, batch)
            comm_bytes, times = m.pop("comm_bytes"), m.pop("time")
            per_source = {}
            if "source_tokens" in m:
                sums, counts = m.pop("source_loss_sum").tolist(), m.pop("source_tokens").tolist()
                per_source = {"source_loss": {name: sums[j] / counts[j] for j, name in
                                              enumerate(loader.sources) if counts[j] > 0},
                              "source_tokens": {name: int(counts[j]) for j, name in
                                                enumerate(loader.sources) if counts[j] > 0}}
            m = {k: v.item() for k, v in m.items()}
            t2 = time.perf_counter()
            record = {"step": i + 1, "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                      "tokens": (i + 1) * int(m["tokens"]),  # every step has the same shape
                      **speed.rate(int(m["tokens"]), t2 - t0), "step_time": t2 - t1,
                      "time": {"data": t1 - t0, **times},
                      **monitor.memory_stats(device),
                      "skipped": int(state.opt_state.skipped), "comm_bytes": comm_bytes}
            record.update(per_source)
            if lead:
                metrics_out.write(record)
                if board:
                    board.write(record)
            alerts.check(record)
            progress.update(record)
            profiler.after(i + 1)
            if valid and exp.eval_every and (i + 1) % exp.eval_every == 0:
                evals[i + 1] = run_eval(i + 1)
            stop = _stop_request(exp.run_dir)
            if terminated or abs(stop) == i + 1:
                save()
                if terminated or stop > 0:
                    stopped = "SIGTERM" if terminated else f"the stop file ({stop})"
                    if terminated:
                        alerts.raise_("sigterm", i + 1, f"SIGTERM at step {i + 1}: saved a "
                                      f"checkpoint and stopped")
                    progress.message(f"evo: saved step {i + 1} and stopped, as asked by {stopped}")
                    break
            elif exp.checkpoint_every and ((i + 1) % exp.checkpoint_every == 0
                                          or i + 1 == exp.steps):
                save()
        if valid and stopped is None and exp.steps not in evals and first < exp.steps:
            evals[exp.steps] = run_eval(exp.steps)
        saver.wait()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        profiler.close()
        alerts.close()
        progress.close()
        for w in (metrics_out, eval_out, board):
            if w is not None:
                w.close()

    summary = {"final": record, "eval": evals, "plan": plan, "stopped": stopped,
               "alerts": alerts.raised}
    if exp.sample_prompt is not None and stopped is None:
        params = full_params()
        if lead:
            tok = data.load_tokenizer(exp.tokenizer)
            new = generate.sample(exp.model, params, tok.encode(exp.sample_prompt),
                                  exp.sample_tokens, temperature=exp.sample_temperature,
                                  seed=exp.seed, stop_token=tok.eos_id)
            summary["sample"] = exp.sample_prompt + tok.decode(new)
            progress.message("sample:\n" + summary["sample"])
    return summary
