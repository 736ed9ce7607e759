"""The params hand-off to JAX: an evo checkpoint's parameters as an Orbax checkpoint, and back.

``export(path, out_dir)`` writes ``out_dir`` with orbax's ``CompositeCheckpointHandler``, two items:

- ``params``: a ``StandardSave`` of the parameters as a nested dict, the dotted names split at the
  dots (``"layers.0.attn.wqkv"`` -> ``params["layers"]["0"]["attn"]["wqkv"]``), each a numpy
  array of the global logical shape, float32 or bfloat16 (``ml_dtypes.bfloat16``, JAX's own);
- ``evo``: a ``JsonSave`` of ``{"format", "dtype", "family": the model family's name, "model": its
  config, "axes": {dotted name: [logical axis per dimension]}}``, so a JAX program can shard the arrays by the same axes.

A JAX program needs only orbax to read it::

    import orbax.checkpoint as ocp
    params = ocp.StandardCheckpointer().restore(f"{out_dir}/params")
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(f"{out_dir}/evo")

``load(out_dir)`` reads one back as ``(config, {dotted name: tensor})`` (``init_from`` accepts such a
directory). orbax-checkpoint is an optional extra (``pip install -e '.[orbax]'``), imported only
here and only when called. Single process only: orbax coordinates several writers through
``jax.distributed``, which torch processes do not join, so call this from one process.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from evo import models

FORMAT = "evo params for orbax, v1"
PARAMS_ITEM, META_ITEM = "params", "evo"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class OrbaxError(ValueError):
    """A missing orbax installation or a directory that is not an evo Orbax export."""


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise OrbaxError("the Orbax hand-off needs orbax-checkpoint: pip install -e '.[orbax]'") \
            from None
    return ocp


def is_export(path: str) -> bool:
    """Whether ``path`` looks like a directory ``export`` wrote (cheap; imports nothing)."""
    return (os.path.isdir(os.path.join(path, PARAMS_ITEM))
            and os.path.isdir(os.path.join(path, META_ITEM)))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes  # installed with orbax (JAX's dtypes)
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def nest(flat: dict[str, object]) -> dict:
    """``{"a.b": x}`` -> ``{"a": {"b": x}}``."""
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """The inverse of ``nest``."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def save(cfg, params: dict[str, torch.Tensor], out_dir: str, *,
         dtype: str = "float32", overwrite: bool = False) -> None:
    """Write ``params`` (global, dotted names as the family's ``param_specs``) under ``out_dir``."""
    from evo import checkpoint
    if dtype not in _DTYPES:
        raise OrbaxError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    axes = models.axes(cfg)
    if sorted(params) != sorted(axes):
        raise OrbaxError(f"params and model config disagree on names, e.g. "
                         f"{sorted(set(params) ^ set(axes))[:1]}")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise OrbaxError(f"{out_dir}: already exists and is not empty; pass --overwrite to "
                         "replace it")
    ocp = _orbax()
    arrays = nest({k: _to_numpy(v.to(_DTYPES[dtype])) for k, v in params.items()})
    meta = {"format": FORMAT, "dtype": dtype, **checkpoint.model_record(cfg),
            "axes": {k: list(a) for k, a in axes.items()}}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(os.path.abspath(out_dir), force=overwrite,
                   args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(arrays),
                                              META_ITEM: ocp.args.JsonSave(meta)}))


def load(path: str, *, dtype: torch.dtype | None = torch.float32
         ) -> tuple[object, dict[str, torch.Tensor]]:
    """``(config, {dotted name: tensor})`` from a directory ``save`` wrote; ``dtype=None`` keeps
    the stored dtype."""
    from evo import checkpoint
    if not is_export(path):
        raise OrbaxError(f"{path}: not an evo Orbax export (no {PARAMS_ITEM}/ and {META_ITEM}/ "
                         "items)")
    ocp = _orbax()
    path = os.path.abspath(path)
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        meta = ckptr.restore(os.path.join(path, META_ITEM))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OrbaxError(f"{path}/{META_ITEM}: format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                         f"expected {FORMAT!r}")
    cfg = checkpoint.model_config(meta, path)
    with ocp.StandardCheckpointer() as ckptr:
        arrays = flatten(ckptr.restore(os.path.join(path, PARAMS_ITEM)))
    params = {k: _to_torch(a) for k, a in arrays.items()}
    for k, spec in models.param_specs(cfg).items():
        if k not in params or tuple(params[k].shape) != spec.shape:
            raise OrbaxError(f"{path}: param {k!r} is missing or not of shape {spec.shape}")
    return cfg, params if dtype is None else {k: v.to(dtype) for k, v in params.items()}


def export(path: str, out_dir: str, *, dtype: str = "float32", overwrite: bool = False) -> str:
    """Write the params of an evo checkpoint (a run directory's latest, or a checkpoint saved by
    any plan) as an Orbax checkpoint under ``out_dir``; returns the checkpoint read."""
    from evo import checkpoint
    from evo.sharding import Plan
    from evo.sharding.mesh import Mesh
    _orbax()  # say what to install before reading anything
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint.model_config(checkpoint.read_index(ckpt), ckpt)
    params = checkpoint.load_params(ckpt, cfg, Mesh(Plan().resolve(1), 0))
    save(cfg, params, out_dir, dtype=dtype, overwrite=overwrite)
    return ckpt
