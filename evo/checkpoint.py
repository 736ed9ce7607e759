"""Sharded checkpoints of global logical arrays: any plan reads what any plan wrote.

Layout of ``RUN_DIR/checkpoints/step-00001000/``::

    index.json                  what the checkpoint holds (written last: its presence = complete)
    rank-00003.safetensors      the pieces rank 3 held and no other rank also held

Every array is stored as its *global* logical tensor (``params/layers.0.attn.wqkv``,
``opt/mu/...``, ``opt/nu/...``) cut into rectangles: each rank writes the rectangles it alone is
responsible for (a replicated piece is written by one replica), and ``index.json`` lists, per
array, the global shape and every rectangle's file, offset and size. A reader under any plan asks
for the rectangle it needs and reads only the overlapping parts of the files (safetensors slices),
so resharding across tensor-parallel degrees, ZeRO stages and world sizes is the same code path
as a plain resume.

Saving is atomic: ranks write into ``.tmp-step-N/``; when every rank has written its files and its
piece list, rank 0 writes ``index.json`` and renames the directory into place. A crash at any
moment leaves the previous checkpoint intact and the partial one invisible. The write can run in a
background thread (``async``): the pieces are first copied to host memory, so training goes on
while files are written, and ranks coordinate through the files alone (no collectives from the
thread).

The format is plain safetensors + JSON, not ``torch.distributed.checkpoint``: DCP reshards through
DTensor placements, and evo's layout (tensor-parallel chunks further split by ZeRO on their first
dimension, with zero padding) is not a DTensor placement; rectangles with global offsets express
it directly and keep the files readable by anything that reads safetensors.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import threading
import time

import torch
from safetensors import safe_open

from evo import models, train
from evo.scaler import ScalerState
from evo.sharding import pipeline
from evo.sharding.layout import ParamLayout, model_layouts
from evo.sharding.mesh import Mesh, mesh_shape

FORMAT = "evo-checkpoint-1"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file or field."""


# ---------------------------------------------------------------------------- geometry

def _rows_range(lay: ParamLayout, plan, zero_index: int) -> tuple[int, int]:
    rows = lay.local_shape[0]
    start = zero_index * lay.shard_shape[0]
    return min(start, rows), min(start + lay.shard_shape[0], rows)


def _params_sharded(plan) -> bool:
    """Whether a rank stores a shard of each piece's rows: ZeRO-3, or weight parallelism (one
    shard per rank of the sequence group, ``seq``)."""
    return plan.zero == 3 or plan.weight_parallel


def _opt_sharded(plan) -> bool:
    return plan.zero >= 1 or plan.weight_parallel


def piece_rect(lay: ParamLayout, plan, coords: dict[str, int], sharded: bool
               ) -> tuple[list[int], list[int]]:
    """Global (offset, size) of this rank's piece: the tensor-parallel piece, or its ZeRO shard
    (without padding) when ``sharded``."""
    offset = list(lay.offset(coords, mesh_shape(plan).sizes))
    size = list(lay.local_shape)
    if sharded and size:
        lo, hi = _rows_range(lay, plan, coords["seq" if plan.weight_parallel else "zero"])
        offset[0] += lo
        size[0] = hi - lo
    return offset, size


def _stored_pieces(cfg, mesh: Mesh, state: train.TrainState) -> dict[str, tuple]:
    """Global name -> (tensor piece on host, offset, size) for the pieces this rank writes."""
    plan, c = mesh.plan, mesh.coords
    layouts = pipeline.local_layouts(model_layouts(plan, cfg), cfg, plan, c["pp"], primary=True)
    out = {}
    groups = (("params/", state.params, _params_sharded(plan)),
              ("opt/mu/", state.opt_state.mu, _opt_sharded(plan)),
              ("opt/nu/", state.opt_state.nu, _opt_sharded(plan)))
    for prefix, tensors, sharded in groups:
        writer = c["replica"] == 0 if sharded else c["dp"] == 0   # one copy of each piece
        if (c["cp"] != 0 or c["sp"] != 0) and not plan.weight_parallel:   # the sequence
            continue                                              # group's copies
        if not writer and plan.ep == 1:
            continue
        for k, lay in layouts.items():
            if plan.ep > 1 and not _expert_plan_writes(lay, c, sharded):
                continue
            if lay.tp_dim is None and c["tp"] != 0:
                continue                          # replicated over tp: tp rank 0 writes it
            offset, size = piece_rect(lay, plan, c, sharded)
            if size and size[0] == 0:
                continue
            t = tensors[k][:size[0]]          # drop ZeRO padding rows
            out[prefix + k] = (t.detach().to("cpu", copy=True).contiguous(), offset, size)
    return out


def _expert_plan_writes(lay: ParamLayout, c: dict[str, int], sharded: bool) -> bool:
    """Under expert parallelism, whether the rank at ``c`` writes its piece of ``lay``: an expert
    parameter's piece is held by the ranks with the same experts (``edp``; its ZeRO shards
    replicated over ``replica``), any other's by every data-parallel rank (its shards replicated
    over ``replica`` and ``ep``)."""
    if lay.ep_dim is not None:
        return c["replica"] == 0 if sharded else c["edp"] == 0
    return c["replica"] == 0 and c["ep"] == 0 if sharded else c["dp"] == 0


# ------------------------------------------------------------------------------- saving

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}


def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write a safetensors file straight from the tensors' memory: no serialised copy of the
    whole file in memory, and the GIL released while bytes go to disk (so an asynchronous save
    barely touches the training thread). Readable by ``safetensors.safe_open``."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())

def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "index.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def incomplete_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".tmp-") or (_STEP_DIR.match(name) and
                                        not os.path.isfile(os.path.join(path, "index.json"))):
            out.append(path)
    return sorted(out)


class Saver:
    """Writes checkpoints of one run; ``wait()`` before exiting. One per process."""

    def __init__(self, root: str, mesh: Mesh, *, keep_last: int = 3, keep_every: int = 0,
                 asynchronous: bool = True, poll_timeout: float = 600.0):
        self.root, self.mesh = root, mesh
        self.keep_last, self.keep_every = keep_last, keep_every
        self.asynchronous, self.poll_timeout = asynchronous, poll_timeout
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.last_step: int | None = None  # the step of the last save started

    def save(self, cfg, state: train.TrainState, *, loader_state: dict,
             meta: dict) -> None:
        """Start (or, synchronously, do) a checkpoint of ``state`` at its step."""
        self.wait()
        step = int(state.step)
        pieces = _stored_pieces(cfg, self.mesh, state)
        scalars = {"step": step, "opt_count": int(state.opt_state.count),
                   "opt_skipped": int(state.opt_state.skipped), **_scaler_scalars(state.scaler)}
        layouts = model_layouts(self.mesh.plan, cfg)
        shapes = {p + k: list(l.shape) for k, l in layouts.items()
                  for p in ("params/", "opt/mu/", "opt/nu/")}
        index = {"format": FORMAT, "scalars": scalars, "loader": loader_state,
                 **model_record(cfg), "plan": repr(self.mesh.plan),
                 "world_size": self.mesh.plan.world_size, "meta": meta, "shapes": shapes}
        args = (step, pieces, index)
        self.last_step = step
        if self.asynchronous:
            self.thread = threading.Thread(target=self._write_safely, args=args, daemon=False)
            self.thread.start()
        else:
            self._write_or_clean(*args)

    def _write_safely(self, *args) -> None:
        try:
            self._write_or_clean(*args)
        except BaseException as e:  # reported by check() or wait()
            self.error = e

    def _write_or_clean(self, step: int, pieces: dict, index: dict) -> None:
        """Write the checkpoint; on a failed write (disk full, permissions) remove what was
        written and raise one CheckpointError naming the checkpoint and the last good one."""
        try:
            self._write(step, pieces, index)
        except OSError as e:
            shutil.rmtree(os.path.join(self.root, ".tmp-" + _step_name(step)), ignore_errors=True)
            done = complete_checkpoints(self.root)
            last = done[-1][1] if done else "none (no checkpoint of this run is complete)"
            raise CheckpointError(
                f"checkpoint {_step_name(step)} could not be written to "
                f"{os.path.join(self.root, _step_name(step))} ({e.strerror or e}); the last good "
                f"checkpoint is {last}") from None

    def check(self) -> None:
        """Raise the error of a background save that has finished and failed; called every
        step, so a failed asynchronous save stops the run at once."""
        if self.thread is not None and not self.thread.is_alive():
            self.wait()

    def _write(self, step: int, pieces: dict, index: dict) -> None:
        rank, world = self.mesh.rank, self.mesh.plan.world_size
        tmp = os.path.join(self.root, ".tmp-" + _step_name(step))
        os.makedirs(tmp, exist_ok=True)
        fname = f"rank-{rank:05d}.safetensors"
        tensors = {name: t for name, (t, _, _) in pieces.items()}
        save_file(tensors, os.path.join(tmp, fname + ".partial"))
        os.replace(os.path.join(tmp, fname + ".partial"), os.path.join(tmp, fname))
        listing = {name: {"file": fname, "offset": off, "size": size, "dtype": str(t.dtype)}
                   for name, (t, off, size) in pieces.items()}
        _write_json(os.path.join(tmp, f"rank-{rank:05d}.json"), listing)
        if rank != 0:
            return
        # Rank 0 waits for every rank's listing, then publishes the checkpoint.
        deadline = time.time() + self.poll_timeout
        listings = [os.path.join(tmp, f"rank-{r:05d}.json") for r in range(world)]
        while not all(os.path.exists(p) for p in listings):
            if not os.path.isdir(tmp):  # another rank failed and removed it
                raise OSError(errno.EIO, "another rank could not write its pieces")
            if time.time() > deadline:
                raise TimeoutError(f"checkpoint {tmp}: not every rank wrote its pieces within "
                                   f"{self.poll_timeout:.0f}s")
            time.sleep(0.01)
        tensors_index: dict[str, dict] = {}
        for p in listings:
            with open(p) as f:
                for name, piece in json.load(f).items():
                    entry = tensors_index.setdefault(name, {"shape": index["shapes"][name],
                                                           "dtype": piece["dtype"], "pieces": []})
                    entry["pieces"].append({k: piece[k] for k in ("file", "offset", "size")})
        for name, entry in tensors_index.items():
            covered = sum(math.prod(p["size"]) for p in entry["pieces"])
            if covered != math.prod(entry["shape"]):
                raise AssertionError(f"checkpoint {tmp}: {name} covers {covered} of "
                                     f"{math.prod(entry['shape'])} elements")
        index = {k: v for k, v in index.items() if k != "shapes"} | {"tensors": tensors_index}
        _write_json(os.path.join(tmp, "index.json"), index)
        final = os.path.join(self.root, _step_name(step))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune()

    def _prune(self) -> None:
        done = complete_checkpoints(self.root)
        keep = {s for s, _ in done[-self.keep_last:]} if self.keep_last > 0 else \
            {s for s, _ in done}
        if self.keep_every:
            keep |= {s for s, _ in done if s % self.keep_every == 0}
        for s, path in done:
            if s not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            e, self.error = self.error, None
            raise e


def _write_json(path: str, obj) -> None:
    with open(path + ".partial", "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".partial", path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ------------------------------------------------------------------------------- loading

def read_index(path: str) -> dict:
    """The index of the checkpoint directory ``path``; CheckpointError naming what is wrong."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory (it does not exist)")
    index_path = os.path.join(path, "index.json")
    if not os.path.isfile(index_path):
        raise CheckpointError(f"{path}: not a complete evo checkpoint (no index.json)")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: unreadable checkpoint index ({e})") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def model_record(cfg) -> dict:
    """What index.json records of the model: its family's name and its config."""
    fam = models.family_of(cfg)
    return {"family": fam.name, "model": fam.config_to_dict(cfg)}


def model_config(index: dict, path: str = "checkpoint"):
    """The model config a checkpoint was saved for, in its recorded family (LLaMA when the index
    predates families)."""
    try:
        fam = models.get(index.get("family", models.UNRECORDED_FAMILY))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        return fam.config_from_dict(index["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model config in index.json is invalid ({e})") from None


class _Reader:
    """Reads rectangles of global arrays from a checkpoint's files."""

    def __init__(self, path: str, index: dict):
        self.path, self.index, self.files = path, index, {}

    def _open(self, name: str):
        if name not in self.files:
            fpath = os.path.join(self.path, name)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"{fpath}: shard file is missing")
            try:
                self.files[name] = safe_open(fpath, framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{fpath}: unreadable shard ({e})") from None
        return self.files[name]

    def read(self, name: str, offset: list[int], size: list[int]) -> torch.Tensor:
        entry = self.index["tensors"].get(name)
        if entry is None:
            raise CheckpointError(f"{self.path}: the checkpoint has no array {name!r}")
        if len(entry["shape"]) != len(size):
            raise CheckpointError(f"{self.path}: {name!r} has shape {entry['shape']}")
        out = torch.zeros(size, dtype=getattr(torch, entry["dtype"].split(".")[-1]))
        for piece in entry["pieces"]:
            lo = [max(a, b) for a, b in zip(offset, piece["offset"])]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offset, size, piece["offset"],
                                                        piece["size"])]
            if any(h <= l for h, l in zip(hi, lo)):
                continue
            f = self._open(piece["file"])
            src = tuple(slice(l - p, h - p) for l, h, p in zip(lo, hi, piece["offset"]))
            dst = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offset))
            try:
                out[dst] = f.get_slice(name)[src]
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{os.path.join(self.path, piece['file'])}: cannot read "
                                      f"{name!r} ({e})") from None
        return out


def check_model(index: dict, cfg, path: str) -> None:
    """The checkpoint at ``path`` (its ``index``) holds parameters of ``cfg``'s family and
    shapes; a CheckpointError names the family or the field that differs."""
    fam = models.family_of(cfg)
    saved_family = index.get("family", models.UNRECORDED_FAMILY)
    if saved_family != fam.name:
        raise CheckpointError(f"{path}: holds a model of family {saved_family!r}, but this run's "
                              f"model is of family {fam.name!r}")
    saved, mine = index["model"], json.loads(json.dumps(fam.config_to_dict(cfg)))  # as saved
    for field in fam.shape_fields:
        if saved.get(field) != mine.get(field):
            raise CheckpointError(f"{path}: saved for model.{field}={saved.get(field)!r}, but "
                                  f"this run has model.{field}={mine.get(field)!r}")


def model_changes(index: dict, cfg) -> dict[str, tuple]:
    """Every model-config field whose value in the checkpoint differs from ``cfg``'s, as
    ``{field: (saved, now)}``. The whole config is compared in its JSON form (as its family
    records it), so a field a config gains is covered with no list to keep up to date."""
    saved = index.get("model") or {}
    mine = json.loads(json.dumps(models.family_of(cfg).config_to_dict(cfg)))
    return {k: (saved.get(k), mine.get(k)) for k in sorted(saved.keys() | mine.keys())
            if saved.get(k) != mine.get(k)}


def load_params(path: str, cfg, mesh: Mesh, *, device=None
                ) -> dict[str, torch.Tensor]:
    """This rank's parameter pieces under ``mesh.plan``, from a checkpoint of any plan."""
    index = read_index(path)
    check_model(index, cfg, path)
    return _load_group(_Reader(path, index), "params/", cfg, mesh, _params_sharded(mesh.plan),
                       device)


def _load_group(reader: _Reader, prefix: str, cfg, mesh: Mesh, sharded: bool, device):
    plan, c = mesh.plan, mesh.coords
    out = {}
    for k, lay in pipeline.local_layouts(model_layouts(plan, cfg), cfg, plan, c["pp"]).items():
        offset, size = piece_rect(lay, plan, c, sharded)
        t = reader.read(prefix + k, offset, size)
        if sharded and t.shape[0] < lay.shard_shape[0]:  # restore ZeRO padding rows
            t = torch.cat([t, t.new_zeros((lay.shard_shape[0] - t.shape[0], *t.shape[1:]))])
        out[k] = t.to(device) if device is not None else t
    return out


def load_state(path: str, cfg, optimizer, mesh: Mesh, *, device=None
               ) -> tuple[train.TrainState, dict]:
    """The sharded TrainState for ``mesh.plan`` and the saved loader state."""
    index = read_index(path)
    check_model(index, cfg, path)
    reader = _Reader(path, index)
    plan = mesh.plan
    params = _load_group(reader, "params/", cfg, mesh, _params_sharded(plan), device)
    mu = _load_group(reader, "opt/mu/", cfg, mesh, _opt_sharded(plan), device)
    nu = _load_group(reader, "opt/nu/", cfg, mesh, _opt_sharded(plan), device)
    s = index["scalars"]
    dev = next(iter(params.values())).device
    opt = optimizer.init(mu)._replace(
        mu=mu, nu=nu, count=torch.tensor(s["opt_count"], dtype=torch.int64, device=dev),
        skipped=torch.tensor(s["opt_skipped"], dtype=torch.int64, device=dev))
    state = train.TrainState(torch.tensor(s["step"], dtype=torch.int64, device=dev), params, opt,
                             _scaler_state(s, dev))
    return state, index.get("loader") or {}


def _scaler_scalars(state: ScalerState | tuple) -> dict:
    """The float16 loss scaler's state as JSON scalars (an fp32 scale is exact as a double)."""
    if not state:
        return {}
    return {"loss_scale": float(state.scale), "scaler_growth_step": int(state.growth_step),
            "scaler_hysteresis_step": int(state.hysteresis_step)}


def _scaler_state(scalars: dict, device) -> ScalerState | tuple:
    if "loss_scale" not in scalars:
        return ()
    return ScalerState(
        torch.tensor(scalars["loss_scale"], dtype=torch.float32, device=device),
        torch.tensor(scalars["scaler_growth_step"], dtype=torch.int64, device=device),
        torch.tensor(scalars["scaler_hysteresis_step"], dtype=torch.int64, device=device))


def resolve(path: str) -> str:
    """A checkpoint directory from a run directory (its latest complete checkpoint), a
    ``checkpoints`` directory, or a checkpoint directory itself."""
    if os.path.isfile(os.path.join(path, "index.json")):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        done = complete_checkpoints(root)
        if done:
            return done[-1][1]
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    raise CheckpointError(f"{path}: holds no complete evo checkpoint")


def export_hf(path: str, out_dir: str, *, dtype: torch.dtype | None = None,
              overwrite: bool = False) -> str:
    """Write the params of a checkpoint (saved by any plan) as an HF LLaMA directory."""
    from evo import hf
    from evo.sharding.plan import Plan
    ckpt = resolve(path)
    index = read_index(ckpt)
    cfg = model_config(index, ckpt)
    params = load_params(ckpt, cfg, Mesh(Plan().resolve(1), 0))
    hf.save_hf(cfg, params, out_dir, dtype=dtype, overwrite=overwrite)
    return ckpt
