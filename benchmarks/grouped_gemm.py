"""Grouped expert GEMM vs the per-expert loop: time and equality, forward and forward+backward.

    python benchmarks/grouped_gemm.py                  # CPU, fp32, a few MoE-layer shapes
    python benchmarks/grouped_gemm.py --device cuda --dtype bfloat16

For each shape (tokens·top_k routed rows, hidden D, expert width F, E experts), the rows are
assigned to experts by a skewed random routing (some experts empty, some with many rows) and
``evo_kernels.grouped.grouped_mm`` runs the SwiGLU experts' three matmuls
(``evo.models.moe.swiglu_experts``) with ``backend="grouped"`` (one ``torch._grouped_mm`` call per
matmul) and with ``backend="loop"`` (the per-expert reference) in the same run. Prints a Markdown
table: median milliseconds of each, the speedup, and the largest difference of the outputs and of
the gradients relative to the largest reference value.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from evo.models.moe import swiglu_experts
from evo_kernels.grouped import grouped_supported

SHAPES = {  # name: (rows, D, F, E)
    "tiny_moe": (2048, 128, 192, 8),
    "mixtral-like/32": (4096, 512, 1792, 8),
    "qwen-moe-like/16": (4096, 256, 352, 60),
}


def counts_for(rows: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """A skewed routing: Dirichlet(0.3) shares (some experts get none), summing to ``rows``."""
    share = torch.distributions.Dirichlet(torch.full((experts,), 0.3)).sample()
    counts = torch.floor(share * rows).long()
    counts[torch.argmax(counts)] += rows - counts.sum()
    return counts


def timed(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_shape(name, rows, d, f, e, *, dtype, device, repeats) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    counts = counts_for(rows, e, gen).to(device)
    x = torch.randn(rows, d, dtype=dtype, device=device)
    w = [torch.randn(e, *s, dtype=dtype, device=device) / s[0] ** 0.5
         for s in ((d, f), (d, f), (f, d))]
    out = {"shape": name, "rows": rows, "D": d, "F": f, "E": e,
           "empty_experts": int((counts == 0).sum())}
    if not grouped_supported(x, w[0]):
        return {**out, "error": f"torch._grouped_mm does not take {dtype} on {device}"}
    results = {}
    for backend in ("grouped", "loop"):
        fn = functools.partial(swiglu_experts, *w, backend=backend)
        leaves = [t.clone().requires_grad_() for t in (x, *w)]

        def fwd_bwd(fn=fn, leaves=leaves, backend=backend):
            y = swiglu_experts(*leaves[1:], leaves[0], counts, backend)
            return y, torch.autograd.grad(y.float().square().sum(), leaves)
        fn(x, counts)   # warm-up
        fwd_bwd()
        results[backend] = {"forward_ms": timed(lambda fn=fn: fn(x, counts), repeats, device),
                            "train_ms": timed(fwd_bwd, repeats, device), "out": fwd_bwd()}
    (yg, gg), (yl, gl) = results["grouped"]["out"], results["loop"]["out"]
    rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # noqa
    return {**out, **{f"{b}_{k}": results[b][k] for b in results
                      for k in ("forward_ms", "train_ms")},
            "out_rel_diff": rel(yg, yl), "grad_rel_diff": max(rel(a, b) for a, b in zip(gg, gl))}


def table(rows: list[dict]) -> str:
    lines = ["| shape | rows×D×F×E | empty | grouped fwd ms | loop fwd ms | speedup | "
             "grouped fwd+bwd ms | loop fwd+bwd ms | speedup | out diff | grad diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dims = f"{r['rows']}×{r['D']}×{r['F']}×{r['E']}"
        if "error" in r:
            lines.append(f"| {r['shape']} | {dims} | {r['empty_experts']} | {r['error']} |")
            continue
        lines.append(
            f"| {r['shape']} | {dims} | {r['empty_experts']} | {r['grouped_forward_ms']:.2f} | "
            f"{r['loop_forward_ms']:.2f} | {r['loop_forward_ms'] / r['grouped_forward_ms']:.2f}× | "
            f"{r['grouped_train_ms']:.2f} | {r['loop_train_ms']:.2f} | "
            f"{r['loop_train_ms'] / r['grouped_train_ms']:.2f}× | {r['out_rel_diff']:.1e} | "
            f"{r['grad_rel_diff']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = [run_shape(s, *SHAPES[s], dtype=dtype, device=args.device, repeats=args.repeats)
            for s in args.shapes]
    print(f"grouped GEMM vs per-expert loop: {args.device}, {args.dtype}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
