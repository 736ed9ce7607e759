"""``evo calibrate --out PROFILE.json``: measure this machine into a profile (``evo.sharding.cost``).

Runs ``--nproc`` processes under torchrun (gloo on a CPU, NCCL on GPUs), one thread each, all
measuring at once — so each number is what one rank of a sweep at that world size gets:

- dense matmul TFLOP/s per dtype (square matmuls);
- a transformer layer's forward + backward at four token counts, less its causal SDPA forward
  + backward and its norms and residual adds (``norm_ns_per_value``) timed alone: the fit
  ``t = overhead + matmul flops / (peak · efficiency)`` gives ``block_overhead_us`` and
  ``compute_efficiency``; the SDPA's own fit over the same counts ``attention_efficiency`` and
  ``attention_overhead_us``;
- the loss's cross-entropy over 1024 × 4096 logits, forward + backward (``logit_ns_per_value``);
- evo's AdamW update per parameter; memory bandwidth (a large copy); memory per rank;
- the share of a collective hidden behind a layer pass when launched before it (``overlap``);
- every collective kind (all-reduce, all-gather, reduce-scatter, Ulysses' all-to-all, ring
  attention's shift as ``send_recv``) over every group size the processes form (2, 4, ... up to
  ``--nproc``, the groups of a size all running at once), at several sizes, each call after a
  little compute as in a step (``_spaced``: 1 ms and 10 ms): a least-squares fit of
  ``t = latency + bytes / bandwidth`` per kind, size and gap, and the mean of a kind's two
  lines as its fit (``collectives``).

Rank 0 writes the profile; ``sources`` says that each value was measured here, when, and how.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

SIZES = (1 << 12, 1 << 17, 1 << 20, 1 << 22)    # bytes handed to a collective
LOGITS = (1024, 4096)                           # tokens × vocabulary the loss is timed over
GAPS = (1e-3, 10e-3)       # seconds of compute before each timed collective (``collectives``)
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def _counted(fn, calls: int, repeat: int = 3) -> float:
    """The median seconds of one call of ``fn`` over ``repeat`` samples of ``calls`` calls: a
    fixed count, so that every member of a collective makes the same calls."""
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def _spaced(fn, calls: int, gap: float = 10e-3) -> float:
    """The mean seconds of one call of ``fn`` over ``calls`` calls, each after ``gap`` seconds of
    compute (a layer's worth), the slowest and fastest tenth left out: a step launches its
    collectives between kernels, when the peers' communication threads sleep — back to back,
    as in a tight loop, they stay awake and a small collective's latency is a third or less
    (measured here, medians of a 4 KiB all-gather of two processes: 0.2-0.9 ms back to back,
    1.0 ms after 2 ms of compute, 1.7 ms after 10, 2.9 ms after 20). A mean, not a median: a
    step's collectives add up. A fixed count, so that every member makes the same calls."""
    fn()
    a = torch.randn(128, 128)
    samples = []
    for _ in range(calls):
        end = time.perf_counter() + gap
        while time.perf_counter() < end:
            a @ a
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    k = calls // 10
    return statistics.mean(samples[k:calls - k])


def _timed(fn, min_seconds: float = 0.2, repeat: int = 5) -> float:
    """The seconds of one call of ``fn``: the least of ``repeat`` samples, each looping for
    ``min_seconds`` — what the code costs here when nothing else took the core (a shared
    machine's neighbours slow a sample by a fifth to a half at times; their median swung the
    layer fit's overhead between 0 and 2.6 ms from one calibration to the next)."""
    fn()
    samples = []
    for _ in range(repeat):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        samples.append(elapsed / n)
    return min(samples)


def matmul_tflops(dtype: torch.dtype, n: int = 512) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / _timed(lambda: a @ b) / 1e12


def _layer_seconds(cfg, tokens: int, dtype: torch.dtype) -> float:
    """One LLaMA layer's forward + backward over ``tokens`` tokens (one sequence)."""
    return _timed(_layer_pass(cfg, tokens, dtype), 0.3)


def _layer_pass(cfg, tokens: int, dtype: torch.dtype):
    """A function running one LLaMA layer's forward + backward over ``tokens`` tokens."""
    from evo import models
    from evo.models.layers import Regions
    fam = models.family_of(cfg)
    params = {k: v.to(dtype).requires_grad_(True) for k, v in models.init(cfg, 0).items()
              if k.startswith("layers.0.")}
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=dtype, requires_grad=True)
    pos = torch.arange(tokens)[None]
    from evo.models.family import Attend, ops  # what a training step uses
    ctx = fam.context(cfg, pos, dtype, Attend(None, "auto"), ops("torch"))

    def run():
        y = fam.block(cfg, params, 0, x, ctx, Regions())
        y.float().sum().backward()
    return run


def overlap(world: int, calls: int = 12) -> float:
    """The share of a collective hidden behind compute when it is launched before a layer pass
    and awaited after it (as bucketed reductions and ZeRO-3's prefetched gathers are):
    ``(t(layer) + t(all-reduce) − t(both)) / t(all-reduce)`` in [0, 1], medians of loops run by
    every rank at once (a 4 MiB all-reduce of the whole world). 0 for one process."""
    if world == 1:
        return 0.0
    from evo.sharding import comm as C
    layer = _layer_pass(_reference_config(), 128, torch.float32)
    comm = C.Comm({"g": dist.group.WORLD}, {"g": world}, C.CommLog())
    x = torch.ones(1 << 20)
    reduce = lambda: C.wait(C.launch_all_reduce(comm, x, "g"))  # noqa: E731

    def both():
        pending = C.launch_all_reduce(comm, x, "g")
        layer()
        C.wait(pending)
    samples = []
    for _ in range(3):
        t = []
        for fn in (layer, reduce, both):
            dist.barrier()
            t.append(_counted(fn, calls, 1))
        samples.append(min(1.0, max(0.0, (t[0] + t[1] - t[2]) / t[1])))
    return statistics.median(samples)


def _reference_config():
    """The LLaMA layer the compute fit and the overlap are measured on."""
    from evo import models
    return models.get(models.REFERENCE_FAMILY).config(
        vocab_size=256, hidden_size=256, num_layers=1, num_heads=8, intermediate_size=688,
        max_seq_len=1024)


def compute_fit(tflops: float, dtype: torch.dtype) -> dict:
    """(overhead per block pass, efficiency) from a reference layer at four token counts (128
    to 1024: ``_fit``'s least squares in relative error of ``t = overhead + flops / rate``) less
    its attention (causal SDPA over the same tokens, timed alone) and its norms and residual
    adds (timed alone: ``norm_ns_per_value``, their seconds over the four counts' values) — the
    cost model charges a plan's matmuls at ``compute_efficiency``, its norms per value where the
    sequence splits (not under tensor parallelism alone), and its attention, a quarter of the
    layer's flops at 1024 tokens and a twenty-fifth at 128, as the SDPA's own fit over the four
    counts: ``attention_overhead_us`` per call and causal flops at ``attention_efficiency``;
    ``logit_ns_per_value``: the loss over the head's logits (``_logit_seconds``) per logit;
    ``peak_tflops``: ``tflops``, or the fastest of the rates where one beat it (the short matmul
    timing was disturbed) — the efficiencies are fractions of it, so that none is clipped at 1
    and every rate survives as measured."""
    cfg = _reference_config()
    h, f = cfg.hidden_size, cfg.intermediate_size
    matmuls = lambda s: 6 * s * (4 * h * h + 3 * h * f)  # noqa: E731
    attention = lambda s: 3 * 4 * s * s * h / 2          # noqa: E731  fwd 4·s²·h, bwd twice
    attn = {s: _attention_seconds(s, dtype) for s in (128, 256, 512, 1024)}
    norms = {s: _norm_seconds(s, h, dtype) for s in attn}
    fit = _fit([(matmuls(s), _layer_seconds(cfg, s, dtype) - attn[s] - norms[s])
                for s in attn])
    rate, overhead = fit["bandwidth_gbs"] * 1e9, fit["latency_us"] * 1e-6
    attn_fit = _fit([(attention(s), attn[s]) for s in attn])
    attn_rate = attn_fit["bandwidth_gbs"] * 1e9
    rows, seq = 4, 256
    ctx_rate = 3 * 4 * rows * seq * seq * 256 / 2 / _timed(_context_attention(rows, seq, dtype))
    peak = max(tflops * 1e12, rate, attn_rate, ctx_rate)
    return {"compute_efficiency": rate / peak,
            "block_overhead_us": overhead / 3 * 1e6,   # forward + backward ≈ three passes
            "attention_efficiency": attn_rate / peak,
            "attention_overhead_us": attn_fit["latency_us"],
            "context_attention_efficiency": ctx_rate / peak,
            "norm_ns_per_value": sum(norms.values()) / sum(s * h for s in norms) * 1e9,
            "logit_ns_per_value": _logit_seconds(LOGITS[0], LOGITS[1], dtype)
            / (LOGITS[0] * LOGITS[1]) * 1e9,
            "peak_tflops": peak / 1e12}


def _attention_seconds(tokens: int, dtype: torch.dtype) -> float:
    """Causal SDPA forward + backward over ``tokens`` tokens of the reference layer's 8 heads of
    32 (one sequence)."""
    q = torch.randn(1, 8, tokens, 32, dtype=dtype, requires_grad=True)

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    return _timed(sdpa)


def _norm_seconds(tokens: int, hidden: int, dtype: torch.dtype) -> float:
    """A layer's two RMSNorms (the torch ops a training step runs) and two residual adds,
    forward + backward, over ``tokens`` tokens of ``hidden`` values."""
    from evo.models.layers import rms_norm
    x = torch.randn(1, tokens, hidden, dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, dtype=dtype, requires_grad=True)

    def run():
        y = x
        for _ in range(2):
            y = y + rms_norm(y, w, 1e-5)
        y.float().sum().backward()
    return _timed(run)


def _logit_seconds(tokens: int, vocab: int, dtype: torch.dtype) -> float:
    """The loss over ``tokens`` tokens' logits of a ``vocab``-entry head (evo's cross-entropy:
    fp32 log-softmax and the labels' entries), forward + backward."""
    from evo.models.layers import cross_entropy_sum
    x = torch.randn(tokens, vocab, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))

    def run():
        cross_entropy_sum(x, labels)[0].backward()
    return _timed(run)


def _context_attention(rows: int, seq: int, dtype: torch.dtype):
    """What a rank of Ulysses or ring attention runs per layer (``context._Ring`` over one block):
    causal attention with its log-sum-exp forward (``attention_lse``), then the gradients from the
    recomputed probabilities (``lse_grads``), 8 heads of 32 over 4 kv heads."""
    from evo_kernels.attention import Span, attention_lse, lse_grads
    q = torch.randn(rows, seq, 8, 32, dtype=dtype)
    k, v = torch.randn(rows, seq, 4, 32, dtype=dtype), torch.randn(rows, seq, 4, 32, dtype=dtype)
    idx = torch.arange(seq)
    span = Span(idx, torch.zeros(1, seq, dtype=torch.long), idx)

    def run():
        out, lse = attention_lse(q, k, v, span)
        g = torch.ones(out.shape, dtype=lse.dtype)
        lse_grads(q, k, v, span, lse, g, (g * out.to(lse.dtype)).sum(-1))
    return run


def optimizer_ns(n: int = 1 << 21) -> float:
    from evo import optim
    opt = optim.adamw(lr=1e-3, weight_decay=0.1)
    params = {"w": torch.randn(n)}
    grads = {"w": torch.randn(n)}
    state = opt.init(params)
    step = torch.zeros((), dtype=torch.int64)
    return _timed(lambda: opt.update(grads, state, params, step, inplace=True)) / n * 1e9


def memory_gbs(n: int = 1 << 24) -> float:
    a, b = torch.randn(n), torch.empty(n)
    return 2 * a.numel() * 4 / _timed(lambda: b.copy_(a)) / 1e9


def _collective(kind: str, nbytes: int, group, size: int):
    """One collective through the calls a sharded step makes (``evo.sharding.comm.Comm``;
    Ulysses' all-to-all; ring attention's shift to the next rank, as ``send_recv``)."""
    from evo.sharding import comm as C
    from evo.sharding import context
    comm = C.Comm({"g": group}, {"g": size}, C.CommLog())
    x = torch.ones(max(size, nbytes // 4 // size * size))
    if kind == "all_reduce":
        return lambda: comm.all_reduce(x, "g")
    if kind == "all_gather":
        return lambda: comm.all_gather(x, "g")
    if kind == "all_to_all":
        return lambda: context._all_to_all(x, comm, "g")
    if kind == "send_recv":
        return lambda: context.wait_shift(context.launch_shift(comm, x, "g"))
    return lambda: comm.reduce_scatter(x, "g")


def _fit(points: list[tuple[int, float]]) -> dict:
    """Least squares of seconds = latency + bytes / bandwidth in relative error (each point
    weighted by 1 / t²): in plain least squares the largest size's seconds drown the smallest
    ones', and with them the latency."""
    w = [1 / max(t, 1e-12) ** 2 for _, t in points]
    sw = sum(w)
    mx = sum(wi * b for wi, (b, _) in zip(w, points)) / sw
    my = sum(wi * t for wi, (_, t) in zip(w, points)) / sw
    slope = sum(wi * (b - mx) * (t - my) for wi, (b, t) in zip(w, points)) / \
        sum(wi * (b - mx) ** 2 for wi, (b, _) in zip(w, points))
    slope = max(slope, 1e-15)
    return {"bandwidth_gbs": 1 / slope / 1e9, "latency_us": max(0.0, my - slope * mx) * 1e6}


def _mean_line(fits: list[dict]) -> dict:
    """The mean of ``seconds = latency + bytes / bandwidth`` lines: their mean latency and mean
    seconds per byte."""
    return {"bandwidth_gbs": len(fits) / sum(1 / f["bandwidth_gbs"] for f in fits),
            "latency_us": sum(f["latency_us"] for f in fits) / len(fits)}


def collectives(world: int, rank: int) -> dict:
    """Fits per kind and group size, after 1 ms and after 10 ms of compute (``GAPS``), and the
    mean of the two lines, which the cost model charges: a step's collectives come anywhere
    between — ZeRO-3's per-parameter gathers and reduce-scatters and tensor parallelism's region
    crossings a millisecond or two apart, a layer's pass before an attention's or MLP's exit —
    and a collective's latency rises with the compute before it (``_spaced``); timed inside the
    steps of the CPU sweep, their calls cost 0.5-0.9 of the fit after 10 ms. The groups of one
    size (consecutive ranks) run at once."""
    out = {k: {} for k in KINDS}
    size = 2
    while size <= world:
        groups = [dist.new_group(list(range(s, s + size))) for s in range(0, world, size)]
        group = groups[rank // size] if rank < world // size * size else None
        for kind in KINDS:
            points = {gap: [] for gap in GAPS}
            for nbytes in SIZES:
                dist.barrier()
                if group is not None:
                    calls = 20 if nbytes < 1 << 20 else 10
                    for gap in GAPS:
                        t = _spaced(_collective(kind, nbytes, group, size), calls, gap)
                        points[gap].append((nbytes, t))
            if group is not None:
                fits = {gap: _fit(p) for gap, p in points.items()}
                out[kind][str(size)] = {**_mean_line(list(fits.values())),
                                        **{f"after_{gap * 1e3:g}ms": f for gap, f in fits.items()}}
        size *= 2
    return out


def measure(world: int, rank: int) -> dict:
    """Every measurement of this process (each rank measures while the others do the same)."""
    dist.barrier()
    tflops = {name: matmul_tflops(getattr(torch, name)) for name in ("float32", "bfloat16")}
    dist.barrier()
    fit = compute_fit(tflops["float32"], torch.float32)
    tflops["float32"] = fit.pop("peak_tflops")
    dist.barrier()
    opt, bw = optimizer_ns(), memory_gbs()
    coll = collectives(world, rank)
    return {"tflops": tflops, "fit": fit, "optimizer_ns": opt, "memory_gbs": bw,
            "collectives": coll, "overlap": overlap(world)}


def profile(m: dict, world: int) -> dict:
    """The profile JSON of rank 0's measurements."""
    now = datetime.datetime.now().isoformat(timespec="seconds")
    where = f"measured by evo calibrate on {platform.node()} at {now}, {world} processes at once"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    largest = str(max(int(s) for s in m["collectives"]["all_reduce"]) if world > 1 else 1)
    fit = m["collectives"]["all_reduce"].get(largest, {"bandwidth_gbs": 1.0, "latency_us": 0.0})
    ar = {k: fit[k] for k in ("bandwidth_gbs", "latency_us")}
    d = {"name": f"{platform.node()} ({platform.processor() or platform.machine()}, "
                 f"{world} processes)",
         "device": {"name": platform.processor() or platform.machine(),
                    "matmul_tflops": m["tflops"], **m["fit"],
                    "optimizer_ns_per_param": m["optimizer_ns"], "memory_gib": total / world,
                    "memory_bandwidth_gbs": m["memory_gbs"], "memory_overhead": 0.0},
         "cluster": {"devices_per_node": world, "intra_node": dict(ar), "inter_node": dict(ar),
                     "overlap": m["overlap"],
                     "collectives": m["collectives"]},
         "sources": {"device.matmul_tflops": f"{where}: 512x512 matmuls",
                     "device.compute_efficiency": f"{where}: a LLaMA layer (h=256) fwd+bwd at "
                                                  "128, 256, 512 and 1024 tokens less its "
                                                  "attention, fitted",
                     "device.block_overhead_us": f"{where}: the same fit's intercept",
                     "device.attention_efficiency": f"{where}: causal SDPA fwd+bwd at 128, "
                                                    "256, 512 and 1024 tokens, fitted (causal "
                                                    "flops)",
                     "device.attention_overhead_us": f"{where}: the same fit's intercept",
                     "device.logit_ns_per_value": f"{where}: evo's cross-entropy fwd+bwd over "
                                                  f"{LOGITS[0]} × {LOGITS[1]} fp32 logits",
                     "device.norm_ns_per_value": f"{where}: two RMSNorms and two residual adds "
                                                 "fwd+bwd (h=256) at 128 to 1024 tokens",
                     "device.context_attention_efficiency":
                         f"{where}: evo's attention with log-sum-exp fwd + its gradients "
                         "(Ulysses' and ring's), 4 × 256 tokens",
                     "device.optimizer_ns_per_param": f"{where}: evo AdamW on 2M parameters",
                     "device.memory_bandwidth_gbs": f"{where}: a 64 MiB copy",
                     "device.memory_gib": "physical memory / processes",
                     "device.memory_overhead": "the sweep measures tensors (mmap'd allocations)",
                     "cluster.collectives": f"{where}: latency + bytes/bandwidth fits at "
                                            f"{', '.join(str(s) for s in SIZES)} bytes, each "
                                            "call after 1 ms (after_1ms) and after 10 ms "
                                            "(after_10ms) of compute; the mean of the two "
                                            "lines",
                     "cluster.intra_node": f"the all_reduce fit of the largest group ({largest})",
                     "cluster.inter_node": "one host: the same as intra_node",
                     "cluster.overlap": f"{where}: a 4 MiB all-reduce launched before a layer "
                                        "pass (128 tokens) and awaited after it, against both "
                                        "alone"}}
    return d


def worker(out: str) -> None:
    from evo.sweep import steady_allocator
    torch.set_num_threads(1)
    steady_allocator()        # as the sweep's timed steps run
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    world, rank = dist.get_world_size(), dist.get_rank()
    m = measure(world, rank)
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(profile(m, world), f, indent=1)
    dist.destroy_process_group()


def calibrate(out: str, nproc: int) -> dict:
    """Run the measurement under torchrun with ``nproc`` processes; write and return the profile."""
    from evo.sharding import cost
    from evo.sweep import WORKER_ENV
    env = {**os.environ, **WORKER_ENV}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", str(nproc), "-m", "evo.calibrate", out],
                       env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"evo calibrate: the measurement failed:\n{r.stderr[-3000:]}")
    return cost.load_profile(out).__dict__


if __name__ == "__main__":
    worker(sys.argv[1])
