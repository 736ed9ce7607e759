"""The training loop: experiment → state → steps → metrics. No argument parsing (that is cli.py)."""
from __future__ import annotations

import math
import os
import sys
from typing import IO

import torch

from evo import data, generate, monitor, train, tree
from evo.config import ConfigError, Experiment
from evo.models import llama


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


def run(exp: Experiment, *, device: str | None = None, stream: IO[str] | None = None) -> dict:
    """Train ``exp`` and return a summary: final metrics, evaluations, and the sample if asked."""
    stream = stream or sys.stderr
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = exp.plan.resolve(world)
    if world > 1:
        raise ConfigError(f"this run has {world} processes, but distributing a step over several "
                          "processes needs the sharding planner, which evo does not have yet; "
                          "run with one process")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opt = exp.optimizer.with_total_steps(exp.steps)
    params = llama.init(exp.model, seed=exp.seed, device=device)
    state = train.init_state(params, opt)
    step_fn = train.Step(exp.model, opt, compute_dtype=_dtype(exp.compute_dtype), remat=exp.remat,
                         attention=exp.attention, donate=True)
    loader = data.Loader(exp.data, vocab_size=exp.model.vocab_size, dp_rank=0, dp_size=plan.dp)
    valid = {}
    if exp.data.valid_folder:
        valid = {name: list(b)[:exp.eval_batches] for name, b in data.eval_batches(
            exp.data.valid_folder, seq_len=exp.data.seq_len, micro_batch=exp.data.micro_batch,
            vocab_size=exp.model.vocab_size, max_batches=exp.eval_batches).items()}

    os.makedirs(exp.run_dir, exist_ok=True)
    metrics_out = monitor.JsonlWriter(os.path.join(exp.run_dir, "metrics.jsonl"))
    eval_out = monitor.JsonlWriter(os.path.join(exp.run_dir, "eval.jsonl"))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    speed = monitor.Throughput(
        monitor.flops_per_token(non_embedding_params(exp.model), exp.model.num_layers,
                                exp.model.hidden_size, exp.data.seq_len),
        monitor.peak_tflops(device_name))
    progress = monitor.Progress(exp.steps, every=exp.log_every, stream=stream)
    progress.message(f"evo: {exp.steps} steps of {tree.num_elements(params) / 1e6:.2f}M params "
                     f"on {device_name or device.type}, plan {plan}")

    def run_eval(step: int) -> dict:
        results = evaluate_sets(exp, state.params, valid, device)
        for name, r in results.items():
            eval_out.write({"step": step, "set": name, **r})
            progress.message(f"eval step {step} [{name}]  loss {r['loss']:.4f}  "
                             f"ppl {r['perplexity']:.2f}  acc {r['accuracy']:.3f}")
        return results

    evals = {0: run_eval(0)} if valid else {}
    tokens_seen, record = 0, {}
    try:
        for i in range(exp.steps):
            batch = _to(next(loader), device)
            state, m = step_fn(state, batch)
            m = {k: v.item() for k, v in m.items()}
            tokens_seen += int(m["tokens"])
            record = {"step": i + 1, "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                      "tokens": tokens_seen, **speed.tick(int(m["tokens"])),
                      "skipped": int(state.opt_state.skipped)}
            metrics_out.write(record)
            progress.update(record)
            if valid and exp.eval_every and (i + 1) % exp.eval_every == 0:
                evals[i + 1] = run_eval(i + 1)
        if valid and exp.steps not in evals:
            evals[exp.steps] = run_eval(exp.steps)
    finally:
        metrics_out.close()
        eval_out.close()

    summary = {"final": record, "eval": evals, "plan": plan}
    if exp.sample_prompt is not None:
        tok = data.load_tokenizer(exp.tokenizer)
        new = generate.sample(exp.model, state.params, tok.encode(exp.sample_prompt),
                              exp.sample_tokens, temperature=exp.sample_temperature,
                              seed=exp.seed, stop_token=tok.eos_id)
        summary["sample"] = exp.sample_prompt + tok.decode(new)
        progress.message("sample:\n" + summary["sample"])
    return summary
