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

import torch
import torch.distributed as dist

_c10d = torch.ops._c10d_functional


@dataclass
class CommLog:
    """Bytes handed to collectives, keyed ``"{kind}/{axis}"``; one log per step call."""
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, axis: str, t: torch.Tensor) -> None:
        self.bytes[f"{kind}/{axis}"] += t.numel() * t.element_size()


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


def launch_all_reduce(comm: Comm, x: torch.Tensor, axis: str) -> torch.Tensor:
    """Start an all-reduce and return at once; ``wait`` gives the result."""
    comm.log.add("all_reduce", axis, x)
    return _c10d.all_reduce(x.contiguous(), "sum", comm.groups[axis].group_name)


def launch_reduce_scatter(comm: Comm, x: torch.Tensor, axis: str) -> torch.Tensor:
    """Start a reduce-scatter along dim 0 and return at once; ``wait`` gives the result."""
    comm.log.add("reduce_scatter", axis, x)
    return _c10d.reduce_scatter_tensor(x.contiguous(), "sum", comm.size(axis),
                                       comm.groups[axis].group_name)


def wait(x: torch.Tensor) -> torch.Tensor:
    return _c10d.wait_tensor(x)


def chunk(x: torch.Tensor, n: int, i: int, dim: int = 0) -> torch.Tensor:
    return x.chunk(n, dim)[i] if n > 1 else x


# -------------------------------------------------------------------------- autograd Functions
# Each is the conjugate pair of Megatron's parallel regions: what forward does, backward does
# the transpose of.

class _CopyToRegion(torch.autograd.Function):
    """Forward identity, backward all-reduce: input replicated over ``axis`` enters a region
    where each rank computes a different part."""
    @staticmethod
    def forward(x, comm, axis):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.comm, ctx.axis = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            return ctx.comm.all_reduce(g.detach(), ctx.axis), None, None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduce (sum of partial results), backward identity."""
    @staticmethod
    def forward(x, comm, axis):
        return comm.all_reduce(x, axis)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _GatherFromRegion(torch.autograd.Function):
    """Forward all-gather along ``dim`` (or the result of one started earlier, ``pending``),
    backward reduce-scatter along it."""
    @staticmethod
    def forward(x, comm, axis, dim, pending):
        if pending is not None:
            return wait(pending)
        return comm.all_gather(x, axis, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.comm, ctx.axis, ctx.dim = inputs[1], inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            return ctx.comm.reduce_scatter(g.detach(), ctx.axis, ctx.dim), None, None, None, None


class _ScatterToRegion(torch.autograd.Function):
    """Forward reduce-scatter along ``dim``, backward all-gather along it."""
    @staticmethod
    def forward(x, comm, axis, dim):
        return comm.reduce_scatter(x, axis, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.comm, ctx.axis, ctx.dim = inputs[1], inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            return ctx.comm.all_gather(g.detach(), ctx.axis, ctx.dim), None, None, None


class _SplitToRegion(torch.autograd.Function):
    """Forward: keep this rank's chunk along ``dim`` (input replicated); backward all-gather."""
    @staticmethod
    def forward(x, comm, axis, dim, index):
        return chunk(x, comm.size(axis), index, dim).contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.comm, ctx.axis, ctx.dim = inputs[1], inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            return ctx.comm.all_gather(g.detach(), ctx.axis, ctx.dim), None, None, None, None


def copy_to(x, comm: Comm, axis: str):
    return x if comm.size(axis) == 1 else _CopyToRegion.apply(x, comm, axis)


def reduce_from(x, comm: Comm, axis: str):
    return x if comm.size(axis) == 1 else _ReduceFromRegion.apply(x, comm, axis)


def gather_from(x, comm: Comm, axis: str, dim: int, pending: torch.Tensor | None = None):
    return x if comm.size(axis) == 1 else _GatherFromRegion.apply(x, comm, axis, dim, pending)


def launch_all_gather(comm: Comm, x: torch.Tensor, axis: str) -> torch.Tensor:
    """Start an all-gather along dim 0 and return at once; ``wait`` gives the result."""
    comm.log.add("all_gather", axis, x)
    return _c10d.all_gather_into_tensor(x.contiguous(), comm.size(axis),
                                        comm.groups[axis].group_name)


def scatter_to(x, comm: Comm, axis: str, dim: int):
    return x if comm.size(axis) == 1 else _ScatterToRegion.apply(x, comm, axis, dim)


def split_to(x, comm: Comm, axis: str, dim: int, index: int):
    return x if comm.size(axis) == 1 else _SplitToRegion.apply(x, comm, axis, dim, index)


def process_groups_ready() -> bool:
    return dist.is_available() and dist.is_initialized()
