"""Data pipeline throughput: packed tokens/s and resident memory of evo.data.Loader on one core,
and tokenizer throughput.

    python benchmarks/data_throughput.py                 # 1 GB corpus in a temp dir
    python benchmarks/data_throughput.py --size-gb 0.05  # quick check

Generates a tokenized corpus of --size-gb (InternEvo .bin/.meta, random ids < 32000, document
lengths log-normal around 800 tokens, written by two processes), then iterates a Loader over a full
epoch pinned to one core, sampling VmRSS from /proc/self/status. The baseline rows are measured in
the same run: a naive reader (json.loads per line) on a sample of the same files, and what one H200
consumes when training a 1.1B model (about 45 k tokens/s).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sysconfig
import tempfile
import time

VOCAB = 32_000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_part(args) -> tuple[int, int]:
    """Write one ~part_bytes file of random documents; returns (documents, tokens)."""
    import numpy as np

    from evo.data import BinWriter

    path, part_bytes, seed = args
    rng = np.random.default_rng(seed)
    with BinWriter(path) as w:
        while w.bytes < part_bytes:
            lengths = np.clip(rng.lognormal(np.log(800), 1.0, 512), 8, 32_768).astype(np.int64)
            flat = rng.integers(0, VOCAB, int(lengths.sum()))
            w.write(np.split(flat, np.cumsum(lengths)[:-1]))
    return w.documents, w.tokens


def generate(folder: str, size_bytes: int) -> tuple[int, int]:
    n_parts = max(2, -(-size_bytes // (256 << 20)))
    os.makedirs(folder, exist_ok=True)
    jobs = [(os.path.join(folder, f"part-{i:05d}.bin"), size_bytes // n_parts, i) for i in range(n_parts)]
    with multiprocessing.get_context("spawn").Pool(min(2, os.cpu_count() or 1)) as pool:
        done = pool.map(write_part, jobs)
    return sum(d for d, _ in done), sum(t for _, t in done)


def naive_rate(folder: str, sample_bytes: int = 32 << 20) -> float:
    """Tokens/s of the obvious reader: readline + json.loads + np.array, no packing."""
    import numpy as np

    path = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".bin"))[0]
    n, read, t0 = 0, 0, time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            n += np.array(json.loads(line)["tokens"], dtype=np.int64).size
            read += len(line)
            if read > sample_bytes:
                break
    return n / (time.perf_counter() - t0)


def stdlib_text(limit: int) -> list[str]:
    texts, size = [], 0
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = sorted(d for d in dirnames if d != "site-packages")
        for name in sorted(filenames):
            if name.endswith(".py"):
                try:
                    text = open(os.path.join(dirpath, name), encoding="utf-8").read()
                except UnicodeDecodeError:
                    continue
                texts.append(text)
                size += len(text.encode())
                if size >= limit:
                    return texts
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="corpus size in GB (default 1)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--micro-num", type=int, default=8)
    p.add_argument("--text-mb", type=float, default=8.0, help="text for the tokenizer rows (MB)")
    p.add_argument("--dir", default=None, help="where to build the corpus (default: a temp dir, removed)")
    args = p.parse_args()

    os.environ["RAYON_NUM_THREADS"] = "1"  # HF tokenizers on one core too
    tmp = args.dir or tempfile.mkdtemp(prefix="evo-data-bench-")
    folder = os.path.join(tmp, "train")
    try:
        t0 = time.perf_counter()
        docs, tokens = generate(folder, int(args.size_gb * 1e9))
        gen_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))

        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core from here on
        import numpy as np
        import torch

        torch.set_num_threads(1)
        from evo.data import Loader, Packed, load_tokenizer, tokenize

        naive = naive_rate(folder)
        base = rss_mb()
        cfg = Packed(folder=folder, seq_len=args.seq_len, micro_batch=args.micro_batch, micro_num=args.micro_num)
        t0 = time.perf_counter()
        loader = Loader(cfg, vocab_size=VOCAB)
        open_s = time.perf_counter() - t0
        rows_per_step = cfg.micro_num
        steps = -(-tokens // cfg.row_len) // rows_per_step  # the whole epoch but its last partial step
        peak, real, t0 = rss_mb(), 0, time.perf_counter()
        for i in range(steps):
            batch = next(loader)
            real += int((batch["source"] >= 0).sum())
            if i % 16 == 0:
                peak = max(peak, rss_mb())
        loop_s = time.perf_counter() - t0
        peak = max(peak, rss_mb())
        assert loader.state_dict()["row"] == steps * rows_per_step and real <= tokens

        texts = stdlib_text(int(args.text_mb * 1e6))
        text_bytes = sum(len(t.encode()) for t in texts)
        byte_tok = load_tokenizer("byte")
        t0 = time.perf_counter()
        n_byte = sum(len(byte_tok.encode(t)) for t in texts)  # list[int], as the interface returns
        byte_s = time.perf_counter() - t0

        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        t0 = time.perf_counter()
        bpe.train_from_iterator(texts[: max(1, len(texts) // 4)], trainers.BpeTrainer(vocab_size=8000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
        train_s = time.perf_counter() - t0
        bpe_path = os.path.join(tmp, "bpe.json")
        bpe.save(bpe_path)
        hf = load_tokenizer(bpe_path)
        t0 = time.perf_counter()
        n_bpe = sum(a.size for a in hf.encode_batch(texts))
        bpe_s = time.perf_counter() - t0

        jsonl = os.path.join(tmp, "text.jsonl")
        with open(jsonl, "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        t0 = time.perf_counter()
        summary = tokenize([jsonl], os.path.join(tmp, "tok_byte"), add_eos=True, progress=False)
        tool_byte_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary_bpe = tokenize([jsonl], os.path.join(tmp, "tok_bpe"), tokenizer=bpe_path, add_eos=True, progress=False)
        tool_bpe_s = time.perf_counter() - t0
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)

    h200 = 45_000
    rate = real / loop_s
    print(f"corpus: {size / 1e9:.2f} GB, {docs} documents, {tokens / 1e6:.1f} M tokens "
          f"(generated in {gen_s:.1f} s by 2 processes); Loader seq_len={cfg.seq_len} micro_batch={cfg.micro_batch} "
          f"micro_num={cfg.micro_num}, one core")
    print()
    print(f"{'measure':58s} {'value':>14s}  target / note")
    print("-" * 100)
    print(f"{'Loader packed tokens/s (an epoch, real tokens)':58s} {rate / 1e6:>12.2f} M  >= 5 M/s")
    print(f"{'  row slots/s (incl. padding)':58s} {steps * rows_per_step * cfg.row_len / loop_s / 1e6:>12.2f} M")
    print(f"{'  baseline: naive reader, json.loads per line, no packing':58s} {naive / 1e6:>12.2f} M  same files")
    print(f"{'  baseline: one H200 training a 1.1B model consumes':58s} {h200 / 1e6:>12.3f} M  loader is {rate / h200:.0f}x that")
    print(f"{'Loader open (scan + metas)':58s} {open_s:>12.2f} s")
    print(f"{'RSS above baseline while iterating (peak, VmRSS)':58s} {peak - base:>11.1f} MB  <= 200 MB (baseline {base:.0f} MB)")
    print(f"{'byte tokenizer .encode (-> list[int])':58s} {n_byte / byte_s / 1e6:>12.1f} M  tokens/s ({text_bytes / byte_s / 1e6:.0f} MB/s)")
    print(f"{'HF BPE 8k vocab (trained in %.1f s), encode_batch, 1 thread' % train_s:58s} {n_bpe / bpe_s / 1e6:>12.2f} M  tokens/s ({text_bytes / bpe_s / 1e6:.1f} MB/s)")
    print(f"{'evo tokenize jsonl -> .bin, byte, 1 worker':58s} {summary['tokens'] / tool_byte_s / 1e6:>12.2f} M  tokens/s ({text_bytes / tool_byte_s / 1e6:.1f} MB/s)")
    print(f"{'evo tokenize jsonl -> .bin, HF BPE, 1 worker':58s} {summary_bpe['tokens'] / tool_bpe_s / 1e6:>12.2f} M  tokens/s ({text_bytes / tool_bpe_s / 1e6:.1f} MB/s)")


if __name__ == "__main__":
    main()
