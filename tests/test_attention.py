"""Attention backends against the reference (SDPA with a dense document-causal mask). On a CPU
flex attention runs forward only (its backward needs CUDA); on a GPU forward and gradients are
compared at bf16 tolerance (2e-2 relative)."""
import sys

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


@pytest.mark.cuda
@pytest.mark.parametrize("window", [None, 7])
def test_flex_forward_and_grads_on_gpu(window):
    q, k, v, cu = inputs("cuda", torch.bfloat16, requires_grad=True)
    assert choose_backend(q) is flex
    out = evo_kernels.attention(q, k, v, cu, window=window, backend="auto", cache={})
    ref = reference(q, k, v, cu, window)
    dy = torch.randn_like(ref)
    g, g_ref = torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy)
    assert rel(out, ref) <= 2e-2 and all(rel(a, b) <= 2e-2 for a, b in zip(g, g_ref))


# ---------------------------------------------------------------------------------------------
# Sliding-window attention against a hand-written O(n²) loop. transformers' rule
# (masking_utils.sliding_window_overlay): query i sees key j iff i - window < j <= i.

def naive(q, k, v, cu_seqlens, window):
    """Token by token: softmax over the keys of the same document with i - window < j <= i."""
    b, s, h, d = q.shape
    qf, kf, vf = (t.reshape(b * s, t.shape[2], d).double() for t in (q, k, v))
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else list(range(0, b * s + 1, s))
    out = torch.zeros(b * s, h, d, dtype=torch.float64)
    r = h // k.shape[2]
    for start, end in zip(bounds, bounds[1:]):
        for i in range(start, end):
            lo = max(start, i - window + 1) if window is not None else start
            for head in range(h):
                keys, vals = kf[lo:i + 1, head // r], vf[lo:i + 1, head // r]
                w = torch.softmax(keys @ qf[i, head] / d ** 0.5, dim=0)
                out[i, head] = w @ vals
    return out.reshape(b, s, h, d)


WINDOW = 7   # shorter than every document (10, 40, 14, 26, 38 tokens) and the rows (64)


@pytest.mark.parametrize("backend", ["reference", "flex"])
@pytest.mark.parametrize("packed", [True, False])
def test_sliding_window_equals_naive_loop(backend, packed):
    """fp32 against an fp64 loop: 1e-5 relative (fp32 softmax and matmul rounding over <= 64
    keys)."""
    q, k, v, cu = inputs("cpu", torch.float32)
    cu = cu if packed else None
    with torch.no_grad():
        out = evo_kernels.attention(q, k, v, cu, window=WINDOW, backend=backend, cache={})
        plain = evo_kernels.attention(q, k, v, cu, backend=backend, cache={})
    ref = naive(q, k, v, cu, WINDOW)
    assert rel(out, ref) <= 1e-5
    assert rel(plain, naive(q, k, v, cu, None)) <= 1e-5
    assert rel(out, plain) > 1e-2, "the window should change the output"


def test_window_as_long_as_the_rows_is_no_window():
    q, k, v, cu = inputs("cpu", torch.float32)
    assert torch.equal(reference(q, k, v, cu, 64), reference(q, k, v, cu))


def test_cached_mask_window_decodes_like_the_whole_sequence():
    """Keys and values in a cache, queries arriving in chunks of 5, 1, 1, ...; the first row
    left-padded by 3 slots: equal to the naive loop over each row's real tokens."""
    q, k, v, _ = inputs("cpu", torch.float32)
    b, s = q.shape[:2]
    pad = 3
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, :pad] = False
    outs, start = [], 0
    for n in [5] + [1] * (s - 5):
        mask = evo_kernels.cached_mask(valid, start, n, window=WINDOW)
        assert mask.shape == (b, 1, n, start + n)
        outs.append(evo_kernels.attention_with_mask(q[:, start:start + n], k[:, :start + n],
                                                    v[:, :start + n], mask))
        start += n
    out = torch.cat(outs, 1)
    assert rel(out[1:], naive(q[1:], k[1:], v[1:], None, WINDOW)) <= 1e-5
    assert rel(out[:1, pad:], naive(q[:1, pad:], k[:1, pad:], v[:1, pad:], None, WINDOW)) <= 1e-5
    assert out[0, :pad].abs().max() == 0   # padding queries see nothing


def test_bad_window():
    q, k, v, cu = inputs("cpu", torch.float32)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            reference(q, k, v, cu, bad)


# ---------------------------------------------------------------------------------------------
# Long rows: beyond DENSE_MASK_TOKENS the reference attends blockwise (reference_lse over a Span).

KERNEL = sys.modules["evo_kernels.attention"]   # the module (evo_kernels.attention is the op)


def saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_long_rows_attend_blockwise_without_a_dense_mask(monkeypatch):
    """The 128 packed tokens (documents crossing the rows) and the windowed rows made "long" by
    lowering the threshold: the blockwise path, in blocks of 7 queries, never builds a dense mask
    (``document_causal_mask`` and ``visible`` raise), keeps for backward only q, k, v, the output
    and the fp32 lse, and gives the dense path's output and gradients to 1e-6 (fp32 rounding of
    two summation orders over <= 128 keys)."""
    q, k, v, cu = inputs("cpu", torch.float32, requires_grad=True)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    cases = [(cu, None), (cu, WINDOW), (None, WINDOW)]
    dense = []
    for c, window in cases:
        out = reference(q, k, v, c, window)
        dense.append((out, torch.autograd.grad(out, (q, k, v), dy)))
    monkeypatch.setattr(KERNEL, "DENSE_MASK_TOKENS", 16)
    monkeypatch.setattr(KERNEL, "BLOCK_ELEMENTS", 7 * 4 * 128)   # 7 of the 128 packed queries

    def refuse(*args, **kwargs):
        raise AssertionError("a dense mask was built")
    monkeypatch.setattr(KERNEL, "document_causal_mask", refuse)
    monkeypatch.setattr(KERNEL, "visible", refuse)
    for (c, window), (ref, g_ref) in zip(cases, dense):
        out, kept = saved_bytes(lambda: reference(q, k, v, c, window))
        b, s, h, _ = q.shape
        assert kept == sum(t.nbytes for t in (q, k, v, out)) + b * s * h * 4
        assert rel(out, ref) <= 1e-6
        g = torch.autograd.grad(out, (q, k, v), dy)
        assert all(rel(a, r) <= 1e-6 for a, r in zip(g, g_ref))
    assert not KERNEL.dense_mask(17) and KERNEL.dense_mask(16)
