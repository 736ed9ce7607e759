"""Long context pieces that need no process group: attention with its log-sum-exp, the sequence
layout (zigzag) and its causal load balance, the batch split, and the bad inputs of plan.sp /
plan.cp. The distributed equivalence (sp, cp, both, with dp, ZeRO and tp) is in the sweep
(tests/sweep_worker.py) and the CLI test (tests/test_torchrun.py).

Tolerances: fp64 inputs, so the exact merge of two key blocks equals the one-block attention to
1e-12 (a few hundred fp64 roundings); fp32 to 1e-6 (≈ 10 eps of the largest output).
"""
import pytest
import torch

from evo import optim, train
from evo.models import llama
from evo.sharding import Plan, context, planner
from evo.sharding.mesh import Mesh
from evo_kernels.attention import (Span, attention_lse, choose_lse_backend, lse_grads,
                                   merge_lse, reference, reference_lse)


def _qkv(dtype, s=24, h=4, kv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, s, n, d, generator=g, dtype=dtype) for n in (h, kv, kv)]


def _doc_mask(cu, s):
    from evo_kernels.attention import document_causal_mask
    return document_causal_mask(torch.tensor(cu), s)[None]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_two_key_blocks_merged_by_lse_equal_one_attention(dtype, tol):
    """Keys split in two blocks (documents crossing the split), each attended with its lse and
    merged: the output and the gradients of q, k, v equal the reference attention's."""
    s, cu = 24, [0, 7, 15, 24]
    q, k, v = (t.requires_grad_(True) for t in _qkv(dtype, s))
    mask = _doc_mask(cu, s)
    w = torch.randn(1, s, 4, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))
    ref = reference(q, k, v, torch.tensor(cu))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    cut = 10
    o1, l1 = attention_lse(q, k[:, :cut], v[:, :cut], mask[..., :cut], backend="reference")
    o2, l2 = attention_lse(q, k[:, cut:], v[:, cut:], mask[..., cut:], backend="reference")
    assert torch.isinf(l2[:, :cut]).all()      # queries before the cut see none of block 2
    assert (o2[:, :cut] == 0).all()
    # merge in the order whose first block every query row sees (a query's own position)
    out, lse = merge_lse(o1.to(l1.dtype), l1, o2, l2)
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    idx = torch.arange(s)
    span = Span(idx, torch.tensor([0] * 7 + [7] * 8 + [15] * 9)[None], idx)
    assert torch.equal(span.dense(), mask)   # the same mask, described by indices
    full_out, full_lse = reference_lse(q, k, v, span)
    assert (lse - full_lse).abs().max() <= tol * full_lse.abs().max()
    assert (full_out - ref).abs().max() <= tol * ref.abs().max()
    g = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all() and (a - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_block_grads_from_the_merged_lse_sum_to_one_attentions(dtype, tol):
    """Ring attention's backward without a process group: keys in zigzag blocks (chunks 0 and 3,
    1 and 2 of 4; documents crossing them), each block's ``lse_grads`` from the merged output and
    lse of all the keys. The blocks' dq summed and each block's dk, dv put back at its keys equal
    the gradients of the reference attention over the whole row."""
    s, cu = 24, [0, 7, 15, 24]
    q, k, v = (t.requires_grad_(True) for t in _qkv(dtype, s))
    w = torch.randn(1, s, 4, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad((reference(q, k, v, torch.tensor(cu)) * w).sum(), (q, k, v))
    idx = torch.arange(s)
    start = torch.tensor([0] * 7 + [7] * 8 + [15] * 9)[None]
    out, lse = reference_lse(q, k, v, Span(idx, start, idx))
    row = (w * out).sum(-1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for keys in (context.cp_indices(s, 2, 0), context.cp_indices(s, 2, 1)):
        dq_i, dk[:, keys], dv[:, keys] = lse_grads(q, k[:, keys], v[:, keys],
                                                   Span(idx, start, keys), lse, w, row, block=5)
        dq += dq_i
    for a, b in zip((dq, dk, dv), want):
        assert (a - b).abs().max() <= tol * b.abs().max()


def _dense_lse(q, k, v, mask):
    """The definition, written out: softmax over the allowed keys (k's heads repeated to q's),
    with autograd; rows with no allowed key give out 0 and lse -inf."""
    rep = q.shape[2] // k.shape[2]
    kf, vf = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, kf) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    seen = mask.any(-1)[:, None, :, None]                       # [b, 1, n, 1]
    lse = torch.logsumexp(scores.masked_fill(~seen, 0.0), -1, keepdim=True)
    p = torch.exp(scores - lse).masked_fill(~mask[:, None], 0.0)
    out = torch.einsum("bhnm,bmhd->bnhd", p, vf).masked_fill(~seen.transpose(1, 2), 0.0)
    lse = lse.masked_fill(~seen, float("-inf"))[..., 0].transpose(1, 2)
    return out, lse


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("window", [None, 4])
def test_blockwise_lse_equals_the_dense_definition(dtype, tol, window):
    """Queries in blocks of 1, 5 and 8 (not dividing the 37 queries) and all at once, each block
    against only the keys it can see: out, lse and the gradients of q, k, v through both equal
    the dense definition. Grouped-query heads (4 over 2), documents crossing block edges, a key
    block with a gap (zigzag: tokens 0-7 and 24-36), so that some rows see no key at all."""
    s, h, kv, d = 37, 4, 2, 8
    q, k, v = (t.requires_grad_(True) for t in _qkv(dtype, s, h, kv, d, seed=2))
    starts = torch.tensor([0] * 6 + [6] * 13 + [19] * 2 + [21] * 16)[None]
    keys = torch.cat([torch.arange(8), torch.arange(24, s)])
    span = Span(torch.arange(s), starts, keys, window)
    ref, ref_lse = _dense_lse(q, k[:, keys], v[:, keys], span.dense())
    empty = torch.isinf(ref_lse)
    assert empty.any() and (~empty).any()
    w = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    wl = torch.randn(ref_lse.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))

    def loss(o, lse):
        return (o * w).sum() + (lse.masked_fill(empty, 0.0) * wl).sum()
    g_ref = torch.autograd.grad(loss(ref, ref_lse), (q, k, v))
    for block in (1, 5, 8, None):
        out, lse = reference_lse(q, k[:, keys], v[:, keys], span, block=block)
        assert lse.dtype == torch.promote_types(dtype, torch.float32)
        assert torch.equal(torch.isinf(lse), empty) and (out[empty.any(-1)] == 0).all()
        assert (lse - ref_lse)[~empty].abs().max() <= tol * ref_lse[~empty].abs().max()
        assert (out - ref).abs().max() <= tol * ref.abs().max(), block
        g = torch.autograd.grad(loss(out, lse), (q, k, v))
        for a, b in zip(g, g_ref):
            assert (a - b).abs().max() <= tol * b.abs().max(), block


def test_span_key_ranges_are_the_dense_mask():
    """Each query row sees exactly the keys k_index[lo:hi]; an unsorted k_index is refused."""
    starts = torch.tensor([[0] * 5 + [5] * 9 + [14] * 6, [0] * 11 + [11] * 9])
    keys = torch.cat([torch.arange(3, 7), torch.arange(12, 20)])
    for window in (None, 3):
        span = Span(torch.arange(20), starts, keys, window)
        lo, hi = span.key_ranges()
        cols = torch.arange(keys.numel())
        assert torch.equal((cols >= lo[..., None]) & (cols < hi[..., None]), span.dense())
        assert span.any() and not Span(torch.arange(3), starts[:1, :3], keys, window).any()
    with pytest.raises(ValueError, match="k_index must be ascending"):
        Span(torch.arange(20), starts, keys.flip(0)).key_ranges()


def test_a_backend_without_lse_is_refused():
    assert choose_lse_backend(torch.device("cpu")) is reference_lse
    with pytest.raises(ValueError, match="'sdpa' cannot return the log-sum-exp"):
        choose_lse_backend(torch.device("cpu"), "sdpa")


def test_zigzag_layout_partitions_the_row():
    assert context.cp_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert context.cp_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert context.sequence_indices(16, 2, 2, 1, 1).tolist() == [8, 9, 10, 11]   # chunks 1, 2
    for cp, sp in ((1, 2), (2, 1), (4, 1), (2, 2), (1, 4)):
        got = torch.cat([context.sequence_indices(64, cp, sp, c, s)
                         for c in range(cp) for s in range(sp)])
        assert sorted(got.tolist()) == list(range(64)), (cp, sp)   # every token once


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_balances_the_causal_work(cp):
    """Counted attention work (visible query-key pairs of one causal sequence) per cp rank:
    with zigzag max/min ≤ 1.1 (exactly 1: each rank's two chunks sum to the same); contiguous
    chunks give (2·cp − 1) : 1 asymptotically — the last rank's chunk sees the whole sequence,
    the first only itself. Checked against the closed form of sum(i + 1) over a chunk."""
    seq = 4096
    zig, flat = context.causal_work(seq, cp), context.causal_work(seq, cp, zigzag=False)
    n = seq // cp
    assert flat == [(c * n + 1 + (c + 1) * n) * n // 2 for c in range(cp)]
    assert sum(zig) == sum(flat) == seq * (seq + 1) // 2
    assert max(zig) / min(zig) <= 1.1
    ratio = max(flat) / min(flat)
    assert abs(ratio - (2 * cp - 1)) < 0.01 * (2 * cp - 1), ratio
    print(f"cp={cp}: zigzag max/min {max(zig) / min(zig):.3f}, contiguous {ratio:.2f}")


def test_split_batch_keeps_global_positions():
    """Each rank's tokens carry their positions in the global packed row (restarting at every
    document), never offsets of the local chunk."""
    plan = Plan(dp=1, cp=2).resolve(2)
    tokens = torch.arange(16)[None]
    batch = {"tokens": tokens, "labels": tokens + 1, "cu_seqlens": torch.tensor([[0, 3, 11, 16]])}
    part = context.split_batch(batch, plan, {"cp": 1, "sp": 0})
    assert part["tokens"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert part["positions"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]
    assert part["labels"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    wrong = dict(batch, positions=torch.arange(16)[None])
    with pytest.raises(ValueError, match="positions must restart at every document"):
        context.split_batch(wrong, plan, {"cp": 0, "sp": 0})


CFG = llama.Config(vocab_size=64, hidden_size=48, num_layers=1, num_heads=6, num_kv_heads=3,
                   intermediate_size=48)


@pytest.mark.parametrize("plan, attention, culprit", [
    (Plan(sp=4), "auto", r"plan.sp=4 must divide the attention heads .*num_heads / plan.tp = 6"),
    (Plan(sp=2), "auto", r"plan.sp=2 must divide the kv heads .*num_kv_heads / plan.tp = 3"),
    (Plan(cp=2), "sdpa", r"plan.cp=2 needs ring attention's log-sum-exp.*'sdpa'"),
])
def test_bad_sequence_plans_name_the_field(plan, attention, culprit):
    step = train.Step(CFG, optim.adamw(lr=1e-3), attention=attention)
    with pytest.raises(ValueError, match=culprit):
        planner.shard(step, plan, Mesh(plan.resolve(plan.model_parallel), 0))


@pytest.mark.parametrize("plan, seq, culprit", [
    (Plan(cp=2), 30, r"sequence length 30 must be divisible by 2·plan.cp·plan.sp = 4"),
    (Plan(cp=2, sp=3), 42, r"sequence length 42 must be divisible by 2·plan.cp·plan.sp = 12"),
    (Plan(sp=3), 32, r"sequence length 32 must be divisible by plan.sp = 3"),
])
def test_a_sequence_the_group_cannot_split_fails_before_communicating(plan, seq, culprit):
    cfg = llama.Config(vocab_size=64, hidden_size=48, num_layers=1, num_heads=6,
                       intermediate_size=48)
    step = train.Step(cfg, optim.adamw(lr=1e-3))
    sharded = planner.shard(step, plan, Mesh(plan.resolve(plan.model_parallel), 0))
    tokens = torch.zeros(1, seq, dtype=torch.int64)
    with pytest.raises(ValueError, match=culprit):
        sharded(None, {"tokens": tokens, "labels": tokens})


def test_bytes_per_layer_follow_the_closed_forms():
    """Per layer and micro-batch of S tokens, forward and backward (the sweep checks the same
    model against measured bytes): Ulysses sends q, k, v and the output, each S/sp tokens wide,
    twice (all-to-all and its transpose) — 2·(S/sp)·(2·H + 2·KV)·d·bytes, with KV replicated up
    to sp; the ring sends k and v of S/cp tokens cp − 1 times forward and again in backward, and
    in backward the dk, dv accumulators cp times (fp32: 4 bytes for bf16 activations) —
    2·(cp−1)·2·(S/cp)·KV·d·bytes + cp·2·(S/cp)·KV·d·4, independent of cp in the limit."""
    cfg = llama.Config(vocab_size=64, hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=2,
                       intermediate_size=96)
    S, d, a = 8192, 8, 2
    for sp in (2, 4, 8):
        kv = max(2, sp)
        got = context.bytes_per_layer(cfg, Plan(sp=sp).resolve(sp), S, a)
        assert got == {"all_to_all/sp": 2 * (S // sp) * (2 * 8 + 2 * kv) * d * a}, sp
    for cp in (2, 4, 8):
        got = context.bytes_per_layer(cfg, Plan(cp=cp).resolve(cp), S, a)
        block = 2 * (S // cp) * 2 * d   # k and v (2 kv heads) of the S/cp tokens, elements
        assert got == {"send_recv/cp": 2 * (cp - 1) * block * a + cp * block * 4}, cp


def test_evo_plan_long_context_table():
    """`evo plan`'s long-context rows: the activation model per rank at 8k-64k for one process
    and each sp / cp plan, and the bytes sent per layer at 64k. A 64k row attends blockwise: no
    dense ``[S, S]`` mask in one process's bytes (it alone would be 16 GiB). sp2 keeps at most
    half of one process's activations; cp4 under a third (about a quarter: the ring keeps only
    the local q, k, v, output and lse for backward)."""
    from evo.sharding.simulate import long_context_report
    text = long_context_report(CFG, [Plan(sp=2), Plan(cp=4), Plan(tp=2)], 4)
    lines = text.splitlines()
    assert len(lines) == 4 and "act@64k" in lines[0] and "tp=2" not in text
    one = context.activation_bytes(CFG, Plan().resolve(1), 65536)["total"]
    cp4 = context.activation_bytes(CFG, Plan(cp=4).resolve(4), 65536)["total"]
    assert lines[3].split()[4] == f"{cp4 / 2**20:.0f}" and "send_recv/cp" in lines[3]
    assert lines[1].split()[4] == f"{one / 2**20:.0f}"
    sp2 = context.activation_bytes(CFG, Plan(sp=2).resolve(2), 65536)["total"]
    assert one < 65536**2 and sp2 <= one / 2 and cp4 < one / 3


@pytest.mark.cuda
def test_flex_lse_on_gpu_equals_the_reference():
    """The CUDA backend (flex attention with return_lse): output, lse and the gradients of q, k, v
    through both, against the fp32 reference on the same bf16 inputs (2e-2: bf16 rounding)."""
    s, cu = 256, [0, 70, 150, 256]
    q, k, v = (t.cuda().bfloat16().requires_grad_(True) for t in _qkv(torch.float32, s))
    mask = _doc_mask(cu, s).cuda()[..., 64:]   # a key block: some rows see none of it
    k_, v_ = k[:, 64:], v[:, 64:]
    out, lse = attention_lse(q, k_, v_, mask, backend="auto")
    ref, ref_lse = reference_lse(q, k_, v_, mask)
    w = torch.randn_like(ref.float())
    loss = lambda o, l: (o.float() * w).sum() + l.nan_to_num(0, 0, 0).sum()   # noqa: E731
    g = torch.autograd.grad(loss(out, lse), (q, k, v))
    g_ref = torch.autograd.grad(loss(ref, ref_lse), (q, k, v))
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= 2e-2 * ref_lse[finite].abs().max()
    assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    for a, b in zip(g, g_ref):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()
