"""Fused Triton kernels for the layers around the matmuls: RMSNorm (with the residual add), rotary
embedding, the SwiGLU activation and a chunked linear + cross-entropy.

Each op has a pure-torch twin ``*_reference`` that defines its result (and runs anywhere, with
gradients); the Triton version computes the same thing, forward and backward, through a
``torch.autograd.Function`` in the ``forward`` + ``setup_context`` style, so that
``torch.func.grad`` works through it (second derivatives are not implemented).

- ``rms_norm(x, weight, eps, residual=None)``: ``x [..., d]``, ``weight [d]``. Normalised in fp32,
  rounded to x's dtype, then scaled by ``weight``. With ``residual`` (shape and dtype of ``x``)
  ``h = x + residual`` is formed first and ``(rms_norm(h), h)`` is returned.
- ``apply_rope(x, cos, sin)``: rotate-half convention, ``x [batch, seq, heads, head_dim]``,
  ``cos``, ``sin`` ``[batch, seq, 1, head_dim]`` (halves repeated). cos and sin are constants.
- ``swiglu_act(gate, up)``: ``silu(gate) * up`` elementwise, any matching shapes.
- ``linear_cross_entropy(h, w, labels)``: ``h [tokens, d]``, ``w [d, vocab]``, ``labels [tokens]``
  int64; summed cross-entropy (fp32, 0-dim) over labelled tokens and their count (int64, 0-dim),
  without ever holding more than ``[chunk, vocab]`` logits.

On a machine without CUDA the kernels run on CPU tensors under Triton's interpreter: set
``TRITON_INTERPRET=1`` before triton is first imported (triton reads it as it defines a kernel, its
language's helpers included; importing torch._dynamo imports triton). Without triton this module
still imports; the ops then raise RuntimeError and the references keep working. The interpreter
rounds fp32 to bf16 by truncation where GPUs round to nearest, so its bf16 results differ from a
GPU's by up to one bf16 ulp per rounding.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the ops raise when called; the references need no triton
    triton = tl = None

# Triton fixes compiled or interpreted mode as it defines each jit function: for the language's own
# helpers (tl.sum, tl.max, ...) when triton is first imported (torch._dynamo and so transformers
# import it), for the kernels below when this module is. Kernels run only if both agree.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_LANGUAGE_INTERPRETED = triton is not None and not isinstance(tl.sum, triton.runtime.JITFunction)


def available() -> bool:
    """True when the kernels can run here: triton imports, and CUDA is present or
    ``TRITON_INTERPRET=1`` was set before triton and this module were imported (the interpreter
    runs them on CPU tensors)."""
    return (triton is not None and _INTERPRETED == _LANGUAGE_INTERPRETED
            and (torch.cuda.is_available() or _INTERPRETED))


def _jit(fn):
    # Without triton the kernels stay plain (never called) functions, so the module imports.
    return triton.jit(fn) if triton is not None else fn


def _require(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("evo_kernels.triton_ops needs triton (`pip install triton`); the "
                           "*_reference functions run without it")
    if _INTERPRETED != _LANGUAGE_INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported and before "
                           "evo_kernels.triton_ops was (or the other way round): set it before "
                           "either, e.g. before anything imports torch._dynamo or transformers")
    on_cpu = [t for t in tensors if t is not None and t.device.type != "cuda"]
    if on_cpu and not _INTERPRETED:
        raise RuntimeError(f"Triton kernels got a tensor on {on_cpu[0].device}: off CUDA they run "
                           "only under Triton's interpreter; set TRITON_INTERPRET=1 before "
                           "triton and evo_kernels.triton_ops are imported")


class _Backward(torch.autograd.Function):
    """Runs ``fn(*args)`` (a backward's kernels) as an op of its own. Inside ``torch.func.grad`` an
    autograd.Function's backward is handed wrapped tensors that a kernel cannot read, while a
    Function's forward always sees plain ones. Second derivatives are not implemented."""

    @staticmethod
    def forward(fn, *args):
        return fn(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("evo_kernels.triton_ops: second derivatives are not implemented")


# Elements one program holds in a [rows, cols] tile: the rows a program takes grow as the columns
# shrink, so short rows (a 64-wide head, a 300-wide hidden) still give each program real work.
_TILE = 8192


def _tile(rows: int, cols: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` for a row-wise kernel over ``[rows, cols]``; BLOCK_C covers
    all ``cols`` (a kernel that loops over columns passes the block width it wants)."""
    block_c = triton.next_power_of_2(cols)
    block_r = max(1, min(triton.next_power_of_2(rows), _TILE // block_c))
    return block_r, block_c, min(16, max(4, block_r * block_c // 1024))


def _max_programs(device: torch.device) -> int:
    """Programs for a persistent (grid-stride) kernel: two per SM, a few under the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ---------------------------------------------------------------------------------------------
# RMSNorm, with the fused residual add
# ---------------------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * (x * rsqrt(mean(x^2) + eps))`` with the normalisation in fp32 and rounded to x's
    dtype before the weight; ``(that of x + residual, x + residual)`` when ``residual`` is given."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return y if residual is None else (y, h)


@_jit
def _rms_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, rows, d, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (c < d)[None, :]
    offs = r.to(tl.int64)[:, None] * d + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # one rounding of the exact-in-fp32 sum, as torch adds two bf16 tensors
        res = tl.load(res_ptr + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / d + eps)
    normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + c, mask=c < d, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (w[None, :] * normed).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + r, rstd, mask=r < rows)


@_jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dh_ptr, dx_ptr, dw_part_ptr, rows, d,
                         HAS_DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Persistent: each program walks row tiles with a grid stride and keeps its share of dweight
    # in registers; the host sums the [programs, d] partials.
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + c, mask=c < d, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(rows, BLOCK_R), tl.num_programs(0)):
        r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (r < rows)[:, None] & (c < d)[None, :]
        offs = r.to(tl.int64)[:, None] * d + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=r < rows, other=0.0)
        xhat = xf * rstd[:, None]
        dw += tl.sum(dy * xhat.to(x.dtype).to(tl.float32), axis=0)
        # the gradient reaches the normalised x in x's dtype, as in the reference
        g = (dy * w[None, :]).to(x.dtype).to(tl.float32)
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / d)[:, None])
        if HAS_DH:
            dx += tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * d + c, dw, mask=c < d)


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, h, rstd [rows] fp32)``; ``h`` is x itself without a residual."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    rows = x2.shape[0]
    res2 = x2 if residual is None else residual.reshape(-1, d).contiguous()
    h2 = x2 if residual is None else torch.empty_like(x2)
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block_r, block_d, warps = _tile(rows, d)
    _rms_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
        x2, res2, weight.contiguous(), y, h2, rstd, rows, d, eps, HAS_RESIDUAL=residual is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return y.view(x.shape), h2.view(x.shape), rstd


def _rms_norm_bwd(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                  dh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)``; ``dh`` is the gradient reaching ``h`` directly (the residual stream)."""
    d = h.shape[-1]
    h2 = h.reshape(-1, d).contiguous()
    rows = h2.shape[0]
    dx = torch.empty_like(h2)
    block_r, block_d, warps = _tile(rows, d)
    programs = max(1, min(triton.cdiv(rows, block_r), _max_programs(h.device)))
    dw_part = torch.empty(programs, d, dtype=torch.float32, device=h.device)
    dh2 = dx if dh is None else dh.reshape(-1, d).contiguous()
    _rms_norm_bwd_kernel[(programs,)](
        dy.reshape(-1, d).contiguous(), h2, weight.contiguous(), rstd, dh2, dx, dw_part, rows, d,
        HAS_DH=dh is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return dx.view(h.shape), dw_part.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, eps):
        y, _, rstd = _rms_norm_fwd(x, weight, None, eps)
        return y, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _Backward.apply(_rms_norm_bwd, dy, x, weight, rstd, None)
        return dx, dw, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, residual, weight, eps):
        return _rms_norm_fwd(x, weight, residual, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, h, rstd = output
        ctx.save_for_backward(h, inputs[2], rstd)
        ctx.mark_non_differentiable(rstd)

    @staticmethod
    def backward(ctx, dy, dh, _drstd):
        h, weight, rstd = ctx.saved_tensors
        dx, dw = _Backward.apply(_rms_norm_bwd, dy, h, weight, rstd, dh)
        return dx, dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton ``rms_norm_reference``: ``y`` of x's shape in ``promote(x.dtype, weight.dtype)``, or
    ``(y, h = x + residual)`` with the add fused into the same pass."""
    _require(x, weight, residual)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected "
                         f"({x.shape[-1]},) to match x {tuple(x.shape)}")
    if residual is None:
        return _RMSNorm.apply(x, weight, eps)[0]
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
                         f"x {tuple(x.shape)} {x.dtype}")
    y, h, _ = _AddRMSNorm.apply(x, residual, weight, eps)
    return y, h


# ---------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------

def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@_jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, rows, heads, seq, half, stride_cb, stride_cs,
                 stride_cd, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    # Rows are (batch, seq, head) in order; every head of a token shares one cos/sin row.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_H)
    mask = (r < rows)[:, None] & (c < half)[None, :]
    x_offs = r.to(tl.int64)[:, None] * (2 * half) + c[None, :]
    token = r.to(tl.int64) // heads
    cs_offs = (token // seq * stride_cb + token % seq * stride_cs)[:, None] + c[None, :] * stride_cd
    x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offs + half, mask=mask, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + cs_offs, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + cs_offs + half * stride_cd, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + cs_offs, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + cs_offs + half * stride_cd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose: dx1 = dy1 cos1 + dy2 sin2, dx2 = dy2 cos2 - dy1 sin1
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(y_ptr + x_offs, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + x_offs + half, y2.to(y_ptr.dtype.element_ty), mask=mask)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype,
          backward: bool) -> torch.Tensor:
    b, s, heads, head_dim = x.shape
    x = x.contiguous()
    cos, sin = (t.expand(b, s, 1, head_dim) for t in (cos, sin))
    if cos.stride() != sin.stride():  # the kernel addresses both with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rows = b * s * heads
    block_r, block_h, warps = _tile(rows, head_dim // 2)
    _rope_kernel[(triton.cdiv(rows, block_r),)](
        x, cos, sin, y, rows, heads, s, head_dim // 2, cos.stride(0), cos.stride(1), cos.stride(3),
        BACKWARD=backward, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(x, cos, sin):
        out_dtype = torch.promote_types(x.dtype, torch.promote_types(cos.dtype, sin.dtype))
        return _rope(x, cos, sin, out_dtype, backward=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, cos, sin = inputs
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _Backward.apply(_rope, dy, cos, sin, ctx.x_dtype, True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton ``apply_rope_reference``: ``x [batch, seq, heads, head_dim]``, ``cos``, ``sin``
    broadcastable to ``[batch, seq, 1, head_dim]``. Differentiable in x only."""
    _require(x, cos, sin)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be [batch, seq, heads, head_dim] with an even "
                         f"head_dim, got {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 4 or t.shape[2] != 1 or t.shape[3] != x.shape[3]:
            raise ValueError(f"apply_rope: {name} must be [batch, seq, 1, {x.shape[3]}], got "
                             f"{tuple(t.shape)}")
    return _Rope.apply(x, cos, sin)


# ---------------------------------------------------------------------------------------------
# SwiGLU activation
# ---------------------------------------------------------------------------------------------

def swiglu_act_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the activation between the MLP's up and down projections."""
    return F.silu(gate) * up


_ELEMENTWISE_BLOCK = 1024


@_jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _swiglu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dgate = dout * u * sig * (1.0 + g * (1.0 - sig))  # d silu(g) / dg = sig (1 + g (1 - sig))
    tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dout * g * sig).to(dup_ptr.dtype.element_ty), mask=mask)


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype),
                      device=gate.device)
    n = gate.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](gate, up, out, n,
                                                               BLOCK=_ELEMENTWISE_BLOCK)
    return out


def _swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](dout.contiguous(), gate, up, dgate,
                                                               dup, n, BLOCK=_ELEMENTWISE_BLOCK)
    return dgate, dup


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(gate, up):
        return _swiglu_fwd(gate, up)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dout):
        return _Backward.apply(_swiglu_bwd, dout, *ctx.saved_tensors)


def swiglu_act(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton ``swiglu_act_reference``: gate and up of one shape; fp32 inside, one rounding out."""
    _require(gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu_act: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return _SwiGLU.apply(gate, up)


# ---------------------------------------------------------------------------------------------
# Linear + cross-entropy, chunked over tokens
# ---------------------------------------------------------------------------------------------

def linear_cross_entropy_reference(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100, chunk: int = 1024
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cross_entropy((h @ w).float(), labels, reduction="sum")`` and the labelled-token count.
    Materialises all ``[tokens, vocab]`` logits; ``chunk`` is accepted and unused."""
    loss = F.cross_entropy((h @ w).float(), labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


@_jit
def _ce_fwd_kernel(logits_ptr, labels_ptr, lse_ptr, loss_ptr, rows, vocab, stride_row, ignore_index,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    # Online logsumexp over vocab blocks: a running max m and sum s of exp(logit - m) per row.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    # past-the-end rows re-read the last row (never stored), so no row is all -inf
    row_offs = tl.minimum(r, rows - 1).to(tl.int64) * stride_row
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        c = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_ptr + row_offs[:, None] + c[None, :], mask=(c < vocab)[None, :],
                    other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(labels_ptr + r, mask=r < rows, other=ignore_index)
    labelled = label != ignore_index
    target = tl.load(logits_ptr + row_offs + tl.where(labelled, label, 0),
                     mask=(r < rows) & labelled, other=0.0).to(tl.float32)
    tl.store(lse_ptr + r, lse, mask=r < rows)
    tl.store(loss_ptr + r, tl.where(labelled, lse - target, 0.0), mask=r < rows)


@_jit
def _ce_bwd_kernel(logits_ptr, labels_ptr, lse_ptr, dloss_ptr, rows, vocab, stride_row,
                   ignore_index, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    # dloss/dlogits = dloss * (softmax - onehot) on labelled rows, 0 on ignored ones; written over
    # the logits it was computed from.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_offs = r.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + r, mask=r < rows, other=ignore_index)
    lse = tl.load(lse_ptr + r, mask=r < rows, other=0.0)
    scale = tl.where(label != ignore_index, tl.load(dloss_ptr).to(tl.float32), 0.0)
    for start in range(0, vocab, BLOCK_V):
        c = start + tl.arange(0, BLOCK_V)
        mask = (r < rows)[:, None] & (c < vocab)[None, :]
        ptrs = logits_ptr + row_offs[:, None] + c[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse[:, None]) - tl.where(c[None, :] == label[:, None], 1.0, 0.0)
        tl.store(ptrs, (g * scale[:, None]).to(logits_ptr.dtype.element_ty), mask=mask)


def _ce_launch(kernel, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
               *args: torch.Tensor) -> None:
    """One row-wise pass of ``kernel`` over ``logits [rows, vocab]`` (rows contiguous)."""
    rows, vocab = logits.shape
    block_r, block_v, warps = _tile(rows, min(vocab, 4096))
    kernel[(triton.cdiv(rows, block_r),)](logits, labels, *args, rows, vocab, logits.stride(0),
                                          ignore_index, BLOCK_R=block_r, BLOCK_V=block_v,
                                          num_warps=warps)


def _linear_cross_entropy_fwd(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                              ignore_index: int, chunk: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(summed loss, count, lse [tokens] fp32)``."""
    n = h.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    row_loss = torch.empty(n, dtype=torch.float32, device=h.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # h's dtype out of an fp32-accumulating matmul, as the reference's (h @ w).float()
        logits = h[start:stop] @ w
        _ce_launch(_ce_fwd_kernel, logits, labels[start:stop], ignore_index, lse[start:stop],
                   row_loss[start:stop])
    return row_loss.sum(), (labels != ignore_index).sum(), lse


def _linear_cross_entropy_bwd(dloss: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                              labels: torch.Tensor, lse: torch.Tensor, ignore_index: int,
                              chunk: int, need_dh: bool, need_dw: bool
                              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dh, dw)``, each None when not needed; recomputes the logits chunk by chunk."""
    dloss = dloss.to(torch.float32).contiguous()
    dh = torch.empty_like(h) if need_dh else None
    # dw sums over every chunk: accumulate in fp32 whatever w's dtype
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    for start in range(0, h.shape[0], chunk):
        stop = min(start + chunk, h.shape[0])
        hc = h[start:stop]
        dlogits = hc @ w
        _ce_launch(_ce_bwd_kernel, dlogits, labels[start:stop], ignore_index, lse[start:stop],
                   dloss)
        if need_dh:
            torch.mm(dlogits, w.mT, out=dh[start:stop])
        if need_dw:
            if dlogits.dtype == dw.dtype:
                dw.addmm_(hc.mT, dlogits)
            else:
                dw += hc.mT @ dlogits
    return dh, None if dw is None else dw.to(w.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(h, w, labels, ignore_index, chunk):
        return _linear_cross_entropy_fwd(h, w, labels, ignore_index, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, w, labels, ignore_index, chunk = inputs
        ctx.save_for_backward(h, w, labels, output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.ignore_index, ctx.chunk = ignore_index, chunk

    @staticmethod
    def backward(ctx, dloss, _dcount, _dlse):
        dh, dw = _Backward.apply(_linear_cross_entropy_bwd, dloss, *ctx.saved_tensors,
                                 ctx.ignore_index, ctx.chunk, *ctx.needs_input_grad[:2])
        return dh, dw, None, None, None


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk: int = 1024
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``linear_cross_entropy_reference`` over ``chunk`` tokens at a time.

    ``h [tokens, d]``, ``w [d, vocab]`` (stored [in, out]), ``labels [tokens]`` int64 in
    ``[0, vocab)`` or ``ignore_index`` (not checked: reading them would synchronise). Returns the
    summed loss (fp32, 0-dim) and the labelled-token count (int64, 0-dim). Working memory is one
    ``[chunk, vocab]`` block of logits in h's dtype, forward and backward (which recomputes it),
    plus an fp32 ``[d, vocab]`` accumulator for w's gradient. Differentiable in h and w.
    """
    _require(h, w, labels)
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[0] or labels.shape != h.shape[:1]:
        raise ValueError("linear_cross_entropy: need h [tokens, d], w [d, vocab], labels [tokens]; "
                         f"got {tuple(h.shape)}, {tuple(w.shape)}, {tuple(labels.shape)}")
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1, got {chunk!r}")
    loss, count, _ = _LinearCrossEntropy.apply(h, w, labels.contiguous(), ignore_index, chunk)
    return loss, count
