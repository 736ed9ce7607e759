"""Hugging Face checkpoint files: ``config.json`` + safetensors, in each model family's HF layout.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or the shards
``model-0000i-of-0000n.safetensors`` listed by ``model.safetensors.index.json`` — what
``save_pretrained`` writes and ``from_pretrained`` reads. config.json's ``architectures`` chooses
the model family (``evo.models``); an architecture no family reads is an error naming the ones
that are.

Tensor names, shapes and the ``[in, out]`` ↔ ``[out, in]`` transposes all come from the family
(``to_hf`` / ``from_hf``); this module only moves bytes and chooses the family.

    cfg, params = load_hf("hf/base")                  # (the family's Config, dict[str, Tensor])
    save_hf(cfg, params, "hf/finetuned", dtype=torch.bfloat16, max_shard_bytes=5 * 2**30)
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from evo import models

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---------------------------------------------------------------------------------------------
# config.json

def config_to_hf(cfg, *, dtype: torch.dtype = torch.float32) -> dict:
    """``cfg`` as its family's transformers config.json dict; ``dtype``: the weights' dtype,
    recorded as ``torch_dtype``."""
    return _hf_family(cfg).config_to_hf(cfg, dtype_name=_dtype_name(dtype))


def _hf_family(cfg) -> models.Family:
    fam = models.family_of(cfg)
    if not fam.hf_architectures:
        mapped = [n for n in models.names() if models.get(n).hf_architectures]
        raise ValueError(f"model family {fam.name!r} has no HF mapping (families with one: "
                         f"{', '.join(mapped)})")
    return fam


def family_from_hf(d: dict, *, source: str = CONFIG_FILE) -> models.Family:
    """The family that reads a config.json dict: by ``architectures``, else by ``model_type``.
    Raises ValueError naming ``source``, the architecture and the supported ones."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    archs = d.get("architectures") or []
    if not isinstance(archs, list):
        raise ValueError(f"{source}: architectures={archs!r} is not a list of class names")
    for arch in archs:
        fam = models.for_architecture(arch)
        if fam is not None:
            return fam
    if not archs and d.get("model_type") is not None:
        for name in models.names():
            if models.get(name).hf_model_type == d["model_type"]:
                return models.get(name)
    what = f"architecture {archs[0]!r}" if archs else f"model_type {d.get('model_type')!r}"
    raise ValueError(f"{source}: {what} is not supported; evo reads "
                     f"{', '.join(models.hf_architectures())}")


def config_from_hf(d: dict, *, source: str = CONFIG_FILE):
    """A config.json dict → the Config of the family its ``architectures`` name. Raises
    ValueError naming ``source`` and the key for missing keys and for features the family does
    not implement."""
    return family_from_hf(d, source=source).config_from_hf(d, source=source)


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype!r}") from None


# ---------------------------------------------------------------------------------------------
# Writing

def save_hf(cfg, params: dict[str, torch.Tensor], out_dir: str | os.PathLike, *,
            dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
            overwrite: bool = False) -> Path:
    """Write ``params`` as a transformers checkpoint of the config's family: ``out_dir/config.json`` and
    ``model.safetensors``, or shards of at most ``max_shard_bytes`` each (a larger tensor gets a
    shard of its own) with ``model.safetensors.index.json``.

    ``dtype``: cast the weights (default: keep the params' dtype). The directory appears whole or
    not at all: files are written to a temporary directory beside ``out_dir`` and renamed into
    place. An existing non-empty ``out_dir`` is an error unless ``overwrite``, in which case it is
    replaced only once the new directory is complete. Returns ``out_dir`` as a Path."""
    out = Path(out_dir)
    fam = _hf_family(cfg)
    _check_params(cfg, params)
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int)
                                        or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes must be a positive integer or None, got "
                         f"{max_shard_bytes!r}")
    if dtype is not None:
        _dtype_name(dtype)
    state = {k: (t.detach().to("cpu", dtype=dtype) if dtype is not None else t.detach().to("cpu")
                 ).contiguous() for k, t in fam.to_hf(cfg, params).items()}
    saved_dtype = dtype or next(iter(state.values())).dtype
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out}: already exists and is not empty; pass overwrite=True to replace "
                         "it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()                       # (not tempfile.mkdtemp: its 0700 mode would stick)
    try:
        written = [tmp / CONFIG_FILE]
        written[0].write_text(json.dumps(config_to_hf(cfg, dtype=saved_dtype), indent=2) + "\n")
        shards = _split_shards(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            written.append(tmp / WEIGHTS_FILE)
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({k: state[k] for k in names}, tmp / fname, metadata={"format": "pt"})
                written.append(tmp / fname)
                weight_map.update(dict.fromkeys(names, fname))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            written.append(tmp / INDEX_FILE)
        mode = stat.S_IMODE(written[0].stat().st_mode)  # as the umask gives; safetensors: 0600
        for f in written:
            f.chmod(mode)
            _fsync(f)
        _fsync(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out.parent)
    return out


def _check_params(cfg, params: dict[str, torch.Tensor]) -> None:
    specs = models.param_specs(cfg)
    missing = [k for k in specs if k not in params]
    if missing:
        raise ValueError(f"params lack {len(missing)} tensor(s) the config needs, e.g. "
                         f"{missing[0]!r}")
    extra = [k for k in params if k not in specs]
    if extra:
        raise ValueError(f"params hold {len(extra)} tensor(s) the config does not, e.g. "
                         f"{extra[0]!r}")
    for k, spec in specs.items():
        if tuple(params[k].shape) != spec.shape:
            raise ValueError(f"param {k!r} has shape {tuple(params[k].shape)}, the config expects "
                             f"{spec.shape}")


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """Tensor names grouped greedily, in order, into shards of at most ``max_bytes``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


# ---------------------------------------------------------------------------------------------
# Reading

def read_config(path: str | os.PathLike):
    """The model config of a checkpoint directory's config.json, in the family its
    ``architectures`` name; reads no tensor. ValueError naming the file as ``load_hf``'s."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: no such checkpoint directory")
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing; a checkpoint directory holds config.json beside "
                         "its safetensors files")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    return config_from_hf(raw, source=str(config_path))


def load_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32):
    """Read a checkpoint directory → ``(cfg, params)`` in evo's layout, tensors cast to ``dtype``
    (None keeps the stored dtype); config.json's ``architectures`` chooses the family.

    Raises ValueError naming the file (and tensor) for a missing directory, config.json or shard,
    an architecture no family reads, an unreadable (e.g. truncated) safetensors file, or a tensor
    missing or shaped unlike the config. Tensors the model does not use (e.g. rotary buffers) are
    ignored."""
    root = Path(path)
    cfg = read_config(root)
    fam = models.family_of(cfg)
    where, listing = _tensor_files(root)          # tensor name -> file holding it
    # The names and shapes the config expects, from the family's map (meta tensors: no memory).
    expected = fam.hf_read_names(cfg, set(where))
    for name in expected:
        if name not in where:
            raise ValueError(f"{listing}: tensor {name!r} is missing (family {fam.name!r})")
    state = _read_tensors(where, listing, expected, dtype)
    return cfg, fam.from_hf(cfg, state, source=str(root))


def _read_tensors(where: dict[str, Path], listing: Path, expected: dict[str, torch.Tensor],
                  dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(where[name], []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with _open_safetensors(file) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ValueError(f"{file}: tensor {name!r} is missing (listed in {listing})")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name].shape):
                    raise ValueError(f"{file}: tensor {name!r} has shape {shape}, the config "
                                     f"expects {tuple(expected[name].shape)}")
                t = f.get_tensor(name)
                state[name] = t if dtype is None else t.to(dtype)
    return state


def _tensor_files(root: Path) -> tuple[dict[str, Path], Path]:
    """Every tensor name → the file holding it, and the file that lists them (for errors)."""
    index_path, single = root / INDEX_FILE, root / WEIGHTS_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: not a safetensors index ({e!r})") from None
        where = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or Path(fname).name != fname:
                raise ValueError(f"{index_path}: tensor {name!r} maps to {fname!r}, not a file "
                                 "name in this directory")
            shard = root / fname
            if not shard.is_file():
                raise ValueError(f"{shard}: shard file is missing (listed in {index_path} for "
                                 f"tensor {name!r})")
            where[name] = shard
        return where, index_path
    if single.is_file():
        with _open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single), single
    raise ValueError(f"{root}: holds neither {WEIGHTS_FILE} nor {INDEX_FILE} (only safetensors "
                     "checkpoints are read)")


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt? ({e})"
                         ) from None


def convert_hf(src_dir: str | os.PathLike, out_dir: str | os.PathLike, family: str, *,
               dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
               overwrite: bool = False) -> Path:
    """An HF checkpoint directory → one in another family's HF layout (e.g. InternLM2 →
    transformers LLaMA), keeping the stored dtype unless ``dtype`` is given. The two families
    must hold the same parameters for the same config fields."""
    cfg, params = load_hf(src_dir, dtype=None)
    target = models.get(family)
    try:
        new = target.config_from_dict(models.family_of(cfg).config_to_dict(cfg))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{src_dir}: its {models.family_of(cfg).name!r} config is not a "
                         f"{family!r} config ({e})") from None
    if {k: s.shape for k, s in models.param_specs(new).items()} != \
            {k: tuple(v.shape) for k, v in params.items()}:
        raise ValueError(f"{src_dir}: a {family!r} model holds other parameters than this "
                         f"{models.family_of(cfg).name!r} one")
    return save_hf(new, params, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                   overwrite=overwrite)
