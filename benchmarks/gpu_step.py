"""Single-GPU training speed: evo against HF ``LlamaForCausalLM``, measured in the same run.

One process, one GPU, installs nothing; writes ``gpu_step.json`` and ``gpu_step.md`` under ``--out``
(default ``$OUT`` or ``.``). In order:

1. the bf16 matmul peak (8192³) and the copy bandwidth (the bytes-moved bound of the kernels);
2. every Triton kernel against its torch reference on random inputs (fp32 ≤ 1e-5, bf16 ≤ 2e-2
   relative), forward and gradients, and its time against torch eager and the bandwidth bound;
3. for each shape — 1.1B (h2048, 22 layers, 32 heads, 4 kv heads, ffn 5632, vocab 32000) at
   4 × 4096 tokens and a 7B shape with 8 layers (h4096, 32 heads, ffn 11008) at 2 × 4096 — HF
   (sdpa, bf16 autocast, fp32 master, fused AdamW, clip 1.0, ``torch.compile(model)``) and evo
   (bf16 compute, fp32 master, donated and compiled step, packed documents of random lengths):
   tokens/s, TFLOPS (``6·N_nonembed + 12·L·h·s`` per token), % of the measured peak, peak memory;
4. the loss of evo and HF from the same weights on the same tokens over the measured steps;
5. with ``--profile``, one more evo step per shape under ``torch.profiler``
   (``monitor.Profiler``): its Chrome trace under ``profile_<shape>/`` and its top kernels by GPU
   time in the JSON and the Markdown.

``--smoke`` runs tiny shapes on whatever device is there (a CPU included, kernels under Triton's
interpreter), without compiling, to check the script end to end.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

if __name__ == "__main__" and "--smoke" in sys.argv and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evo import hf, models, monitor, optim, train  # noqa: E402
from evo.models import llama  # noqa: E402

SHAPES = {
    "llama-1.1B": (dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                        num_kv_heads=4, vocab_size=32000, max_seq_len=4096), 4, 4096),
    "llama-7B-shape-8L": (dict(hidden_size=4096, intermediate_size=11008, num_layers=8,
                               num_heads=32, num_kv_heads=32, vocab_size=32000,
                               max_seq_len=4096), 2, 4096),
}
SMOKE = {"smoke": (dict(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                        num_kv_heads=2, vocab_size=512, max_seq_len=128), 2, 128)}


def timer(device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    return sync


def time_fn(fn, device, iters=20, warm=3) -> float:
    sync = timer(device)
    for _ in range(warm):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def matmul_peak(device, smoke) -> float:
    n = 512 if smoke else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / time_fn(lambda: a @ b, device, iters=5 if smoke else 20) / 1e12


def copy_bandwidth(device, smoke) -> float:
    n = 2 ** 22 if smoke else 2 ** 28
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * n / time_fn(lambda: y.copy_(x), device) / 1e9   # read + write, GB/s


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


def kernel_checks(device, smoke, bandwidth):
    """Correctness (fwd + grads) and time of each Triton op against its reference."""
    from evo_kernels import triton_ops as K
    if not K.available():
        return {"skipped": "triton kernels are not available here"}
    g = torch.Generator(device=device).manual_seed(0)
    rows, d = (64, 300) if smoke else (16384, 4096)
    heads, hd = (4, 48) if smoke else (32, 128)
    vocab = 1000 if smoke else 32000
    out = {}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        def rnd(*shape):
            return torch.randn(*shape, device=device, generator=g).to(dtype).requires_grad_(True)
        x, w = rnd(rows, d), rnd(d)
        pos = torch.arange(rows // 4 if smoke else 4096, device=device)[None].expand(
            1 if smoke else 4, -1)
        cos, sin = llama.rope_cos_sin(pos, llama.rope_inv_freq(hd, 10000.0), dtype)
        q = rnd(*pos.shape, heads, hd)
        gate, up = rnd(rows, d), rnd(rows, d)
        h, wo = rnd(rows // 4 if not smoke else rows, d if smoke else 2048), None
        wo = rnd(h.shape[1], vocab) if not smoke else rnd(d, vocab)
        labels = torch.randint(0, vocab, (h.shape[0],), device=device, generator=g)
        cases = {
            "rms_norm": (lambda: K.rms_norm(x, w, 1e-5), lambda: K.rms_norm_reference(x, w, 1e-5),
                         (x, w), 2 * x.numel() * x.element_size()),
            "apply_rope": (lambda: K.apply_rope(q, cos, sin),
                           lambda: K.apply_rope_reference(q, cos, sin), (q,),
                           2 * q.numel() * q.element_size()),
            "swiglu_act": (lambda: K.swiglu_act(gate, up),
                           lambda: K.swiglu_act_reference(gate, up), (gate, up),
                           3 * gate.numel() * gate.element_size()),
            "linear_cross_entropy": (lambda: K.linear_cross_entropy(h, wo, labels)[0],
                                     lambda: K.linear_cross_entropy_reference(h, wo, labels)[0],
                                     (h, wo), None),
        }
        for name, (fast, ref, inputs, nbytes) in cases.items():
            y, y_ref = fast(), ref()
            dy = torch.randn_like(y_ref)
            grads = torch.autograd.grad(y, inputs, dy)
            grads_ref = torch.autograd.grad(y_ref, inputs, dy)
            err = max([rel(y, y_ref)] + [rel(a, b) for a, b in zip(grads, grads_ref)])
            r = {"max_rel": err, "tolerance": tol, "ok": err <= tol}
            with torch.no_grad():
                r["triton_ms"] = time_fn(fast, device, iters=3 if smoke else 20) * 1e3
                r["torch_ms"] = time_fn(ref, device, iters=3 if smoke else 20) * 1e3
            if nbytes:
                r["bound_ms"] = nbytes / (bandwidth * 1e9) * 1e3
            out[f"{name}/{str(dtype)[6:]}"] = r
    return out


def hf_model(cfg: llama.Config, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    hcfg = LlamaConfig(**hf.config_to_hf(cfg), attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(hcfg).to(device)
    result = model.load_state_dict(llama.LLAMA.to_hf(cfg, llama.init(cfg, seed=0)),
                                   strict=False)
    missing = [k for k in result.missing_keys if "rotary" not in k]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    return model


def packed_batch(cfg, batch, seq, device, g):
    """Rows of documents with random lengths (mean ~seq/8), as the loader packs them."""
    tokens = torch.randint(0, cfg.vocab_size, (1, batch * seq), device=device, generator=g)
    cuts, pos = [0], 0
    while pos < batch * seq:
        pos = min(batch * seq, pos + int(torch.randint(16, max(17, seq // 4), (1,), generator=g)))
        cuts.append(pos)
    labels = torch.roll(tokens, -1, dims=-1)
    labels[0, torch.tensor(cuts[1:], device=device) - 1] = -100
    return {"tokens": tokens, "labels": labels,
            "cu_seqlens": torch.tensor([cuts], dtype=torch.int32, device=device)}


def measure(step, items, device, steps, warm):
    """Run ``step(item) -> loss`` over ``warm`` items, then time the next ``steps``: seconds per
    step, peak memory of the timed steps (CUDA) and their losses."""
    for x in items[:warm]:
        step(x)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync = timer(device)
    sync()
    t = time.perf_counter()
    losses = [step(x) for x in items[warm:warm + steps]]
    sync()
    dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {"step_s": dt, "peak_gb": peak / 2 ** 30, "losses": [float(v) for v in losses]}


def run_hf(cfg, batch, seq, device, steps, warm, compile_, tokens):
    model = hf_model(cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_ else model

    def step(x):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    out = measure(step, tokens, device, steps, warm)
    del model, opt, fwd
    return {**out, "tokens_per_s": batch * seq / out["step_s"]}


def run_evo(cfg, batch, seq, device, steps, warm, compile_, batches, kernels="torch",
            profile_dir=None):
    """evo's step timed over ``batches``; with ``profile_dir``, one more step profiled there
    (``top``: its kernels with the most GPU time, or operators with the most CPU time)."""
    opt = optim.adamw(lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0)
    params = {k: v.to(device) for k, v in llama.init(cfg, seed=0).items()}
    holder = [train.init_state(params, opt)]
    step_fn = train.Step(cfg, opt, compute_dtype=torch.bfloat16, donate=True, compile=compile_,
                         kernels=kernels)

    def step(b):
        holder[0], m = step_fn(holder[0], b)
        return m["loss"]
    out = measure(step, batches, device, steps, warm)
    if profile_dir is not None:
        prof = monitor.Profiler((1, 1), profile_dir, rank=0, device=device, memory=False)
        prof.before(1)
        step(batches[-1])
        timer(device)()
        prof.after(1)
        out["profile"] = prof.top
    del holder
    return {**out, "tokens_per_s": batch * seq / out["step_s"]}


def write(res: dict, out: str, cuda: bool) -> str:
    """``gpu_step.json`` and ``gpu_step.md`` under ``out`` from the results so far (written after
    each shape, so that a run cut short keeps what it measured); returns the Markdown."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_step.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"{res['device']}, torch {res['torch']}, {res['date']}; bf16 matmul peak "
             f"{res['matmul_tflops']:.1f} TFLOP/s", "",
             "| shape | who | tokens/s | TFLOPS | % peak | peak GB | evo/HF |", "|---|---|---|---|---|---|---|"]
    for name, r in res["shapes"].items():
        for who in ("hf", "evo", "evo_triton"):
            o = r.get(who)
            if o is None:
                continue
            if "error" in o:
                lines.append(f"| {name} | {who} | error | | | | |")
                continue
            ratio = f"{o['tokens_per_s'] / r['hf']['tokens_per_s']:.3f}" \
                if who != "hf" and "tokens_per_s" in r["hf"] else ""
            lines.append(f"| {name} | {who} | {o['tokens_per_s']:.0f} | {o['tflops']:.1f} | "
                         f"{o['pct_peak']:.1f} | {o['peak_gb']:.1f} | {ratio} |")
    lines += ["", "| shape | evo/HF tokens/s | evo/HF peak memory | loss, evo vs HF on the same "
              "weights and tokens (max relative difference) |", "|---|---|---|---|"]
    for name, r in res["shapes"].items():
        cells = [r.get("ratio"), r.get("memory_ratio"), r.get("loss_max_rel_diff")]
        lines.append(f"| {name} | " + " | ".join(
            "" if v is None else f"{v:{f}}" for v, f in zip(cells, (".3f", ".3f", ".2e"))) + " |")
    for name, r in res["shapes"].items():
        if r.get("evo", {}).get("profile"):
            lines += ["", f"One evo step of {name}, the most "
                      f"{'GPU' if cuda else 'CPU'} time first:", "",
                      monitor.ops_table(r["evo"]["profile"][:12])]
    table = "\n".join(lines)
    with open(os.path.join(out, "gpu_step.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device, no compile")
    p.add_argument("--triton", action="store_true",
                   help="also time evo with the Triton elementwise kernels (kernels='triton')")
    p.add_argument("--profile", action="store_true",
                   help="profile one more evo step per shape: top kernels, Chrome trace")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SMOKE if a.smoke else {k: SHAPES[k] for k in a.shapes.split(",")}
    compile_ = not a.smoke
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)
           if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
           "shapes": {}}
    res["matmul_tflops"] = matmul_peak(device, a.smoke)
    res["copy_gb_s"] = copy_bandwidth(device, a.smoke)
    print(f"matmul peak {res['matmul_tflops']:.1f} TFLOP/s, copy {res['copy_gb_s']:.0f} GB/s",
          flush=True)
    try:
        res["kernels"] = kernel_checks(device, a.smoke, res["copy_gb_s"])
    except Exception:
        res["kernels"] = {"error": traceback.format_exc()[-1500:]}
    print(json.dumps(res["kernels"], indent=1), flush=True)
    for name, (kw, batch, seq) in shapes.items():
        cfg = llama.Config(**kw)
        fpt = models.flops_per_token(cfg, seq)
        g = torch.Generator(device=device).manual_seed(0)
        n = a.warmup + a.steps
        rows = [torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=g)
                for _ in range(n)]
        r = {}
        for who, fn, data in (
                ("hf", run_hf, rows),
                ("evo", functools.partial(run_evo, profile_dir=os.path.join(
                    a.out, f"profile_{name}") if a.profile else None),
                 [packed_batch(cfg, batch, seq, device, g) for _ in range(n)]),
                ("evo_same_tokens", run_evo, [{"tokens": x[None], "labels": torch.cat(
                    [x[:, 1:], torch.full_like(x[:, :1], -100)], 1)[None]} for x in rows]),
                *((("evo_triton", functools.partial(run_evo, kernels="triton"),
                    [packed_batch(cfg, batch, seq, device, g) for _ in range(n)]),)
                  if a.triton else ())):
            try:
                # The loss check needs no second compilation: eager computes the same function.
                out = fn(cfg, batch, seq, device, a.steps, a.warmup,
                         compile_ and who != "evo_same_tokens", data)
                out["tflops"] = out["tokens_per_s"] * fpt / 1e12
                out["pct_peak"] = 100 * out["tflops"] / res["matmul_tflops"]
            except Exception:
                out = {"error": traceback.format_exc()[-1500:]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            r[who] = out
            print(name, who, json.dumps({k: v for k, v in out.items()
                                         if k not in ("losses", "profile")}), flush=True)
        if "tokens_per_s" in r["hf"] and "tokens_per_s" in r["evo"]:
            r["ratio"] = r["evo"]["tokens_per_s"] / r["hf"]["tokens_per_s"]
            r["memory_ratio"] = (r["evo"]["peak_gb"] / r["hf"]["peak_gb"]
                                 if r["hf"]["peak_gb"] else None)   # None: no CUDA peak
        if "losses" in r["hf"] and "losses" in r.get("evo_same_tokens", {}):
            r["loss_max_rel_diff"] = max(abs(x - y) / abs(y) for x, y in
                                         zip(r["evo_same_tokens"]["losses"], r["hf"]["losses"]))
        res["shapes"][name] = r
        write(res, a.out, device.type == "cuda")
    table = write(res, a.out, device.type == "cuda")
    print(table)
    return res


if __name__ == "__main__":
    main()
