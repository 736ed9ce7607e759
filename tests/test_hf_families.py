"""Every family evo reads from HF (LLaMA with llama3 rope scaling, tied and untied; Qwen2; Qwen3;
Mistral with a window shorter than the sequence) against transformers itself: the tiny random
models of ``hf_families`` (every tensor redrawn to matter), saved with ``save_pretrained`` and read
by evo. Everything runs in fp32 on CPU; logits are O(1), so 1e-4 absolute (fp32 rounding through
two layers, measured ~1e-6) is a real check.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF
from safetensors import safe_open

import hf_families as F
from evo import hf, models

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each fixture saved once: name -> (directory, transformers model)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, F.save(name, root / name)) for name in F.NAMES}


def evo_logits(cfg, params, tokens, cu_seqlens=None):
    with torch.no_grad():
        return models.apply(cfg, params, tokens, cu_seqlens=cu_seqlens)


# ---------------------------------------------------------------------------------------------
# Logits

@pytest.mark.parametrize("name", F.NAMES)
def test_logits_equal_transformers(hf_dirs, name):
    path, ref = hf_dirs[name]
    cfg, params = hf.load_hf(path)
    tok = F.tokens()
    with torch.no_grad():
        theirs = ref(tok).logits
    ours = evo_logits(cfg, params, tok)
    assert ours.shape == theirs.shape == (2, F.SEQ, F.VOCAB)
    assert theirs.std() > 0.5, "logits should be O(1) for the tolerance to mean something"
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("name", F.NAMES)
def test_packed_documents_equal_each_document_alone(hf_dirs, name):
    """Documents of 9, 7 and 8 tokens (all longer than Mistral's window of 5) packed in one row
    with cu_seqlens; each compared with transformers run on that document alone."""
    path, ref = hf_dirs[name]
    cfg, params = hf.load_hf(path)
    tok = F.tokens(batch=1)
    cu = torch.tensor([0, 9, 16, F.SEQ])
    ours = evo_logits(cfg, params, tok, cu)
    for a, b in zip(cu.tolist(), cu[1:].tolist()):
        with torch.no_grad():
            theirs = ref(tok[:, a:b]).logits
        assert (ours[:, a:b] - theirs).abs().max() <= TOL, (a, b)


def test_mistral_window_changes_the_logits(hf_dirs):
    """Guards the Mistral cases against being vacuous: the same weights without the window."""
    path, ref = hf_dirs["mistral"]
    cfg, params = hf.load_hf(path)
    assert cfg.sliding_window == F.WINDOW < F.SEQ
    unwindowed = dataclasses.replace(cfg, sliding_window=None)
    tok = F.tokens()
    assert (evo_logits(cfg, params, tok) - evo_logits(unwindowed, params, tok)).abs().max() > 1e-2


@pytest.mark.parametrize("name", F.NAMES)
def test_loss_gradients_equal_transformers_autograd(hf_dirs, name):
    """The gradients one training step applies: evo's loss and every parameter's gradient
    against transformers' (autograd on the HF model, mapped to evo's layout by the family's own
    HF mapping). fp32: loss 1e-5 relative, gradients 1e-4 relative to each tensor's largest."""
    path, ref = hf_dirs[name]
    cfg, params = hf.load_hf(path)
    params = {k: v.requires_grad_() for k, v in params.items()}
    tok = F.tokens()
    logits = models.apply(cfg, params, tok)
    loss = TF.cross_entropy(logits[:, :-1].reshape(-1, F.VOCAB), tok[:, 1:].reshape(-1))
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    ref.zero_grad()
    ref_loss = ref(tok, labels=tok).loss            # transformers shifts the labels itself
    ref_loss.backward()
    ref_grads = models.family_of(cfg).from_hf(
        cfg, {n: p.grad for n, p in ref.named_parameters()}, source="transformers grads")
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        scale = ref_grads[k].abs().max().item()
        assert scale > 0, k
        assert (grads[k] - ref_grads[k]).abs().max().item() / scale <= 1e-4, k


# ---------------------------------------------------------------------------------------------
# config.json: what is not implemented is refused, naming the key

@pytest.mark.parametrize("name, change, key", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
     "yarn"),
    ("qwen2", {"mlp_bias": True}, "mlp_bias"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
    ("mistral", {"sliding_window": 0}, "sliding_window"),
    ("mistral", {"hidden_act": "gelu"}, "hidden_act"),
])
def test_unimplemented_config_features_are_refused(hf_dirs, name, change, key):
    path, _ = hf_dirs[name]
    d = {**json.loads((path / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=key) as e:
        hf.config_from_hf(d, source="some/config.json")
    assert "some/config.json" in str(e.value)


def test_refused_config_is_one_cli_error(hf_dirs, tmp_path):
    src, _ = hf_dirs["qwen2"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(src):
        (bad / f).write_bytes((src / f).read_bytes())
    d = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**d, "use_sliding_window": True}))
    r = _evo("generate", str(bad), "--prompt", "w1 w2", "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("evo: error:") and "use_sliding_window" in r.stderr


@pytest.mark.parametrize("name", F.NAMES)
def test_config_round_trips(hf_dirs, name):
    path, _ = hf_dirs[name]
    cfg = hf.config_from_hf(json.loads((path / "config.json").read_text()))
    assert models.family_of(cfg).name == F.FAMILY[name]
    assert hf.config_from_hf(json.loads(json.dumps(hf.config_to_hf(cfg)))) == cfg


def test_added_parameters_axes_and_flops(hf_dirs):
    """The q/k/v bias splits over tp like wqkv's output axis; the per-head norms are replicated
    and listed as the block's ``inside`` parameters; Mistral's FLOPs count attention scores over at
    most the window."""
    q2, _ = hf.load_hf(hf_dirs["qwen2"][0])
    q3, _ = hf.load_hf(hf_dirs["qwen3"][0])
    ms, _ = hf.load_hf(hf_dirs["mistral"][0])
    d = q3.dim_per_head
    width = (q2.num_heads + 2 * q2.kv_heads) * q2.dim_per_head
    assert models.param_specs(q2)["layers.1.attn.bqkv"] == ((width,), ("qkv",), "zeros")
    assert models.param_specs(q3)["layers.1.attn.q_norm"] == ((d,), ("norm",), "ones")
    assert models.blocks(q3)[2].inside == ("layers.1.attn.q_norm", "layers.1.attn.k_norm")
    assert all(not b.inside for b in models.blocks(q2) + models.blocks(ms))
    n = models.family_of(ms).non_embedding_params(ms)
    attn = ms.num_heads * ms.dim_per_head * ms.num_layers
    assert models.flops_per_token(ms, 1000) == 6 * n + 12 * attn * F.WINDOW
    assert models.flops_per_token(ms, 3) == 6 * n + 12 * attn * 3


# ---------------------------------------------------------------------------------------------
# KV-cache decoding: the same block as training, over a cache

@pytest.mark.parametrize("name", F.NAMES)
def test_kv_cache_decoding_equals_the_whole_sequence(hf_dirs, name):
    """Chunks of 7, 1, 5 and then single tokens (24 > Mistral's window): fp32, 1e-5 relative to
    the logits' scale."""
    path, _ = hf_dirs[name]
    cfg, params = hf.load_hf(path)
    tok = F.tokens()
    full = evo_logits(cfg, params, tok)
    cache, pieces = models.init_cache(cfg, 2, F.SEQ), []
    for a, b in ((0, 7), (7, 8), (8, 13), *((i, i + 1) for i in range(13, F.SEQ))):
        logits, cache = models.decode(cfg, params, tok[:, a:b], cache)
        pieces.append(logits)
    got = torch.cat(pieces, 1)
    assert ((got - full).abs().max() / full.abs().max()).item() <= 1e-5


def test_left_padded_prompts_decode_as_each_alone(hf_dirs):
    """Prompts of 3 and 9 tokens batched (the short one left-padded), 8 new tokens each: the
    window slides over real tokens only, as for each prompt generated alone."""
    from evo import generate
    cfg, params = hf.load_hf(hf_dirs["mistral"][0])
    prompts = [[4, 8, 15], [16, 23, 42, 7, 1, 9, 30, 2, 11]]
    together = generate.generate(cfg, params, prompts, 8, temperature=0)
    assert together == [generate.generate(cfg, params, [p], 8, temperature=0)[0] for p in prompts]


# ---------------------------------------------------------------------------------------------
# Generation: the CLI against transformers' greedy generate

def _evo(*args):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "evo", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("name", F.NAMES)
def test_evo_generate_equals_transformers_greedy(hf_dirs, name):
    """A 7-token prompt and 9 new tokens: 16 > Mistral's window, so decoding must slide it."""
    path, ref = hf_dirs[name]
    prompt = [5, 17, 3, 88, 42, 9, 60]
    text = " ".join(f"w{i}" for i in prompt)
    r = _evo("generate", str(path), "--prompt", text, "--max-new-tokens", "9",
             "--temperature", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    new = [int(w[1:]) for w in r.stdout.strip()[len(text):].split()]
    assert new == F.greedy(ref, prompt, 9)


# ---------------------------------------------------------------------------------------------
# Export and reload

def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("name", F.NAMES)
def test_export_reload_is_bitwise(hf_dirs, tmp_path, name):
    path, ref = hf_dirs[name]
    cfg, params = hf.load_hf(path)
    out = hf.save_hf(cfg, params, tmp_path / "out")
    cfg2, params2 = hf.load_hf(out)
    assert cfg2 == cfg
    assert params2.keys() == params.keys()
    assert all(torch.equal(params2[k], params[k]) for k in params)
    theirs, ours = _tensors(path), _tensors(out)
    assert ours.keys() == theirs.keys()          # tied models store no lm_head either way
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert ours[k].numpy().tobytes() == theirs[k].numpy().tobytes(), k
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ref.config.architectures
    # transformers reads the exported directory back as the same model: config.json carries
    # every feature (biases, head_dim, the window, rope scaling, tying).
    again = F.transformers.AutoModelForCausalLM.from_pretrained(
        str(out), attn_implementation="eager").eval()
    tok = F.tokens()
    with torch.no_grad():
        assert torch.equal(again(tok).logits, ref(tok).logits)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_packed_expert_tensors_load_as_the_per_expert_ones(hf_dirs, tmp_path, name):
    """transformers 5's in-memory layout (experts.gate_up_proj / down_proj, Mixtral's MoE under
    mlp.) saved as is: evo reads the same params, bitwise, as from the per-expert files."""
    import shutil

    from safetensors.torch import save_file
    path, ref = hf_dirs[name]
    cfg, params = hf.load_hf(path)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    (tmp_path / "packed").mkdir()
    shutil.copy(path / "config.json", tmp_path / "packed" / "config.json")
    save_file(state, str(tmp_path / "packed" / "model.safetensors"))
    cfg2, params2 = hf.load_hf(tmp_path / "packed")
    assert cfg2 == cfg and params2.keys() == params.keys()
    assert all(torch.equal(params2[k], params[k]) for k in params)


# ---------------------------------------------------------------------------------------------
# Parallel plans: the families' extra parameters (q/k/v bias split like wqkv's output axis,
# replicated per-head norms whose partial gradients are summed over tp) under tp, tp+sp, ZeRO-3
# and their mixes, on 2 and 4 processes

def test_plans_equal_one_process_and_comm_model_is_exact(tmp_path):
    """Tolerances as tests/test_sharding.py's sweep (fp32): losses 1e-5 relative, params 1e-5 in
    relative L2 norm and 1e-4 in max difference relative to the largest entry."""
    from families_tp_worker import CONFIGS, PLANS

    from evo.sharding import planner
    from sweep_worker import GLOBAL_MICRO, SOURCES, T
    out = tmp_path / "families.json"
    here = os.path.dirname(__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.getcwd(), here]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                        "--standalone", os.path.join(here, "families_tp_worker.py"), str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(out.read_text())
    for fam, cfg in CONFIGS.items():
        for name, (plan, world) in PLANS.items():
            res = results[f"{fam}/{name}"]
            assert res["loss_rel"] <= 1e-5 and res["param_norm_rel"] <= 1e-5, (fam, name, res)
            assert res["param_rel"] <= 1e-4, (fam, name, res)
            resolved = plan.resolve(world)
            expected = planner.expected_comm_bytes(cfg, resolved,
                                                   micro_num=GLOBAL_MICRO // resolved.dp,
                                                   tokens_per_micro=T, sources=SOURCES)
            assert all(m == expected for m in res["comm_bytes"]), (fam, name, res, expected)


# ---------------------------------------------------------------------------------------------
# Training from an HF directory

INIT_FROM = """
import json
from evo import Experiment, data, hf, optim
experiment = Experiment(
    model=hf.config_from_hf(json.load(open(HF_DIR + "/config.json"))),
    data=data.Packed(folder=None, seq_len=24, micro_batch=2),
    optimizer=optim.adamw(lr=1e-3), steps=3, checkpoint_every=3, run_dir=RUN_DIR,
    init_from=HF_DIR)
"""


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral"])
def test_init_from_an_hf_directory_trains(hf_dirs, tmp_path, name):
    """`evo train` with ``init_from=HF_DIR``: the first logged loss is the loss of the HF weights
    on that batch (computed here in-process), and the run takes its steps."""
    from evo import config, data, train
    path, _ = hf_dirs[name]
    exp = tmp_path / "exp.py"
    exp.write_text(INIT_FROM.replace("HF_DIR", repr(str(path)))
                   .replace("RUN_DIR", repr(str(tmp_path / "run"))))
    e = config.load(str(exp))
    assert models.family_of(e.model).name == name
    cfg, params = hf.load_hf(path)
    batch = next(data.Loader(e.data, vocab_size=cfg.vocab_size))
    _, aux = train.Step(cfg, e.optimizer.with_total_steps(e.steps)).grads(params, batch)
    r = _evo("train", str(exp))
    assert r.returncode == 0, r.stderr[-3000:]
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert abs(logged[0]["loss"] - float(aux["loss"])) <= 1e-6 * float(aux["loss"])
