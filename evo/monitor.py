"""Throughput accounting and metric writers. Knows numbers and files, not models or ranks: the
training loop hands it a model's parameter count and decides who writes."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import IO

# Dense bf16 tensor-core peaks from vendor data sheets, TFLOP/s per device; matched by substring of
# the device name. Unknown devices (and CPUs) report no MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "A10G": 125.0}


def flops_per_token(non_embedding_params: int, num_layers: int, hidden_size: int,
                    seq_len: int) -> float:
    """Model FLOPs per trained token: ``6·N + 12·L·h·s`` (forward + backward of the matmuls, N
    without the input embedding but with the output projection, plus causal-free attention scores
    at sequence length s). Recomputation is not counted; packed documents are counted at the full
    ``seq_len``, as the baselines do."""
    return 6.0 * non_embedding_params + 12.0 * num_layers * hidden_size * seq_len


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, peak in PEAK_TFLOPS.items():
        if key in device_name:
            return peak
    return None


class Throughput:
    """Tokens/s, TFLOPS and MFU over the steps since the last call to ``tick``."""

    def __init__(self, flops_per_token: float, peak_tflops: float | None, devices: int = 1):
        self.flops_per_token, self.peak, self.devices = flops_per_token, peak_tflops, devices
        self.last = time.perf_counter()

    def tick(self, tokens: int) -> dict[str, float | None]:
        now = time.perf_counter()
        dt, self.last = max(now - self.last, 1e-9), now
        tps = tokens / dt / self.devices
        tflops = tps * self.flops_per_token / 1e12
        return {"step_time": dt, "tokens_per_second": tps, "tflops": tflops,
                "mfu": tflops / self.peak if self.peak else None}


class JsonlWriter:
    """One JSON object per line, flushed each write so a crash loses at most the line in flight."""

    def __init__(self, path: str, *, append: bool = False):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._f: IO[str] = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A live line (step, loss, tokens/s, ETA) on a terminal; plain lines every ``every`` steps
    when the output is a file or pipe."""

    def __init__(self, total_steps: int, *, every: int = 10, stream: IO[str] | None = None):
        self.total, self.every = total_steps, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.first_step: int | None = None

    def update(self, record: dict) -> None:
        step = record["step"]
        if self.first_step is None:
            self.first_step = step - 1
        done = step - self.first_step
        eta = (time.perf_counter() - self.start) / max(done, 1) * (self.total - step)
        line = (f"step {step}/{self.total}  loss {record['loss']:.4f}  "
                f"{_si(record['tokens_per_second'])} tok/s  "
                f"{record['tflops']:.2f} TFLOPS  eta {_duration(eta)}")
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if step == self.total else ""))
            self.stream.flush()
        elif step % self.every == 0 or step == self.total or done == 1:
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
