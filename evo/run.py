"""The training loop: experiment → state → steps → metrics. No argument parsing (that is cli.py)."""
from __future__ import annotations

import datetime
import io
import math
import os
import sys
from typing import IO

import torch
import torch.distributed as dist

from evo import data, generate, monitor, train
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


def evaluate_sets(exp: Experiment, params, sets: dict[str, list], device) -> dict[str, dict]:
    """Loss, perplexity and next-token accuracy per named validation set."""
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
    return out


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


def _train(exp: Experiment, device: torch.device, stream: IO[str]) -> dict:
    mesh = build_mesh(exp.plan)
    plan, lead = mesh.plan, mesh.rank == 0
    opt = exp.optimizer.with_total_steps(exp.steps)
    state = planner.init_state(exp.model, opt,
                               planner.init_params(exp.model, exp.seed, mesh, device=device), mesh)
    step_fn = shard(train.Step(exp.model, opt, compute_dtype=_dtype(exp.compute_dtype),
                               remat=exp.remat, attention=exp.attention, donate=True), plan, mesh)
    loader = data.Loader(exp.data, vocab_size=exp.model.vocab_size, dp_rank=mesh.coords["dp"],
                         dp_size=plan.dp)
    valid = {}
    if exp.data.valid_folder:
        valid = {name: list(b)[:exp.eval_batches] for name, b in data.eval_batches(
            exp.data.valid_folder, seq_len=exp.data.seq_len, micro_batch=exp.data.micro_batch,
            vocab_size=exp.model.vocab_size, max_batches=exp.eval_batches).items()}

    os.makedirs(exp.run_dir, exist_ok=True)
    quiet = io.StringIO()
    metrics_out = monitor.JsonlWriter(os.path.join(exp.run_dir, "metrics.jsonl")) if lead else None
    eval_out = monitor.JsonlWriter(os.path.join(exp.run_dir, "eval.jsonl")) if lead else None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    speed = monitor.Throughput(
        monitor.flops_per_token(non_embedding_params(exp.model), exp.model.num_layers,
                                exp.model.hidden_size, exp.data.seq_len),
        monitor.peak_tflops(device_name), devices=plan.world_size)
    progress = monitor.Progress(exp.steps, every=exp.log_every, stream=stream if lead else quiet)
    n_params = sum(math.prod(s.shape) for s in llama.param_specs(exp.model).values())
    progress.message(f"evo: {exp.steps} steps of {n_params / 1e6:.2f}M params on "
                     f"{plan.world_size} × {device_name or device.type}, plan {plan}")

    def full_params():
        return planner.gather_params(exp.model, state.params, mesh)

    def run_eval(step: int) -> dict:
        results = evaluate_sets(exp, full_params(), valid, device)
        for name, r in results.items():
            if lead:
                eval_out.write({"step": step, "set": name, **r})
            progress.message(f"eval step {step} [{name}]  loss {r['loss']:.4f}  "
                             f"ppl {r['perplexity']:.2f}  acc {r['accuracy']:.3f}")
        return results

    evals = {0: run_eval(0)} if valid else {}
    record = {}
    tokens_seen = 0
    try:
        for i in range(exp.steps):
            batch = _to(next(loader), device)
            state, m = step_fn(state, batch)
            comm_bytes = m.pop("comm_bytes")
            m = {k: v.item() for k, v in m.items()}
            tokens_seen += int(m["tokens"])
            record = {"step": i + 1, "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                      "tokens": tokens_seen, **speed.tick(int(m["tokens"])),
                      "skipped": int(state.opt_state.skipped), "comm_bytes": comm_bytes}
            if lead:
                metrics_out.write(record)
            progress.update(record)
            if valid and exp.eval_every and (i + 1) % exp.eval_every == 0:
                evals[i + 1] = run_eval(i + 1)
        if valid and exp.steps not in evals:
            evals[exp.steps] = run_eval(exp.steps)
    finally:
        for w in (metrics_out, eval_out):
            if w is not None:
                w.close()

    summary = {"final": record, "eval": evals, "plan": plan}
    if exp.sample_prompt is not None:
        params = full_params()
        if lead:
            tok = data.load_tokenizer(exp.tokenizer)
            new = generate.sample(exp.model, params, tok.encode(exp.sample_prompt),
                                  exp.sample_tokens, temperature=exp.sample_temperature,
                                  seed=exp.seed, stop_token=tok.eos_id)
            summary["sample"] = exp.sample_prompt + tok.decode(new)
            progress.message("sample:\n" + summary["sample"])
    return summary
