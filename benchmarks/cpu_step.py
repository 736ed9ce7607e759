"""One full training step on CPU: evo's ``train.Step`` against HF transformers, side by side.

Both sides start from the same weights and train on the same synthetic tokens:

- HF: ``LlamaForCausalLM`` (sdpa attention), forward with labels, backward,
  ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` step (foreach; weight decay on matrices only, as
  evo's default mask), ``zero_grad``;
- evo: ``train.Step(model=cfg, optimizer=optim.adamw(...), donate=True)``.

After warm-up the two are timed in alternation (so machine noise hits both alike) and the median
step is reported. A script, not a test: it prints a table and the evo/HF ratio (target <= 1.05).

    python benchmarks/cpu_step.py                       # hidden 256, 4 layers, b4 x s256
    python benchmarks/cpu_step.py --batch 2 --seq 512 --steps 20 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from evo import hf, optim, train
from evo.models import llama


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def hf_side(cfg: llama.Config, params: dict[str, torch.Tensor], tokens: torch.Tensor):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(**hf.config_to_hf(cfg), attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(conf).float().train()
    model.load_state_dict(llama.LLAMA.to_hf(cfg, params), strict=True)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, foreach=True)

    def step() -> float:
        loss = model(input_ids=tokens, labels=tokens).loss   # transformers shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def evo_side(cfg: llama.Config, params: dict[str, torch.Tensor], tokens: torch.Tensor):
    opt = optim.adamw(lr=1e-4, weight_decay=0.1, clip_norm=1.0)
    step_fn = train.Step(model=cfg, optimizer=opt, donate=True)
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], train.IGNORE)], dim=1)
    batch = {"tokens": tokens[None], "labels": labels[None]}    # micro_num = 1, [1, batch, seq]
    box = [train.init_state({k: v.clone() for k, v in params.items()}, opt)]

    def step() -> float:
        box[0], metrics = step_fn(box[0], batch)                 # donated: old state not reused
        return metrics["loss"].item()

    return step


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = llama.Config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=args.heads, num_kv_heads=args.kv_heads,
                       intermediate_size=args.ffn, max_seq_len=max(args.seq, 2048))
    params = llama.init(cfg, seed=args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq),
                           generator=torch.Generator().manual_seed(args.seed))
    sides = {"HF LlamaForCausalLM (sdpa) + torch AdamW": hf_side(cfg, params, tokens),
             "evo train.Step(donate=True)": evo_side(cfg, params, tokens)}

    first_loss = {name: step() for name, step in sides.items()}   # also the first warm-up step
    for _ in range(args.warmup - 1):
        for step in sides.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.steps):
        for name, step in sides.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    n_tokens = args.batch * args.seq
    n_params = sum(t.numel() for t in params.values())
    print(f"LLaMA hidden={cfg.hidden_size} layers={cfg.num_layers} heads={cfg.num_heads} "
          f"kv_heads={cfg.kv_heads} ffn={cfg.intermediate_size} vocab={cfg.vocab_size} "
          f"({n_params / 1e6:.1f}M params), batch {args.batch} x seq {args.seq} = {n_tokens} "
          f"tokens/step, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"median of {args.steps} steps after {args.warmup} warm-up steps, timed alternately\n")
    header = f"{'implementation':<42} {'step ms':>9} {'min ms':>9} {'tokens/s':>10} {'loss@1':>8}"
    print(header)
    print("-" * len(header))
    medians = {}
    for name, ts in times.items():
        medians[name] = statistics.median(ts)
        print(f"{name:<42} {medians[name] * 1e3:>9.1f} {min(ts) * 1e3:>9.1f} "
              f"{n_tokens / medians[name]:>10.0f} {first_loss[name]:>8.4f}")
    hf_ms, evo_ms = medians.values()
    print(f"\nevo / HF step time: {evo_ms / hf_ms:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
