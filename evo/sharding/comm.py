"""Collectives over mesh axes, differentiable where the step needs them, with byte accounting.

Every collective goes through ``Comm``, which knows the process group of each mesh axis and counts
the bytes it hands to each collective kind on each axis (the size of the input tensor: what a
researcher can compare with an analytic model; link-level traffic depends on the algorithm).

The autograd Functions here call the raw functional collectives (``torch.ops._c10d_functional``,
traceable by torch.compile) and override ``setup_context``, so ``torch.func`` transforms accept
them too (see stack-facts: torch's own wrappers are rejected by ``torch.func.grad``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

_c10d = torch.ops._c10d_functional


@dataclass
class CommLog:
    """Bytes handed to collectives, and how many collectives, keyed ``"{kind}/{axis}"``; one log
    per step call."""
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, axis: str, t: torch.Tensor) -> None:
        self.bytes[f"{kind}/{axis}"] += t.numel() * t.element_size()
        self.calls[f"{kind}/{axis}"] += 1


@dataclass(frozen=True)
class Comm:
    """Process groups by mesh axis name (``None`` or size 1: nothing to communicate) and the log."""
    groups: dict
    sizes: dict
    log: CommLog

    def size(self, axis: str) -> int:
        return self.sizes.get(axis, 1)

    def all_reduce(self, x: torch.Tensor, axis: str, op: str = "sum") -> torch.Tensor:
        if self.size(axis) == 1:
            return x
        self.log.add("all_reduce", axis, x)
        return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), op, self.groups[axis].group_name))

    def all_gather(self, x: torch.Tensor, axis: str, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim``."""
        n = self.size(axis)
        if n == 1:
            return x
        self.log.add("all_gather", axis, x)
        src = x.movedim(dim, 0).contiguous() if dim else x.contiguous()
        out = _c10d.wait_tensor(_c10d.all_gather_into_tensor(src, n, self.groups[axis].group_name))
        return out.movedim(0, dim) if dim else out

    def reduce_scatter(self, x: torch.Tensor, axis: str, dim: int = 0) -> torch.Tensor:
        """Sum over ranks, each keeping its 1/n chunk along ``dim``."""
        n = self.size(axis)
        if n == 1:
            return x
        self.log.add("reduce_scatter", axis, x)
        src = x.movedim(dim, 0).contiguous() if dim else x.contiguous()
        out = _c10d.wait_tensor(_c10d.reduce_scatter_tensor(src, "sum", n,
                                                            self.groups[axis].group_name))
        return out.movedim(0, dim) if dim else out


class Pending(NamedTuple):
    """A collective started with ``launch_*``: its output (valid after ``wait``), its work handle,
    and its input, kept alive until the collective is done."""
    out: torch.Tensor
    work: object
    source: torch.Tensor


# torch 2.13 renamed the tensor-in, tensor-out collectives; 2.11 has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or \
    dist.reduce_scatter_tensor


def launch_all_reduce(comm: Comm, x: torch.Tensor, axis: str) -> Pending:
    """Start a sum all-reduce, in place on ``x`` (a buffer of the caller's own), and return at
    once; ``wait`` gives the result."""
    comm.log.add("all_reduce", axis, x)
    return Pending(x, dist.all_reduce(x, group=comm.groups[axis], async_op=True), x)


def launch_reduce_scatter(comm: Comm, x: torch.Tensor, axis: str) -> Pending:
    """Start a reduce-scatter along dim 0 and return at once; ``wait`` gives the result."""
    comm.log.add("reduce_scatter", axis, x)
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // comm.size(axis), *x.shape[1:]))
    return Pending(out, _reduce_scatter_single(out, x, group=comm.groups[axis], async_op=True), x)


def launch_all_gather(comm: Comm, x: torch.Tensor, axis: str) -> Pending:
    """Start an all-gather along dim 0 and return at once; ``wait`` gives the result."""
    comm.log.add("all_gather", axis, x)
    x = x.contiguous()
    out = x.new_empty((x.shape[0] * comm.size(axis), *x.shape[1:]))
    return Pending(out, _all_gather_single(out, x, group=comm.groups[axis], async_op=True), x)


def wait(p: Pending) -> torch.Tensor:
    p.work.wait()
    return p.out


def chunk(x: torch.Tensor, n: int, i: int, dim: int = 0) -> torch.Tensor:
    return x.chunk(n, dim)[i] if n > 1 else x


# -------------------------------------------------------------------------- autograd Function
# Megatron's parallel regions as conjugate pairs: what forward does, backward does the transpose
# of (identity <-> all-reduce, all-gather <-> reduce-scatter, split <-> all-gather).

def _run(op: str, x: torch.Tensor, comm: Comm, axis: str, dim: int, index: int) -> torch.Tensor:
    if op == "identity":
        return x.view_as(x)
    if op == "all_reduce":
        return comm.all_reduce(x, axis)
    if op == "all_gather":
        return comm.all_gather(x, axis, dim)
    if op == "reduce_scatter":
        return comm.reduce_scatter(x, axis, dim)
    if op == "split":
        return chunk(x, comm.size(axis), index, dim).contiguous()
    raise ValueError(f"unknown region op {op!r}")


class _Region(torch.autograd.Function):
    """Forward ``fwd`` over ``axis`` (or the result of a collective started earlier,
    ``pending``), backward ``bwd``."""
    @staticmethod
    def forward(x, comm, axis, dim, index, fwd, bwd, pending):
        return wait(pending) if pending is not None else _run(fwd, x, comm, axis, dim, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.comm, ctx.axis, ctx.dim, ctx.index, _, ctx.bwd, _ = inputs

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            return (_run(ctx.bwd, g.detach(), ctx.comm, ctx.axis, ctx.dim, ctx.index),
                    *([None] * 7))


def _region(x, comm: Comm, axis: str, fwd: str, bwd: str, dim: int = 0, index: int = 0,
            pending: Pending | None = None):
    return x if comm.size(axis) == 1 else _Region.apply(x, comm, axis, dim, index, fwd, bwd,
                                                        pending)


def copy_to(x, comm: Comm, axis: str):
    """Replicated input enters a region where each rank computes a different part."""
    return _region(x, comm, axis, "identity", "all_reduce")


def reduce_from(x, comm: Comm, axis: str):
    """Partial results leave a region summed."""
    return _region(x, comm, axis, "all_reduce", "identity")


def gather_from(x, comm: Comm, axis: str, dim: int, pending: Pending | None = None):
    return _region(x, comm, axis, "all_gather", "reduce_scatter", dim, pending=pending)


def scatter_to(x, comm: Comm, axis: str, dim: int):
    return _region(x, comm, axis, "reduce_scatter", "all_gather", dim)


def split_to(x, comm: Comm, axis: str, dim: int, index: int):
    """Keep this rank's chunk of a replicated input along ``dim``."""
    return _region(x, comm, axis, "split", "all_gather", dim, index)
