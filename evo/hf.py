"""Hugging Face checkpoint files: ``config.json`` + safetensors, in transformers' LLaMA layout.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or the shards
``model-0000i-of-0000n.safetensors`` listed by ``model.safetensors.index.json`` — what
``LlamaForCausalLM.save_pretrained`` writes and ``from_pretrained`` reads. InternLM2 checkpoints
(``InternLM2ForCausalLM``: packed ``wqkv``, ``feed_forward.w1/w3/w2``) are read as well.

Tensor names, shapes and the ``[in, out]`` ↔ ``[out, in]`` transposes all come from
``llama.export_params`` / ``llama.import_params``; this module only moves bytes and config keys.

    cfg, params = load_hf("hf/llama")                 # (llama.Config, dict[str, Tensor])
    save_hf(cfg, params, "hf/llama_ft", dtype=torch.bfloat16, max_shard_bytes=5 * 2**30)
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

from evo.models import llama

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Defaults transformers' LlamaConfig uses for keys a config.json may leave out.
_HF_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
                "initializer_range": 0.02, "tie_word_embeddings": False}


# ---------------------------------------------------------------------------------------------
# config.json

def config_to_hf(cfg: llama.Config, *, dtype: torch.dtype = torch.float32) -> dict:
    """``cfg`` as a transformers ``LlamaConfig`` config.json dict; ``dtype``: the weights' dtype,
    recorded as ``torch_dtype``. Uses the ``rope_theta`` / ``rope_scaling`` spellings, which
    transformers 4.x reads and 5.x converts to ``rope_parameters``."""
    rs = cfg.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if rs is None else {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        },
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "torch_dtype": _dtype_name(dtype),
    }


def config_from_hf(d: dict, *, source: str = CONFIG_FILE) -> llama.Config:
    """A LLaMA or InternLM2 config.json dict → ``llama.Config``. Reads transformers 4.x
    (``rope_theta``, ``rope_scaling``) and 5.x (``rope_parameters``) spellings. Raises ValueError
    naming ``source`` and the key for missing keys and for features evo does not implement
    (biases, activations other than SiLU, rope scaling other than "llama3")."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")

    def need(key: str):
        if d.get(key) is None:
            raise ValueError(f"{source}: required key {key!r} is missing")
        return d[key]

    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act={act!r} is not supported (evo's MLP is SwiGLU)")
    for key in ("attention_bias", "mlp_bias", "bias"):   # "bias": InternLM2's spelling
        if d.get(key):
            raise ValueError(f"{source}: {key}={d[key]!r} is not supported (evo has no biases)")
    rope_theta, rope_scaling = _rope_from_hf(d, source)

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv_heads, head_dim = d.get("num_key_value_heads"), d.get("head_dim")
    # Spell the defaults as None, so that config_from_hf(config_to_hf(cfg)) == cfg.
    if kv_heads == heads:
        kv_heads = None
    if (head_dim is not None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0
            and hidden % heads == 0 and head_dim == hidden // heads):
        head_dim = None
    try:
        return llama.Config(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            intermediate_size=need("intermediate_size"),
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=float(_get(d, "rms_norm_eps")),
            tie_embeddings=bool(_get(d, "tie_word_embeddings")),
            init_std=float(_get(d, "initializer_range")),
            max_seq_len=_get(d, "max_position_embeddings"),
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None


def _get(d: dict, key: str):
    v = d.get(key)
    return _HF_DEFAULTS[key] if v is None else v


def _rope_from_hf(d: dict, source: str) -> tuple[float, llama.RopeScaling | None]:
    """(rope_theta, rope_scaling) from either ``rope_scaling`` + ``rope_theta`` or
    ``rope_parameters`` (which carries its own ``rope_theta``)."""
    if d.get("rope_scaling") is not None:
        key, rope = "rope_scaling", d["rope_scaling"]
    else:
        key, rope = "rope_parameters", d.get("rope_parameters") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{source}: {key}={rope!r} is not supported (evo reads one flat dict "
                         "with rope_type 'llama3', or none)")
    theta = rope.get("rope_theta", _get(d, "rope_theta"))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{source}: {key} type {kind!r} is not supported (evo implements "
                         "'llama3' scaling, or none)")
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        if rope.get(k) is None:
            raise ValueError(f"{source}: {key}.{k} is missing (required for rope_type 'llama3')")
    try:
        return theta, llama.RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=rope.get("original_max_position_embeddings",
                                                      _get(d, "max_position_embeddings")))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {key}: {e}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype!r}") from None


# ---------------------------------------------------------------------------------------------
# Writing

def save_hf(cfg: llama.Config, params: dict[str, torch.Tensor], out_dir: str | os.PathLike, *,
            dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
            overwrite: bool = False) -> Path:
    """Write ``params`` as a transformers LLaMA checkpoint: ``out_dir/config.json`` and
    ``model.safetensors``, or shards of at most ``max_shard_bytes`` each (a larger tensor gets a
    shard of its own) with ``model.safetensors.index.json``.

    ``dtype``: cast the weights (default: keep the params' dtype). The directory appears whole or
    not at all: files are written to a temporary directory beside ``out_dir`` and renamed into
    place. An existing non-empty ``out_dir`` is an error unless ``overwrite``, in which case it is
    replaced only once the new directory is complete. Returns ``out_dir`` as a Path."""
    out = Path(out_dir)
    _check_params(cfg, params)
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int)
                                        or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes must be a positive integer or None, got "
                         f"{max_shard_bytes!r}")
    if dtype is not None:
        _dtype_name(dtype)
    state = {k: (t.detach().to("cpu", dtype=dtype) if dtype is not None else t.detach().to("cpu")
                 ).contiguous() for k, t in llama.export_params(cfg, params, "hf").items()}
    saved_dtype = dtype or state["model.embed_tokens.weight"].dtype
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


def _check_params(cfg: llama.Config, params: dict[str, torch.Tensor]) -> None:
    specs = llama.param_specs(cfg)
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

def load_hf(path: str | os.PathLike, *, layout: str = "auto", dtype: torch.dtype | None = torch.float32
            ) -> tuple[llama.Config, dict[str, torch.Tensor]]:
    """Read a checkpoint directory → ``(cfg, params)`` in evo's layout, tensors cast to ``dtype``
    (None keeps the stored dtype).

    ``layout``: "hf" (transformers LLaMA), "internlm2", or "auto" — InternLM2 when config.json's
    ``architectures`` / ``model_type`` say so or the tensors include ``attention.wqkv``. Raises
    ValueError naming the file (and tensor) for a missing directory, config.json or shard, an
    unreadable (e.g. truncated) safetensors file, or a tensor missing or shaped unlike the config.
    Tensors the model does not use (e.g. rotary buffers) are ignored."""
    root = Path(path)
    if layout not in ("auto", *llama.LAYOUTS):
        raise ValueError(f"layout must be one of {['auto', *llama.LAYOUTS]}, got {layout!r}")
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
    cfg = config_from_hf(raw, source=str(config_path))

    where, listing = _tensor_files(root)          # tensor name -> file holding it
    if layout == "auto":
        layout = "internlm2" if _looks_internlm2(raw, where) else "hf"
    # The names and shapes the config expects, from the one name map (meta tensors: no memory).
    expected = llama.export_params(cfg, llama.init(cfg, device="meta"), layout)
    state: dict[str, torch.Tensor] = {}
    for name in expected:
        if name not in where:
            raise ValueError(f"{listing}: tensor {name!r} is missing (layout {layout!r})")
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(where[name], []).append(name)
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
    return cfg, llama.import_params(cfg, state, layout, source=str(root))


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


def _looks_internlm2(raw: dict, where: dict[str, Path]) -> bool:
    archs = raw.get("architectures") or []
    if any("internlm2" in str(a).lower() for a in archs) or raw.get("model_type") == "internlm2":
        return True
    return any(name.endswith("attention.wqkv.weight") for name in where)


def convert_internlm2_to_hf(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                            dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
                            overwrite: bool = False) -> Path:
    """An InternLM2 checkpoint directory → a transformers LLaMA one (``wqkv`` split into q/k/v,
    ``w1/w3/w2`` renamed), keeping the stored dtype unless ``dtype`` is given."""
    cfg, params = load_hf(src_dir, layout="internlm2", dtype=None)
    return save_hf(cfg, params, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                   overwrite=overwrite)
