"""``Experiment``: the whole description of a run, and ``--set KEY=VALUE`` overrides of it.

An experiment file is a Python file that builds an ``Experiment`` and binds it to the name
``experiment``. Overrides replace fields of the frozen dataclasses along a dotted path
(``plan.tp=2``, ``data.seq_len=512``); every value is validated by the dataclass it lands in.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field

from evo import data, models, optim
from evo.scaler import LossScale
from evo.sharding import Plan


class ConfigError(ValueError):
    """A bad experiment file, field or override; the message names it."""


_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Experiment:
    """One training run.

    ``compute_dtype``: "float32", "bfloat16" or "float16" (master weights and optimizer state
    stay fp32); float16 trains with dynamic loss scaling, ``loss_scale`` (see ``evo.scaler``).
    ``remat``: fraction of layers recomputed in backward. ``eval_every``: steps between validation
    passes over ``data.valid_folder`` (0: only before the first and after the last step).
    ``sample_prompt``: when set, the run ends by printing a sampled continuation of it (needs
    ``tokenizer``). ``checkpoint_every``: steps between checkpoints under ``RUN_DIR/checkpoints``
    (0: none); the last ``keep_last`` are kept, and every step that is a multiple of
    ``keep_every``; ``async_checkpoint`` writes them while training goes on. Re-running the same
    command resumes from the latest complete checkpoint. ``init_from``: start from these weights
    (an HF directory or an evo run/checkpoint; parameters only) instead of ``seed``.
    ``tensorboard``: write TensorBoard event files under ``RUN_DIR/tensorboard``.
    ``alert_webhook``: a URL that receives every alert as a JSON POST. ``peak_tflops``: the
    device's peak for MFU (default: known from the device name; none on a CPU). ``profile``:
    ``"START:END"`` profiles steps START through END (1-based) into ``RUN_DIR/profile``.
    ``compile``: run forward and backward through ``torch.compile``. ``kernels``: "torch" or
    "triton" elementwise ops in the model (the fused Triton kernels; same results).
    ``final_checkpoint``: end every run with a checkpoint of its final state (so ``evo generate
    RUN_DIR`` works after any run). ``resume_with_changes``: resume from a checkpoint saved with
    another model config (a changed ``rope_theta``, ``norm_eps`` ...); without it that is an
    error naming the field, and with it the change is recorded in the checkpoints' ``meta``.
    """
    model: object                   # the config of a registered model family (evo.models)
    data: data.Packed
    optimizer: optim.AdamW
    plan: Plan = field(default_factory=Plan)
    steps: int = 100
    seed: int = 0
    run_dir: str = "runs/default"
    checkpoint_every: int = 0
    keep_last: int = 3
    keep_every: int = 0
    async_checkpoint: bool = True
    init_from: str | None = None
    compute_dtype: str = "float32"
    remat: float = 0.0
    attention: str = "auto"
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    tokenizer: str | None = None
    sample_prompt: str | None = None
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    tensorboard: bool = True
    alert_webhook: str | None = None
    peak_tflops: float | None = None
    profile: str | None = None
    compile: bool = False
    kernels: str = "torch"
    loss_scale: LossScale = field(default_factory=LossScale)
    final_checkpoint: bool = True
    resume_with_changes: bool = False

    def __post_init__(self):
        try:
            models.family_of(self.model)
        except ValueError as e:
            raise ConfigError(f"experiment.model: {e}") from None
        for name, typ in (("data", data.Packed), ("optimizer", optim.AdamW), ("plan", Plan)):
            if not isinstance(getattr(self, name), typ):
                raise ConfigError(f"experiment.{name} must be a {typ.__module__}.{typ.__qualname__}, "
                                  f"got {type(getattr(self, name)).__name__}")
        for name in ("steps", "log_every", "eval_batches", "sample_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"experiment.{name} must be a positive integer, got {v!r}")
        for name in ("seed", "checkpoint_every", "eval_every", "keep_last", "keep_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"experiment.{name} must be a non-negative integer, got {v!r}")
        if self.compute_dtype not in _DTYPES:
            raise ConfigError(f"experiment.compute_dtype must be one of {_DTYPES}, got "
                              f"{self.compute_dtype!r}")
        if not isinstance(self.remat, (int, float)) or not 0 <= self.remat <= 1:
            raise ConfigError(f"experiment.remat must be a fraction in [0, 1], got {self.remat!r}")
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ConfigError(f"experiment.run_dir must be a non-empty path, got {self.run_dir!r}")
        if self.peak_tflops is not None and (not isinstance(self.peak_tflops, (int, float))
                                             or self.peak_tflops <= 0):
            raise ConfigError(f"experiment.peak_tflops must be a positive number, got "
                              f"{self.peak_tflops!r}")
        if self.alert_webhook is not None and not str(self.alert_webhook).startswith(
                ("http://", "https://")):
            raise ConfigError(f"experiment.alert_webhook must be an http(s) URL, got "
                              f"{self.alert_webhook!r}")
        if self.profile is not None:
            self.profile_steps()
        if self.kernels not in ("torch", "triton"):
            raise ConfigError(f"experiment.kernels must be 'torch' or 'triton', got {self.kernels!r}")
        for name in ("final_checkpoint", "resume_with_changes", "async_checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"experiment.{name} must be True or False, got "
                                  f"{getattr(self, name)!r}")
        if not isinstance(self.loss_scale, LossScale):
            raise ConfigError(f"experiment.loss_scale must be an evo.scaler.LossScale, got "
                              f"{type(self.loss_scale).__name__}")
        if self.compute_dtype == "float16" and not self.optimizer.skip_nonfinite:
            raise ConfigError("experiment.optimizer.skip_nonfinite must be True with "
                              "compute_dtype='float16': loss scaling skips the steps that overflow")
        if self.sample_prompt is not None and self.tokenizer is None:
            raise ConfigError("experiment.sample_prompt needs experiment.tokenizer to encode it")
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise ConfigError(f"experiment.run_dir={self.run_dir!r} is an existing file, not a "
                              "folder")
        self._check_positions()

    def _check_positions(self) -> None:
        """Every position the data can number must be one the model declares (``max_seq_len``
        is what an HF export states as ``max_position_embeddings``)."""
        d = self.data
        if d.positions <= self.model.max_seq_len:
            return
        how = ("data.seq_len" if d.positions == d.seq_len else
               f"data.micro_batch * data.seq_len = {d.micro_batch} * {d.seq_len} (a packed "
               "document may fill a whole row)")
        raise ConfigError(f"{how} = {d.positions} exceeds model.max_seq_len = "
                          f"{self.model.max_seq_len}: the model would train on positions it does "
                          "not declare; raise model.max_seq_len or shorten the rows")

    def profile_steps(self) -> tuple[int, int] | None:
        """``profile`` as (first, last) step, 1-based and inclusive."""
        if self.profile is None:
            return None
        a, colon, b = str(self.profile).partition(":")
        try:
            first, last = int(a), int(b)
        except ValueError:
            first = last = 0
        if not colon or not 1 <= first <= last:
            raise ConfigError(f"experiment.profile must be START:END with 1 <= START <= END "
                              f"(steps, 1-based), got {self.profile!r}")
        return first, last


def load(path: str) -> Experiment:
    """Run an experiment file and return its ``experiment``."""
    if not os.path.isfile(path):
        raise ConfigError(f"experiment file {path!r} does not exist")
    name = "evo_experiment_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except (ValueError, TypeError) as e:
        line = _user_line(e, path)
        raise ConfigError(f"{path}{line}: {e}") from None
    exp = getattr(module, "experiment", None)
    if not isinstance(exp, Experiment):
        raise ConfigError(f"{path} must bind `experiment` to an evo.Experiment, found "
                          f"{type(exp).__name__ if exp is not None else 'nothing'}")
    return exp


def _user_line(e: BaseException, path: str) -> str:
    tb, line = e.__traceback__, ""
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line


def override_keys(obj) -> list[str]:
    """Every dotted key ``--set`` accepts for this experiment (nested dataclass fields)."""
    keys = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            keys += [f"{f.name}.{k}" for k in override_keys(v)]
        elif not callable(v):
            keys.append(f.name)
    if isinstance(obj, optim.AdamW):
        keys.append("lr")  # `optimizer.lr` sets a schedule's peak
    return sorted(set(keys))


def _parse(text: str, current, key: str):
    """The override text as a value of the current value's type."""
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--set {key}={text}: expected true or false")
    if isinstance(current, str) or (current is None and not _is_literal(text)):
        return None if text in ("None", "null") else text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--set {key}={text}: expected {_kind(current)}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and type(value) is not type(current):
        raise ConfigError(f"--set {key}={text}: expected {_kind(current)}, got {_kind(value)}")
    return value


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          tuple: "a tuple", list: "a list", dict: "a dict", set: "a set", type(None): "None"}


def _kind(value) -> str:
    """``value``'s type as a noun phrase for an error message: "an integer", "a number"."""
    name = _KINDS.get(type(value))
    if name is None:
        name = type(value).__name__
        name = ("an " if name[:1].lower() in "aeiou" else "a ") + name
    return name


def _is_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
        return True
    except (ValueError, SyntaxError):
        return False


def _set(obj, path: list[str], text: str, key: str):
    name = path[0]
    if isinstance(obj, optim.AdamW) and path == ["lr"] and not isinstance(obj.lr, (int, float)):
        return dataclasses.replace(obj, lr=_set(obj.lr, ["peak"], text, key))
    names = {f.name for f in dataclasses.fields(obj)}
    if name not in names:
        raise KeyError(name)
    current = getattr(obj, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise KeyError(name)
        value = _set(current, path[1:], text, key)
    else:
        if dataclasses.is_dataclass(current) or callable(current):
            raise KeyError(name)
        value = _parse(text, current, key)
    try:
        return dataclasses.replace(obj, **{name: value})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--set {key}={text}: {e}") from None


def apply_overrides(exp: Experiment, overrides: list[str]) -> Experiment:
    """``["plan.tp=2", "steps=10"]`` applied in order, ``model.*`` keys first (the data is checked
    against the model: ``data.seq_len=2048 model.max_seq_len=2048`` works in either order);
    unknown keys and bad values raise ConfigError naming them."""
    for item in sorted(overrides, key=lambda item: not item.strip().startswith("model.")):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            exp = _set(exp, key.split("."), text.strip(), key)
        except KeyError:
            raise ConfigError(f"--set {key}: unknown key. Known keys: "
                              f"{', '.join(override_keys(exp))}") from None
    return exp

