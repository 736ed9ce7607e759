"""Throughput accounting, metric writers and alerts. Knows numbers and files, not models or ranks:
the training loop hands it a model's parameter count and decides who writes.

Writers take flat records (``{"step": 3, "loss": 2.1, ...}``; a nested dict such as
``{"source_loss": {"code": 1.9}}`` becomes the tags ``source_loss/code``): ``JsonlWriter`` (one
JSON object per line), ``TensorBoardWriter`` (event files) and ``Progress`` (the terminal).
``Alerts`` watches the same records and reports what needs a human: a loss spike, a non-finite
loss or gradient, a slow step, a termination signal.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import sys
import threading
import time
import urllib.request
from collections import deque
from typing import IO, Callable

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


def expert_record(load: list[list[float]], layers: list[int], dropped: float, aux_loss: float
                  ) -> dict:
    """A mixture-of-experts step's metrics: per MoE layer (``layers``: their indices, one per row
    of ``load [moe layers][experts]``, the (token, choice) pairs each expert got), the busiest
    expert's load over the mean (1 = balanced; None for a layer that saw no token), the pairs
    dropped by the capacity, and the balancing loss per layer (1 for a uniform router)."""
    def ratio(row):
        mean = sum(row) / len(row)
        return max(row) / mean if mean > 0 else None
    return {"expert_load_max_over_mean": {f"layer_{i}": ratio(row)
                                          for i, row in zip(layers, load)},
            "dropped_tokens": int(dropped), "aux_loss": aux_loss}


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, peak in PEAK_TFLOPS.items():
        if key in device_name:
            return peak
    return None


class Throughput:
    """Tokens/s, TFLOPS and MFU per device."""

    def __init__(self, flops_per_token: float, peak_tflops: float | None, devices: int = 1):
        self.flops_per_token, self.peak, self.devices = flops_per_token, peak_tflops, devices

    def rate(self, tokens: int, seconds: float) -> dict[str, float | None]:
        """Per device: ``tokens`` (all devices together) trained in ``seconds``."""
        tps = tokens / max(seconds, 1e-9) / self.devices
        tflops = tps * self.flops_per_token / 1e12
        return {"tokens_per_second": tps, "tflops": tflops,
                "mfu": tflops / self.peak if self.peak else None}


class JsonlWriter:
    """One JSON object per line, written whole or not at all: each line goes to the file in one
    unbuffered write, and a write that fails part-way (a full disk) is cut off again, so the
    file never holds a cut line."""

    def __init__(self, path: str, *, append: bool = False):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else
                                                             os.O_TRUNC), 0o644)

    def write(self, record: dict) -> None:
        line = (json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n").encode()
        size = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            done = 0
            while done < len(line):
                done += os.write(self._fd, line[done:])
        except OSError:
            os.ftruncate(self._fd, size)
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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


def flatten(record: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` → ``{"a/b": 1}``: the tag names TensorBoard and the plain lines use."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


class TensorBoardWriter:
    """Scalars as TensorBoard event files under ``log_dir``: every number of a record, tagged
    ``{group}/{key}`` (``train/loss``, ``eval/valid/perplexity``) at the record's ``step``."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
        # purge_step: a resumed run hides the events a crashed one wrote past its checkpoint.
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step, flush_secs=10)

    def write(self, record: dict, group: str = "train") -> None:
        step = int(record["step"])
        for tag, v in flatten({k: v for k, v in record.items() if k != "step"}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{group}/{tag}", v, step)

    def close(self) -> None:
        self.writer.close()


def memory_stats(device) -> dict[str, int]:
    """Bytes of device memory: ``memory_allocated``, ``memory_reserved`` and ``memory_peak`` (the
    most allocated since the last call) on CUDA; the process's peak resident set on a CPU."""
    import torch
    if getattr(device, "type", device) == "cuda":
        out = {"memory_allocated": torch.cuda.memory_allocated(device),
               "memory_reserved": torch.cuda.memory_reserved(device),
               "memory_peak": torch.cuda.max_memory_allocated(device)}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    import resource
    return {"memory_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


class Progress:
    """A progress bar with ETA (tqdm) on a terminal; plain lines every ``every`` steps when the
    output is a file or pipe. Messages print above the bar."""

    def __init__(self, total_steps: int, *, every: int = 10, stream: IO[str] | None = None,
                 initial: int = 0):
        self.total, self.every = total_steps, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial, file=self.stream, unit="step",
                            dynamic_ncols=True, smoothing=0.1)

    def _line(self, record: dict, eta: float) -> str:
        return (f"step {record['step']}/{self.total}  loss {record['loss']:.4f}  "
                f"{_si(record['tokens_per_second'])} tok/s  "
                f"{record['tflops']:.2f} TFLOPS  eta {_duration(eta)}")

    def update(self, record: dict) -> None:
        step = record["step"]
        if self.first_step is None:
            self.first_step = step - 1
            if self.bar is not None:  # a resumed run: the bar starts where it left off
                self.bar.n = self.bar.last_print_n = step - 1
        done = step - self.first_step
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}  "
                                     f"{_si(record['tokens_per_second'])} tok/s  "
                                     f"{record['tflops']:.2f} TFLOPS", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if step % self.every == 0 or step == self.total or done == 1:
            eta = (time.perf_counter() - self.start) / max(done, 1) * (self.total - step)
            self.stream.write(self._line(record, eta) + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Alerts:
    """Watches step records and raises each problem once: it is logged through ``log``, appended
    to ``path`` (JSON lines) and POSTed as JSON to ``webhook`` when one is given.

    Kinds: ``loss_spike`` (loss above ``spike_factor`` × its exponential moving average, after
    ``warmup`` finite steps), ``nonfinite`` (loss or gradient norm NaN/inf), ``slow_step``
    (``step_time`` above ``slow_factor`` × the median of the last ``window`` steps, once
    ``window // 2`` are known), and whatever the loop reports with ``raise_`` (``sigterm``). A
    spike or a slow spell is one alert however long it lasts: the next one needs the value to come
    back under its threshold first. Values that raised an alert do not enter the averages.
    """

    def __init__(self, path: str | None, *, webhook: str | None = None,
                 log: Callable[[str], None] | None = None, spike_factor: float = 1.5,
                 ema: float = 0.9, warmup: int = 10, slow_factor: float = 3.0, window: int = 50,
                 run_dir: str | None = None):
        self.path, self.webhook, self.log = path, webhook, log or (lambda s: None)
        self.spike_factor, self.decay, self.warmup = spike_factor, ema, warmup
        self.slow_factor = slow_factor
        self.times: deque[float] = deque(maxlen=window)
        self.avg: float | None = None
        self.seen = 0
        self.in_spike = self.in_slow = False
        self.run_dir = run_dir
        self.raised: list[dict] = []
        self._posts: list[threading.Thread] = []
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def check(self, record: dict) -> list[dict]:
        """Alerts raised by this step's record (usually none)."""
        out = []
        step, loss = record["step"], record["loss"]
        bad = [k for k in ("loss", "grad_norm") if k in record and record[k] is not None
               and not math.isfinite(record[k])]
        if bad == ["grad_norm"] and "loss_scale" in record:
            bad = []  # a float16 overflow: the loss scaler skipped the step and lowers the scale
        if bad:
            out.append(self.raise_("nonfinite", step, f"non-finite {' and '.join(bad)} at step "
                                   f"{step}; the update was skipped", value=record.get(bad[0])))
        elif self.avg is not None and self.seen >= self.warmup and \
                loss > self.spike_factor * self.avg:
            if not self.in_spike:
                out.append(self.raise_(
                    "loss_spike", step, f"loss {loss:.4f} at step {step} is "
                    f"{loss / self.avg:.2f}x its moving average {self.avg:.4f}",
                    value=loss, threshold=self.spike_factor * self.avg))
            self.in_spike = True
        else:
            self.in_spike = False
            self.avg = loss if self.avg is None else self.decay * self.avg + (1 - self.decay) * loss
            self.seen += 1
        t = record.get("step_time")
        if t is not None:
            if len(self.times) >= max(self.times.maxlen // 2, 1):
                median = statistics.median(self.times)
                if t > self.slow_factor * median:
                    if not self.in_slow:
                        out.append(self.raise_(
                            "slow_step", step, f"step {step} took {t:.3f}s, "
                            f"{t / median:.1f}x the median {median:.3f}s of the last "
                            f"{len(self.times)} steps", value=t, threshold=self.slow_factor * median))
                    self.in_slow = True
                    return out
            self.in_slow = False
            self.times.append(t)
        return out

    def raise_(self, kind: str, step: int, message: str, **fields) -> dict:
        alert = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "step": step, "kind": kind, "message": message,
                 **{k: _jsonable(v) for k, v in fields.items()}}
        if self.run_dir:
            alert["run_dir"] = self.run_dir
        self.raised.append(alert)
        self.log(f"evo: alert [{kind}] {message}")
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(alert) + "\n")
        if self.webhook:
            t = threading.Thread(target=self._post, args=(alert,), daemon=True)
            t.start()
            self._posts.append(t)
        return alert

    def _post(self, alert: dict) -> None:
        body = json.dumps(alert).encode()
        req = urllib.request.Request(self.webhook, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
        except Exception as e:  # an unreachable webhook must not stop training
            self.log(f"evo: could not POST alert to {self.webhook}: {e}")

    def close(self, timeout: float = 15.0) -> None:
        """Wait for the webhook POSTs in flight (each gives up after 10 s)."""
        for t in self._posts:
            t.join(timeout)
        self._posts.clear()


def top_ops(prof, cuda: bool, n: int = 20) -> list[dict]:
    """The ``n`` entries of a finished ``torch.profiler.profile`` with the most self time, most
    first: on CUDA the GPU's (kernels, copies), elsewhere the CPU's (operators). Each: ``name``,
    ``ms`` (summed over its ``calls``) and ``share`` of all the self time recorded."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"name": e.key, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total,
             "calls": e.count} for e in events[:n]]


def ops_table(rows: list[dict]) -> str:
    """``top_ops``' rows as a Markdown table."""
    lines = ["| kernel / operator | ms | share | calls |", "|---|---|---|---|"]
    lines += [f"| `{r['name'][:90]}` | {r['ms']:.2f} | {100 * r['share']:.1f} % | {r['calls']} |"
              for r in rows]
    return "\n".join(lines)


class Profiler:
    """torch.profiler over steps ``first..last`` (1-based, inclusive): a Chrome trace
    (``trace_rank{r}.json``, open in chrome://tracing or Perfetto), the entries with the most self
    time (``ops_rank{r}.md``: GPU kernels on CUDA, operators on a CPU; also kept as ``top``) and,
    where ``memory``, the memory picture — on CUDA a memory snapshot
    (``memory_snapshot_rank{r}.pickle``, for pytorch.org/memory_viz), on a CPU the operators'
    memory table (``memory_rank{r}.txt``). ``steps=None`` does nothing."""

    def __init__(self, steps: tuple[int, int] | None, out_dir: str, *, rank: int, device,
                 log: Callable[[str], None] | None = None, memory: bool = True):
        self.steps, self.out_dir, self.rank = steps, out_dir, rank
        self.cuda = getattr(device, "type", device) == "cuda"
        self.log = log or (lambda s: None)
        self.memory = memory
        self.prof = None
        self.top: list[dict] = []

    def before(self, step: int) -> None:
        if self.steps is None or step != self.steps[0] or self.prof is not None:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda and self.memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=self.memory)
        self.prof.__enter__()

    def after(self, step: int) -> None:
        if self.prof is not None and step >= self.steps[1]:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        import torch
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        os.makedirs(self.out_dir, exist_ok=True)
        trace = os.path.join(self.out_dir, f"trace_rank{self.rank}.json")
        prof.export_chrome_trace(trace)
        self.top = top_ops(prof, self.cuda)
        ops = os.path.join(self.out_dir, f"ops_rank{self.rank}.md")
        with open(ops, "w", encoding="utf-8") as f:
            f.write(ops_table(self.top) + "\n")
        written = [trace, ops]
        if self.memory and self.cuda:
            written.append(os.path.join(self.out_dir, f"memory_snapshot_rank{self.rank}.pickle"))
            torch.cuda.memory._dump_snapshot(written[-1])
            torch.cuda.memory._record_memory_history(enabled=None)
        elif self.memory:
            written.append(os.path.join(self.out_dir, f"memory_rank{self.rank}.txt"))
            with open(written[-1], "w", encoding="utf-8") as f:
                f.write(prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=40))
        first, last = self.steps
        self.log(f"evo: profiled steps {first}..{last}: {', '.join(written)}")
