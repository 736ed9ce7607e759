"""CUDA paths against the CPU or the eager reference: the packed-document step (flex attention with
a document mask on CUDA, SDPA with a dense mask on a CPU), the compiled step, the bf16 precision
policy, KV-cache generation, grouped expert matmuls, and a whole run with asynchronous checkpoints
that resumes.

Each check is written for a device. Where it is cheap it also runs with ``device="cpu"`` in CI,
against the same reference, so that the CUDA case cannot fail on a typo; the ``cuda`` cases are
skipped without a GPU (tests/conftest.py) and selected with ``pytest -m cuda``
(scripts/gpu_check.sh).

Tolerances: fp32 on CUDA against fp32 on a CPU at 1e-4 relative for losses and logits and 1e-3
for gradients (other kernels sum in other orders; fp32 proper agrees to ~1e-6, the gradients' 1e-3
leaves room for TF32 should a kernel choose it, and both still catch a wrong mask or a dropped
term, each off by 1e-2 or more); bf16 against fp32 at 2e-2 (bf16 keeps 8 bits of mantissa) and a
gradient cosine above 0.99.
"""
import io
import json
import os

import pytest
import torch

from evo import Experiment, checkpoint, data, generate, optim, run, train
from evo.models import llama
from evo.sharding import Plan
from evo.sharding.mesh import Mesh
from test_train import packed_batch

CFG = llama.Config(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=96, max_seq_len=128)
OPT = optim.adamw(lr=1e-2, weight_decay=0.1, clip_norm=1.0)
DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
CUDA = pytest.mark.cuda


def packed():
    """Two packed rows of 128 tokens, 4 documents each (test_train's batch at this vocabulary)."""
    return packed_batch(2, 128, vocab_size=CFG.vocab_size)


def on(tree, device):
    return {k: v.to(device) for k, v in tree.items()}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def max_rel(a, b):
    return max(rel(a[k].cpu(), b[k].cpu()) for k in b)


def cosine(a, b):
    flat = lambda g: torch.cat([g[k].double().flatten().cpu() for k in sorted(g)])  # noqa: E731
    return torch.nn.functional.cosine_similarity(flat(a), flat(b), dim=0).item()


@DEVICES
def test_packed_step_on_the_device_equals_the_cpu_step(device):
    """Gradients of packed documents (attention "auto": flex attention with a document block mask
    on CUDA, the dense-mask reference on a CPU) and one donated AdamW update: fp32, loss and
    gradient norm 1e-4, gradients 1e-3."""
    params, batch = llama.init(CFG, seed=0), packed()
    g_ref, a_ref = train.Step(CFG, OPT).grads(params, batch)
    step = train.Step(CFG, OPT)
    g, a = step.grads(on(params, device), on(batch, device))
    assert all(v.device.type == device for v in g.values())
    assert rel(a["loss"].cpu(), a_ref["loss"]) <= 1e-4 and max_rel(g, g_ref) <= 1e-3
    s_ref, m_ref = train.Step(CFG, OPT)(train.init_state(params, OPT), batch)
    s, m = train.Step(CFG, OPT, donate=True)(train.init_state(on(params, device), OPT),
                                             on(batch, device))
    assert rel(m["grad_norm"].cpu(), m_ref["grad_norm"]) <= 1e-4
    # A first AdamW step moves each weight by about lr·g/(|g| + eps): a gradient component within
    # ~eps of zero may move either way on either device, so the update is compared at its
    # 99.9th percentile, to 1e-3 of lr (a wrong update is wrong nearly everywhere).
    diff = torch.cat([(s.params[k].cpu() - s_ref.params[k]).abs().flatten() for k in s_ref.params])
    assert diff.quantile(0.999).item() <= 1e-3 * 1e-2


@DEVICES
def test_bf16_policy_keeps_fp32_master_weights_and_moments(device):
    """bf16 compute on the device: parameters, moments and gradients stay fp32; the loss is the
    fp32 step's within 2e-2 and the gradients point the same way (cosine > 0.99)."""
    params, batch = on(llama.init(CFG, seed=0), device), on(packed(), device)
    g32, a32 = train.Step(CFG, OPT).grads(params, batch)
    bf16 = train.Step(CFG, OPT, compute_dtype=torch.bfloat16)
    g16, a16 = bf16.grads(params, batch)
    assert all(v.dtype == torch.float32 for v in g16.values())
    assert rel(a16["loss"].cpu(), a32["loss"].cpu()) <= 2e-2 and cosine(g16, g32) > 0.99
    state, m = bf16(train.init_state(params, OPT), batch)
    assert all(v.dtype == torch.float32 and v.device.type == device
               for group in (state.params, state.opt_state.mu, state.opt_state.nu)
               for v in group.values())
    assert torch.isfinite(m["loss"]) and int(state.step) == 1


@CUDA
def test_compiled_step_on_cuda_equals_eager():
    """torch.compile of forward and backward on CUDA, with recomputation, against eager: fp32
    within 1e-4, bf16 within 2e-2 (loss) and cosine > 0.99 (gradients); then three donated
    compiled bf16 steps take the loss where three eager ones do (2e-2)."""
    params, batch = on(llama.init(CFG, seed=0), "cuda"), on(packed(), "cuda")
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        kw = dict(compute_dtype=dtype, remat=0.5)
        g_e, a_e = train.Step(CFG, OPT, **kw).grads(params, batch)
        g_c, a_c = train.Step(CFG, OPT, compile=True, **kw).grads(params, batch)
        assert rel(a_c["loss"], a_e["loss"]) <= tol
        assert (max_rel(g_c, g_e) <= tol) if dtype == torch.float32 else cosine(g_c, g_e) > 0.99
    losses = {}
    for compiled in (False, True):
        step = train.Step(CFG, OPT, compute_dtype=torch.bfloat16, donate=True, compile=compiled)
        state = train.init_state({k: v.clone() for k, v in params.items()}, OPT)
        for _ in range(3):
            state, m = step(state, batch)
        losses[compiled] = m["loss"]
    assert rel(losses[True], losses[False]) <= 2e-2


@DEVICES
def test_kv_cache_generation_on_the_device(device):
    """Decoding in pieces through the KV cache equals the whole sequence (fp32, 1e-4 relative to
    the logits' scale), in bf16 within 2e-2; greedy generation on the device gives the CPU's
    tokens."""
    params = llama.init(CFG, seed=1)
    seq = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        p, s = {k: v.to(device, dtype) for k, v in params.items()}, seq.to(device)
        full = llama.apply(CFG, p, s)
        cache = llama.init_cache(CFG, 2, 24, dtype=dtype, device=device)
        pieces = []
        for a, b in ((0, 9), (9, 10), (10, 16), *((i, i + 1) for i in range(16, 24))):
            logits, cache = llama.decode(CFG, p, s[:, a:b], cache)
            pieces.append(logits)
        assert rel(torch.cat(pieces, 1).cpu(), full.cpu()) <= tol
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    assert generate.generate(CFG, on(params, device), prompts, 8, temperature=0) == \
        generate.generate(CFG, params, prompts, 8, temperature=0)


@CUDA
def test_grouped_expert_matmul_on_cuda_bf16():
    """torch._grouped_mm on CUDA (bf16, compute capability 9.0 and up) against one matmul per
    expert, with an empty expert, forward and gradients (2e-2: bf16)."""
    from evo_kernels.grouped import grouped_mm, grouped_mm_loop, grouped_supported
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([37, 0, 53, 38], device="cuda")
    x = torch.randn(128, 64, generator=g).cuda().bfloat16().requires_grad_(True)
    w = torch.randn(4, 64, 32, generator=g).cuda().bfloat16().requires_grad_(True)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert grouped_supported(x, w)
    y = grouped_mm(x, w, counts, "grouped")
    ref = grouped_mm_loop(x, w, counts)
    dy = torch.randn_like(ref)
    g1, g2 = torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(ref, (x, w), dy)
    assert rel(y, ref) <= 2e-2 and all(rel(a, b) <= 2e-2 for a, b in zip(g1, g2))


def _experiment(run_dir, **kw) -> Experiment:
    fields = dict(model=CFG, data=data.Packed(folder=None, seq_len=64, micro_batch=2, micro_num=2,
                                              seed=5),
                  optimizer=optim.adamw(lr=1e-2), steps=4, run_dir=str(run_dir),
                  tensorboard=False, tokenizer="byte", checkpoint_every=2, async_checkpoint=True)
    return Experiment(**{**fields, **kw})


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


@DEVICES
def test_a_run_on_the_device_resumes_from_its_asynchronous_checkpoints(device, tmp_path):
    """`run.run` on the device with asynchronous checkpoints every 2 steps: cut after 2 steps and
    resumed, it logs the uninterrupted run's losses (exactly on a CPU; 1e-5 on CUDA, whose
    atomic adds sum in any order); those are the CPU run's within 1e-4; the last
    checkpoint loads onto the device as the final state; device memory is reported."""
    run.run(_experiment(tmp_path / "ref"), device=device, stream=io.StringIO())
    run.run(_experiment(tmp_path / "cut", steps=2), device=device, stream=io.StringIO())
    run.run(_experiment(tmp_path / "cut"), device=device, stream=io.StringIO())
    ref, cut = _records(tmp_path / "ref"), _records(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4] == [r["step"] for r in ref]
    for a, b in zip(cut, ref):
        if device == "cpu":
            assert a["loss"] == b["loss"]
        else:
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
        assert a["memory_peak"] > 0
    if device == "cuda":
        run.run(_experiment(tmp_path / "cpu"), device="cpu", stream=io.StringIO())
        for a, b in zip(ref, _records(tmp_path / "cpu")):
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"])
        assert "memory_reserved" in ref[-1]
    path = os.path.join(tmp_path, "ref", "checkpoints", "step-00000004")
    state, _ = checkpoint.load_state(path, CFG, optim.adamw(lr=1e-2), Mesh(Plan().resolve(1), 0),
                                  device=device)
    assert int(state.step) == 4
    assert all(v.device.type == device and v.dtype == torch.float32 for v in state.params.values())
