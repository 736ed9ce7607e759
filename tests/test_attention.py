"""Attention backends against the reference (SDPA with a dense document-causal mask). On a CPU
flex attention runs forward only (its backward needs CUDA); on a GPU forward and gradients are
compared at bf16 tolerance (2e-2 relative)."""
import pytest
import torch

import evo_kernels
from evo_kernels.attention import choose_backend, flex, reference


def inputs(device, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    b, s, h, kv, d = 2, 64, 4, 2, 16
    q, k, v = (torch.randn(b, s, n, d, generator=g).to(device, dtype).requires_grad_(requires_grad)
               for n in (h, kv, kv))
    cu = torch.tensor([0, 10, 50, 64, 90, 128], device=device)
    return q, k, v, cu


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_flex_forward_equals_reference_on_cpu():
    q, k, v, cu = inputs("cpu", torch.float32)
    with torch.no_grad():
        for c in (cu, None):
            out = evo_kernels.attention(q, k, v, c, backend="flex", cache={})
            assert rel(out, reference(q, k, v, c)) <= 1e-5


def test_choice_and_errors():
    q, _, _, _ = inputs("cpu", torch.float32)
    assert choose_backend(q) is reference          # flex has no backward on a CPU
    assert choose_backend(q, "flex") is flex
    with pytest.raises(ValueError, match="'nope'"):
        choose_backend(q, "nope")


def test_auto_on_cpu_trains_through_the_reference():
    """"auto" on a CPU with inputs that need gradients: the reference's outputs and gradients,
    bitwise (the same function), so a CPU training step never reaches flex's missing backward."""
    q, k, v, cu = inputs("cpu", torch.float32, requires_grad=True)
    out = evo_kernels.attention(q, k, v, cu, backend="auto", cache={})
    ref = reference(q, k, v, cu)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), dy)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_forward_and_grads_on_gpu():
    q, k, v, cu = inputs("cuda", torch.bfloat16, requires_grad=True)
    assert choose_backend(q) is flex
    out = evo_kernels.attention(q, k, v, cu, backend="auto", cache={})
    ref = reference(q, k, v, cu)
    dy = torch.randn_like(ref)
    g, g_ref = torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy)
    assert rel(out, ref) <= 2e-2 and all(rel(a, b) <= 2e-2 for a, b in zip(g, g_ref))
