"""Triton kernels of evo_kernels.triton_ops against their pure-torch references: forward and
gradients (from a random upstream gradient) in fp32 and bf16, at sizes that are not powers of two.

Without CUDA the kernels run under Triton's interpreter on CPU; it must be switched on before
triton is first imported, hence the environment variable at the top of this file (the module
skips, saying why, when something imported triton earlier in the same process).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from evo.models.layers import rope_cos_sin, rope_inv_freq  # noqa: E402
from evo_kernels import triton_ops  # noqa: E402
from evo_kernels.triton_ops import (  # noqa: E402
    apply_rope, apply_rope_reference, linear_cross_entropy, linear_cross_entropy_reference,
    rms_norm, rms_norm_reference, swiglu_act, swiglu_act_reference)

if not triton_ops.available():
    # In one pytest session a module collected earlier may have imported triton already
    # (transformers imports torch._dynamo, which imports triton), too early for the setting above.
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run this file alone, or "
                "set the variable before any import (conftest.py)", allow_module_level=True)

# On a GPU every kernel runs there (scripts/gpu_check.sh selects `-m cuda`); elsewhere under the
# interpreter.
pytestmark = pytest.mark.cuda(cpu=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max|a - b| / max|b| allowed, per dtype. Under the interpreter bf16 errors run higher than on a
# GPU (up to 1.3e-2 here, the fused residual case): it casts fp32 to bf16 by truncation, the
# reference rounds to nearest.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0,
          shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(shape, generator=g)).to(DEVICE, dtype)


def outputs_and_grads(fn, args: tuple, wrt: tuple[int, ...], seed: int
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fn's tensor outputs and the gradients of ``sum(out * upstream)`` for the args in ``wrt``,
    with a fixed random upstream gradient per output."""
    args = tuple(a.detach().requires_grad_(i in wrt) if torch.is_tensor(a) else a
                 for i, a in enumerate(args))
    outs = fn(*args)
    outs = [outs] if torch.is_tensor(outs) else [o for o in outs if o.is_floating_point()]
    ups = [randn(*o.shape, seed=seed + k, dtype=o.dtype) for k, o in enumerate(outs)]
    grads = torch.autograd.grad(outs, [args[i] for i in wrt], ups)
    return [o.detach() for o in outs], list(grads)


def assert_matches(fn, ref, args: tuple, wrt: tuple[int, ...], dtype: torch.dtype) -> None:
    outs, grads = outputs_and_grads(fn, args, wrt, seed=100)
    ref_outs, ref_grads = outputs_and_grads(ref, args, wrt, seed=100)
    for name, got, want in [*(("out", o, r) for o, r in zip(outs, ref_outs)),
                            *((f"grad[{i}]", g, r) for i, g, r in zip(wrt, grads, ref_grads))]:
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, got.dtype)
        err = rel_err(got, want)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:g}"


# ---------------------------------------------------------------------------------------------

@DTYPES
def test_rms_norm(dtype):
    x = randn(4, 33, 300, seed=0, dtype=dtype)  # 9 tiles of 16 rows: programs take several
    weight = randn(300, seed=1, dtype=dtype, scale=0.1, shift=1.0)
    assert_matches(rms_norm, rms_norm_reference, (x, weight, 1e-5), wrt=(0, 1), dtype=dtype)


@DTYPES
def test_rms_norm_fused_residual(dtype):
    x = randn(2, 9, 300, seed=2, dtype=dtype)
    residual = randn(2, 9, 300, seed=3, dtype=dtype, scale=2.0)
    weight = randn(300, seed=4, dtype=dtype, scale=0.1, shift=1.0)
    # both outputs (normed and the residual stream) get an upstream gradient
    assert_matches(rms_norm, rms_norm_reference, (x, weight, 1e-6, residual), wrt=(0, 1, 3),
                   dtype=dtype)


def test_rms_norm_torch_func_grad_equals_autograd():
    x = randn(4, 300, seed=5)
    weight = randn(300, seed=6, scale=0.1, shift=1.0)
    up = randn(4, 300, seed=7)

    def loss(x, weight):
        return (rms_norm(x, weight, 1e-5) * up).sum()

    fx, fw = torch.func.grad(loss, argnums=(0, 1))(x, weight)
    ax, aw = torch.autograd.grad(loss(x.requires_grad_(), weight.requires_grad_()), (x, weight))
    torch.testing.assert_close(fx, ax, rtol=0, atol=0)
    torch.testing.assert_close(fw, aw, rtol=0, atol=0)


@DTYPES
def test_apply_rope(dtype):
    b, s, heads, head_dim = 2, 7, 3, 48  # half = 24: masked lanes in the kernel
    positions = torch.arange(s).repeat(b, 1) + torch.tensor([[0], [5]])
    cos, sin = rope_cos_sin(positions.to(DEVICE), rope_inv_freq(head_dim, 10000.0), dtype)
    x = randn(b, s, heads, head_dim, seed=8, dtype=dtype)
    assert_matches(apply_rope, apply_rope_reference, (x, cos, sin), wrt=(0,), dtype=dtype)


def test_apply_rope_broadcasts_cos_sin_over_batch():
    positions = torch.arange(6)[None].to(DEVICE)  # [1, seq]: one cos/sin row for every batch row
    cos, sin = rope_cos_sin(positions, rope_inv_freq(16, 500.0), torch.float32)
    x = randn(3, 6, 2, 16, seed=9)
    assert_matches(apply_rope, apply_rope_reference, (x, cos, sin), wrt=(0,), dtype=torch.float32)


@DTYPES
def test_swiglu_act(dtype):
    gate = randn(3, 7, 300, seed=10, dtype=dtype, scale=3.0)
    up = randn(3, 7, 300, seed=11, dtype=dtype)
    assert_matches(swiglu_act, swiglu_act_reference, (gate, up), wrt=(0, 1), dtype=dtype)


@DTYPES
def test_linear_cross_entropy(dtype):
    n, d, vocab = 37, 48, 1000  # 3 chunks of 16 rows, the last one short
    h = randn(n, d, seed=12, dtype=dtype)
    w = randn(d, vocab, seed=13, dtype=dtype, scale=2.0 / d ** 0.5)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(14))
    labels[::4] = -100
    labels = labels.to(DEVICE)
    assert_matches(lambda *a: linear_cross_entropy(*a, chunk=16), linear_cross_entropy_reference,
                   (h, w, labels), wrt=(0, 1), dtype=dtype)
    loss, count = linear_cross_entropy(h, w, labels, chunk=16)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert count.item() == (labels != -100).sum().item() == 27


def test_linear_cross_entropy_online_logsumexp_over_vocab_blocks():
    n, d, vocab = 20, 32, 4500  # two vocab blocks of 4096, the second short
    h = randn(n, d, seed=20, scale=4.0)  # logits of tens: rows' running max moves between blocks
    w = randn(d, vocab, seed=21, scale=2.0 / d ** 0.5)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(22)).to(DEVICE)
    assert_matches(lambda *a: linear_cross_entropy(*a, chunk=8), linear_cross_entropy_reference,
                   (h, w, labels), wrt=(0, 1), dtype=torch.float32)


def test_linear_cross_entropy_all_ignored_is_zero():
    h, w = randn(5, 8, seed=15).requires_grad_(), randn(8, 30, seed=16).requires_grad_()
    loss, count = linear_cross_entropy(h, w, torch.full((5,), -1, device=DEVICE), ignore_index=-1)
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0.0 and count.item() == 0
    assert not dh.any() and not dw.any()


def test_linear_cross_entropy_torch_func_grad_equals_autograd():
    h, w = randn(9, 8, seed=18), randn(8, 30, seed=19)
    labels = torch.tensor([3, -100, 0, 29, 7, 7, -100, 1, 2], device=DEVICE)

    def loss(h, w):
        return linear_cross_entropy(h, w, labels, chunk=4)[0]

    fh, fw = torch.func.grad(loss, argnums=(0, 1))(h, w)
    ah, aw = torch.autograd.grad(loss(h.requires_grad_(), w.requires_grad_()), (h, w))
    torch.testing.assert_close(fh, ah, rtol=0, atol=0)
    torch.testing.assert_close(fw, aw, rtol=0, atol=0)


def test_without_triton_the_ops_raise_and_references_run(monkeypatch):
    assert triton_ops.available()
    x, weight = torch.ones(2, 8), torch.ones(8)
    with monkeypatch.context() as m:  # as if compiled for CUDA and handed CPU tensors
        m.setattr(triton_ops, "_INTERPRETED", False)
        m.setattr(triton_ops, "_LANGUAGE_INTERPRETED", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            rms_norm(x, weight, 1e-5)
    monkeypatch.setattr(triton_ops, "triton", None)
    assert not triton_ops.available()
    with pytest.raises(RuntimeError, match="needs triton"):
        rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(rms_norm_reference(x, weight, 1e-5), torch.ones(2, 8))


def test_model_with_triton_kernels_equals_torch_ops():
    """The whole model and train step with kernels="triton" compute what the torch ops do: logits,
    loss and gradients within 1e-5 (fp32), on packed documents with GQA."""
    from evo import optim, train
    from evo.models import llama
    cfg = llama.Config(vocab_size=70, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2,
                       intermediate_size=80)
    params = {k: v.to(DEVICE) for k, v in llama.init(cfg, seed=3).items()}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 70, (1, 40), generator=g).to(DEVICE)
    cu = torch.tensor([0, 13, 29, 40], device=DEVICE)
    a = llama.apply(cfg, params, tokens, cu_seqlens=cu, kernels="triton")
    b = llama.apply(cfg, params, tokens, cu_seqlens=cu)
    assert rel_err(a, b) <= 1e-5
    labels = torch.roll(tokens, -1, dims=1)
    batch = {"tokens": tokens[None], "labels": labels[None], "cu_seqlens": cu[None]}
    opt = optim.adamw(lr=1e-3)
    g_t, aux_t = train.Step(cfg, opt, kernels="triton").grads(params, batch)
    g_r, aux_r = train.Step(cfg, opt).grads(params, batch)
    assert rel_err(aux_t["loss"], aux_r["loss"]) <= 1e-5
    assert max(rel_err(g_t[k], g_r[k]) for k in g_r) <= 1e-5
