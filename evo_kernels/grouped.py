"""Grouped matrix multiply: the expert GEMM of a mixture-of-experts layer.

``grouped_mm(x, w, counts)``: ``x [M, K]`` holds rows grouped by expert (the first ``counts[0]``
rows belong to expert 0, the next ``counts[1]`` to expert 1, ...), ``w [G, K, N]`` one matrix per
expert; row r of the result is ``x[r] @ w[g(r)]``, ``[M, N]``. Two implementations of that op:

- ``"loop"``: the reference, one matmul per expert (any device, dtype and transform);
- ``"grouped"``: all experts in one ``torch._grouped_mm`` call (CPU for float32 / bfloat16 /
  float16, CUDA for bfloat16 on compute capability 9.0+), when the inner and outer sizes keep every
  row 16-byte aligned;

``"auto"`` takes ``"grouped"`` where it applies and the loop elsewhere (also inside ``torch.func``
transforms, which ``torch._grouped_mm`` has no rules for).
"""
from __future__ import annotations

import torch


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, backend: str = "auto"
               ) -> torch.Tensor:
    """``[M, K] x [G, K, N] -> [M, N]``, rows grouped by ``counts [G]`` (int, sum M)."""
    if backend not in ("auto", "grouped", "loop"):
        raise ValueError(f"grouped_mm backend must be 'auto', 'grouped' or 'loop', got {backend!r}")
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or counts.shape != w.shape[:1]:
        raise ValueError(f"grouped_mm: x [M, K], w [G, K, N], counts [G] expected, got "
                         f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(counts.shape)}")
    if backend == "loop" or (backend == "auto" and not grouped_supported(x, w)):
        return grouped_mm_loop(x, w, counts)
    if not grouped_supported(x, w):
        raise ValueError(f"grouped_mm: torch._grouped_mm does not take {x.dtype} {tuple(x.shape)} "
                         f"x {tuple(w.shape)} on {x.device}")
    offs = counts.cumsum(0).to(torch.int32)
    return _ContiguousGrad.apply(torch._grouped_mm(x.contiguous(), w.contiguous(), offs=offs))


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The reference: one ``x_g @ w[g]`` per expert, concatenated."""
    parts = x.split(counts.tolist())
    out = [p @ w[g] for g, p in enumerate(parts)]
    return torch.cat(out) if out else x.new_zeros(0, w.shape[2])


def grouped_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs this problem (device, dtype, alignment, no transform)."""
    if not hasattr(torch, "_grouped_mm") or x.shape[0] == 0 or x.dtype != w.dtype:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x) or \
            torch._C._functorch.is_functorch_wrapped_tensor(w):
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif x.device.type == "cuda":
        ok_dtype = (x.dtype == torch.bfloat16
                    and torch.cuda.get_device_capability(x.device) >= (9, 0))
    else:
        return False
    size = x.element_size()
    return ok_dtype and (w.shape[1] * size) % 16 == 0 and (w.shape[2] * size) % 16 == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``torch._grouped_mm``'s
    CPU backward rejects broadcast gradients such as that of ``y.sum()``)."""

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()
