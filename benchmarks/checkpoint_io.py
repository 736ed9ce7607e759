"""Checkpoint I/O on local disk: save and load throughput, and how long a save stalls training.

One process, CPU. A LLaMA of about `--params-m` million fp32 parameters: its TrainState (params +
two AdamW moments, 12 bytes a parameter) is saved synchronously and asynchronously and loaded back;
then a training loop of small steps runs without checkpoints (the baseline, same run), with a
synchronous save every `--every` steps, and with an asynchronous one. Prints a table.

    python benchmarks/checkpoint_io.py --params-m 100 --steps 24 --every 8
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from evo import checkpoint, optim, train
from evo.models import llama
from evo.sharding import Plan, planner
from evo.sharding.mesh import Mesh


def model_for(params_m: float) -> llama.Config:
    h, ffn, vocab = 512, 1376, 32000
    per_layer = 4 * h * h + 3 * h * ffn  # wqkv + wo (multi-head), w1 + w3 + w2
    layers = max(1, round((params_m * 1e6 - 2 * vocab * h) / per_layer))
    return llama.Config(vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=8,
                        intermediate_size=ffn)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params-m", type=float, default=100.0)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()

    cfg = model_for(args.params_m)
    mesh = Mesh(Plan().resolve(1), 0)
    opt = optim.adamw(lr=1e-4)
    state = planner.init_state(cfg, opt, planner.init_params(cfg, 0, mesh), mesh)
    n = sum(v.numel() for v in state.params.values())
    nbytes = 12 * n
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        rows = []
        for mode in ("sync", "async"):
            saver = checkpoint.Saver(os.path.join(root, mode), mesh, keep_last=1,
                                     asynchronous=mode == "async")
            t0 = time.perf_counter()
            saver.save(cfg, state, loader_state={}, meta={})
            t_return = time.perf_counter() - t0
            saver.wait()
            t_done = time.perf_counter() - t0
            rows.append((f"save ({mode})", t_done, nbytes / t_done / 1e9,
                         f"returns after {t_return * 1e3:.0f} ms", t_return))
        path = checkpoint.complete_checkpoints(os.path.join(root, "sync"))[-1][1]
        t0 = time.perf_counter()
        checkpoint.load_state(path, cfg, opt, mesh)
        dt = time.perf_counter() - t0
        rows.append(("load", dt, nbytes / dt / 1e9, ""))

        # Training with and without checkpoints: a small step on the same state.
        step = train.Step(cfg, opt, donate=True)
        tokens = torch.randint(0, cfg.vocab_size, (1, 1, 128))
        batch = {"tokens": tokens, "labels": tokens}
        loop = {}
        for mode in ("none", "sync", "async"):
            saver = checkpoint.Saver(os.path.join(root, "loop-" + mode), mesh, keep_last=1,
                                     asynchronous=mode == "async")
            s = state
            s, _ = step(s, batch)  # warm-up
            t0 = time.perf_counter()
            for i in range(args.steps):
                s, m = step(s, batch)
                float(m["loss"])
                # No save at the last step: training would not go on to overlap it, and waiting
                # for it at the end is the run finishing, not a stall of the step.
                if mode != "none" and (i + 1) % args.every == 0 and i + 1 < args.steps:
                    saver.save(cfg, s, loader_state={}, meta={})
            loop[mode] = (time.perf_counter() - t0) / args.steps
            saver.wait()
            state = s
        print(f"\ncheckpoint I/O, {n / 1e6:.0f}M params ({nbytes / 1e9:.2f} GB of state), "
              f"local disk {root}")
        print(f"{'what':<14}{'seconds':>10}{'GB/s':>8}  note")
        for what, t, gbs, note, *_ in rows:
            print(f"{what:<14}{t:>10.2f}{gbs:>8.2f}  {note}")
        print(f"\ntraining, save every {args.every} steps ({args.steps} steps):")
        print(f"{'checkpoints':<14}{'s/step':>10}{'vs none':>10}")
        for mode, t in loop.items():
            print(f"{mode:<14}{t:>10.3f}{t / loop['none'] - 1:>+10.1%}")
        stall = (loop["async"] - loop["none"]) / (loop["sync"] - loop["none"]) \
            if loop["sync"] > loop["none"] else float("nan")
        blocked = {r[0]: r[4] for r in rows if len(r) > 4}
        print(f"\nasync save: the step is blocked {blocked['save (async)'] * 1e3:.0f} ms (the "
              f"host snapshot) vs {blocked['save (sync)'] * 1e3:.0f} ms for a sync save: "
              f"{blocked['save (async)'] / blocked['save (sync)']:.1%} (target <= 10%)")
        print(f"async save slowdown of training as a fraction of the sync save's: {stall:.1%} "
              f"(the writer shares the cores with the step: {os.cpu_count()} here)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
