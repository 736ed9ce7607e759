"""The model-family contract: the registry, the blocks, one block for training and decoding, a
family defined outside evo/ (experiments/gelu_mlp.py), families recorded in checkpoints, and the
errors for an unsupported HF architecture and a checkpoint of another family.

fp32 on CPU. The GELU family is checked against a forward written out here with torch ops
(1e-5 absolute on O(1) logits); KV-cache decoding against the full forward at 1e-5 relative to
the logits' scale, as tests/test_generate.py.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from evo import checkpoint, hf, models, train
from evo.models import internlm2, llama
from evo.models.layers import LOCAL
from evo.sharding import Plan
from evo.sharding.mesh import Mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
            intermediate_size=48, max_seq_len=64)


def load_gelu_experiment(monkeypatch, tmp_path):
    """experiments/gelu_mlp.py as a module, without building its corpus (not needed here)."""
    from evo import data
    monkeypatch.setattr(data, "build_stdlib_corpus", lambda folder: (str(tmp_path / "train"),
                                                                     str(tmp_path / "valid")))
    spec = importlib.util.spec_from_file_location("gelu_mlp",
                                                  os.path.join(REPO, "experiments", "gelu_mlp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_params(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor matters: norm weights 1 ± 0.1, matrices ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in models.param_specs(cfg).items():
        w = torch.randn(spec.shape, generator=g)
        out[name] = (1.0 + 0.1 * w if spec.init == "ones" else
                     w if len(spec.shape) == 2 and spec.axes[0] == "vocab" else
                     w / math.sqrt(spec.shape[0]))
    return out


# ---------------------------------------------------------------------------------------------
# Registry

def test_registry_finds_families_by_name_config_and_architecture():
    assert {"llama", "internlm2"} <= set(models.names())
    assert models.family_of(llama.Config(**TINY)) is models.get("llama") is llama.LLAMA
    assert models.family_of(internlm2.Config(**TINY)) is internlm2.INTERNLM2
    assert models.for_architecture("LlamaForCausalLM") is llama.LLAMA
    assert models.for_architecture("InternLM2ForCausalLM") is internlm2.INTERNLM2
    assert models.for_architecture("DeepseekV3ForCausalLM") is None
    with pytest.raises(ValueError, match=r"model family 'gpt9' is not registered \(known: .*llama"):
        models.get("gpt9")
    with pytest.raises(ValueError, match="dict is not the config of a registered model family"):
        models.family_of({"hidden_size": 8})


def test_register_refuses_a_name_taken_by_another_family():
    class Other(llama.Llama):
        name = "llama"
    with pytest.raises(ValueError, match="must set family = 'llama'|already registered"):
        models.register(Other())

    class NoConfig(llama.Llama):
        name = "nameless_config"
    with pytest.raises(ValueError, match="must set family = 'nameless_config'"):
        models.register(NoConfig())


def test_experiment_and_step_accept_any_family_and_reject_other_objects():
    from evo import Experiment, data, optim
    from evo.config import ConfigError
    opt = optim.adamw(lr=1e-3)
    Experiment(model=internlm2.Config(**TINY), data=data.Packed(folder=None, seq_len=8),
               optimizer=opt)
    with pytest.raises(ConfigError, match="experiment.model: .*not the config of a registered"):
        Experiment(model={"hidden_size": 8}, data=data.Packed(folder=None, seq_len=8),
                   optimizer=opt)
    with pytest.raises(ValueError, match="Step.model: "):
        train.Step("llama", opt)


# ---------------------------------------------------------------------------------------------
# Blocks

@pytest.mark.parametrize("cfg", [llama.Config(**TINY), llama.Config(**TINY, tie_embeddings=True),
                                 internlm2.Config(**TINY)], ids=["untied", "tied", "internlm2"])
def test_blocks_cover_every_parameter_in_order(cfg):
    blocks = models.blocks(cfg)
    assert [b.kind for b in blocks] == ["embed", *["layer"] * cfg.num_layers, "head"]
    owned = list(dict.fromkeys(k for b in blocks for k in b.params))   # first block reading each
    assert owned == list(models.param_specs(cfg))
    for i, b in enumerate(blocks[1:-1]):
        assert b.name == f"layers.{i}" and all(k.startswith(f"layers.{i}.") for k in b.params)
    out, vocab_dim = models.family_of(cfg).output_param(cfg)
    assert out in blocks[-1].params
    assert models.param_specs(cfg)[out].axes[vocab_dim] == "vocab"


def test_forward_is_the_blocks_run_in_order():
    cfg = llama.Config(**TINY, tie_embeddings=True)
    fam, params = models.family_of(cfg), random_params(cfg)
    tok = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12).expand(2, 12)
    ctx = fam.context(cfg, pos, torch.float32, models.family.Attend(None, "auto"),
                      models.layers.ops())
    x = tok
    for layer, b in enumerate(models.blocks(cfg)):
        p = {k: params[k] for k in b.params}
        x = (fam.embed(cfg, p, x, ctx, LOCAL) if b.kind == "embed" else
             fam.head(cfg, p, x, ctx, LOCAL) if b.kind == "head" else
             fam.block(cfg, p, layer - 1, x, ctx, LOCAL))
    assert torch.equal(x, models.forward(cfg, params, tok))


# ---------------------------------------------------------------------------------------------
# One block for training and decoding

def test_decode_runs_the_family_block(monkeypatch):
    """Decoding calls the same ``block`` as training: once per layer per decode call, and a
    change to the block changes decoding."""
    cfg = internlm2.Config(**TINY)
    params = random_params(cfg)
    seq = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    calls = []
    original = internlm2.InternLM2.block

    def counting(self, cfg, p, layer, x, ctx, regions):
        calls.append(layer)
        return original(self, cfg, p, layer, x, ctx, regions)
    monkeypatch.setattr(internlm2.InternLM2, "block", counting)
    cache = models.init_cache(cfg, 2, 10)
    _, cache = models.decode(cfg, params, seq[:, :6], cache)
    _, cache = models.decode(cfg, params, seq[:, 6:7], cache)
    assert calls == [0, 1, 2, 0, 1, 2]
    monkeypatch.setattr(internlm2.InternLM2, "mlp", lambda self, cfg, p, h, ctx: 0 * h)
    full = models.forward(cfg, params, seq[:, :6])
    got, _ = models.decode(cfg, params, seq[:, :6], models.init_cache(cfg, 2, 10))
    assert torch.allclose(got, full, atol=1e-5)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", ["internlm2", "llama_gelu"])
def test_kv_cache_equals_recomputation(family, monkeypatch, tmp_path):
    if family == "llama_gelu":
        cfg = load_gelu_experiment(monkeypatch, tmp_path).GeluConfig(**TINY)
    else:
        cfg = internlm2.Config(**TINY)
    params = random_params(cfg, seed=3)
    seq = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    full = models.forward(cfg, params, seq)
    cache, pieces = models.init_cache(cfg, 2, 20), []
    for a, b in ((0, 7), (7, 8), (8, 13), *((i, i + 1) for i in range(13, 20))):
        logits, cache = models.decode(cfg, params, seq[:, a:b], cache)
        pieces.append(logits)
    assert rel(torch.cat(pieces, 1), full) <= 1e-5


# ---------------------------------------------------------------------------------------------
# A family defined in an experiment file

def gelu_reference(cfg, params, tokens):
    """The GELU family written out with torch ops: RMSNorm, rotate-half RoPE, GQA causal SDPA."""
    h, H, kv, d = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.hidden_size // cfg.num_heads
    b, s = tokens.shape

    def norm(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(s).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):   # [b, heads, s, d]
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin
    x = params["embed"][tokens]
    for i in range(cfg.num_layers):
        p = {k[len(f"layers.{i}."):]: v for k, v in params.items() if k.startswith(f"layers.{i}.")}
        w = p["attn.wqkv"].view(h, kv, H // kv + 2, d)
        wq, wk, wv = (w[:, :, :H // kv].reshape(h, H * d), w[:, :, -2].reshape(h, kv * d),
                      w[:, :, -1].reshape(h, kv * d))
        a = norm(x, p["attn_norm"])
        q = rope((a @ wq).view(b, s, H, d).transpose(1, 2))
        k = rope((a @ wk).view(b, s, kv, d).transpose(1, 2)).repeat_interleave(H // kv, 1)
        v = (a @ wv).view(b, s, kv, d).transpose(1, 2).repeat_interleave(H // kv, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + o.transpose(1, 2).reshape(b, s, H * d) @ p["attn.wo"]
        m = norm(x, p["mlp_norm"])
        x = x + F.gelu(m @ p["mlp.w1"], approximate="tanh") @ p["mlp.w2"]
    return norm(x, params["norm"]) @ params["lm_head"]


def test_a_family_defined_in_an_experiment_file(monkeypatch, tmp_path):
    module = load_gelu_experiment(monkeypatch, tmp_path)
    cfg = module.GeluConfig(**TINY)
    assert models.family_of(cfg).name == "llama_gelu"
    assert not any(k.endswith("mlp.w3") for k in models.param_specs(cfg))
    params = random_params(cfg)
    tok = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    ours = models.forward(cfg, params, tok)
    assert ours.std() > 0.5
    assert (ours - gelu_reference(cfg, params, tok)).abs().max() <= 1e-5
    # a train step runs on it, and HF export refuses it by name
    opt = module.experiment.optimizer.with_total_steps(module.experiment.steps)
    state = train.init_state(params, opt)
    batch = {"tokens": tok[None], "labels": tok.roll(-1, 1)[None]}
    _, metrics = train.Step(cfg, opt)(state, batch)
    assert math.isfinite(float(metrics["loss"]))
    with pytest.raises(ValueError, match="model family 'llama_gelu' has no HF mapping"):
        hf.save_hf(cfg, params, tmp_path / "hf")


# ---------------------------------------------------------------------------------------------
# Checkpoints record the family; init_from of another family; unsupported architectures

def save_checkpoint(cfg, params, root):
    from evo import optim
    mesh = Mesh(Plan().resolve(1), 0)
    saver = checkpoint.Saver(str(root), mesh, asynchronous=False)
    saver.save(cfg, train.init_state(params, optim.adamw(lr=1e-3)), loader_state={}, meta={})
    return checkpoint.resolve(str(root))


def test_checkpoint_records_the_family_and_refuses_another(tmp_path):
    cfg = internlm2.Config(**TINY)
    params = random_params(cfg)
    ckpt = save_checkpoint(cfg, params, tmp_path / "checkpoints")
    index = checkpoint.read_index(ckpt)
    assert index["family"] == "internlm2"
    assert checkpoint.model_config(index, ckpt) == cfg
    loaded = checkpoint.load_params(ckpt, cfg, Mesh(Plan().resolve(1), 0))
    assert all(torch.equal(loaded[k], params[k]) for k in params)
    with pytest.raises(checkpoint.CheckpointError,
                       match="holds a model of family 'internlm2', but this run's model is of "
                             "family 'llama'"):
        checkpoint.load_params(ckpt, llama.Config(**TINY), Mesh(Plan().resolve(1), 0))


EXPERIMENT = textwrap.dedent("""
    from evo import Experiment, data, models, optim
    experiment = Experiment(
        model=models.llama.Config(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4,
                                  num_kv_heads=2, intermediate_size=48, max_seq_len=64),
        data=data.Packed(folder=None, seq_len=16, micro_batch=2, micro_num=1, seed=5),
        optimizer=optim.adamw(lr=1e-3), steps=2, run_dir=RUN_DIR)
""")


def evo_cli(*args):
    return subprocess.run([sys.executable, "-m", "evo", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))


def test_init_from_a_checkpoint_of_another_family_names_both(tmp_path):
    ckpt = save_checkpoint(internlm2.Config(**TINY), random_params(internlm2.Config(**TINY)),
                           tmp_path / "src" / "checkpoints")
    run_dir = tmp_path / "run"
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT.replace("RUN_DIR", repr(str(run_dir))))
    r = evo_cli("train", str(exp), "--set", f"init_from={ckpt}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("evo: error: ") and "Traceback" not in r.stderr
    assert "family 'internlm2'" in r.stderr and "family 'llama'" in r.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def deepseek_dir(tmp_path):
    src = tmp_path / "deepseek"
    src.mkdir()
    conf = hf.config_to_hf(llama.Config(**TINY))
    conf.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                n_routed_experts=4)
    (src / "config.json").write_text(json.dumps(conf))
    from safetensors.torch import save_file
    save_file({"model.embed_tokens.weight": torch.zeros(61, 32)}, src / "model.safetensors")
    return src


@pytest.mark.parametrize("command", ["generate", "import-hf"])
def test_unsupported_architecture_is_one_error_and_writes_nothing(tmp_path, command):
    src = deepseek_dir(tmp_path)
    run_dir = tmp_path / "run"
    if command == "generate":
        r = evo_cli("generate", str(src), "--prompt", "hi", "--tokenizer", "byte")
    else:
        exp = tmp_path / "exp.py"
        exp.write_text(EXPERIMENT.replace("RUN_DIR", repr(str(run_dir))))
        r = evo_cli("import-hf", str(src), str(exp))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("evo: error: ") and "Traceback" not in r.stderr
    assert "architecture 'DeepseekV3ForCausalLM' is not supported" in r.stderr
    assert "LlamaForCausalLM" in r.stderr and "InternLM2ForCausalLM" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3
    assert sorted(os.listdir(tmp_path)) == sorted(["deepseek", *(["exp.py"] if command != "generate"
                                                              else [])])


def test_the_core_names_no_family_and_no_parameter():
    """Outside evo/models/, no module imports a family module or spells a parameter name."""
    r = subprocess.run(["grep", "-rnE", r'llama|lm_head|layers\.\{|"norm"', "evo",
                        "--include=*.py"], capture_output=True, text=True, cwd=REPO)
    hits = [line for line in r.stdout.splitlines()
            if not line.startswith("evo/models/")]
    assert hits == []


# ---------------------------------------------------------------------------------------------
# The family defined in the experiment file under three plans (gloo, 4 processes)

def test_plans_on_the_experiment_file_family_equal_one_process(tmp_path, monkeypatch):
    """dp2×tp2 ZeRO-3, tp2 with sequence parallelism, dp4 hybrid ZeRO-3: losses and final params
    against one process at the sweep's tolerances (fp32: losses 1e-5, params 1e-5 in relative L2
    norm, 1e-4 in max difference relative to the largest entry; tests/test_sharding.py), and the
    measured communication bytes equal to the planner's model, counted from the family's blocks."""
    from family_sweep_worker import FIELDS, PLANS
    from sweep_worker import GLOBAL_MICRO, SOURCES, T
    out = tmp_path / "sweep.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                        "--standalone", os.path.join(REPO, "tests", "family_sweep_worker.py"),
                        str(out)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep = json.loads(out.read_text())
    assert sweep["family"] == "llama_gelu" and set(sweep["plans"]) == {n for n, _, _ in PLANS}
    from evo.sharding import planner
    cfg = load_gelu_experiment(monkeypatch, tmp_path).GeluConfig(**FIELDS)
    for name, plan, world in PLANS:
        got = sweep["plans"][name]
        assert got["loss_rel"] <= 1e-5, (name, got)
        assert got["param_norm_rel"] <= 1e-5 and got["param_rel"] <= 1e-4, (name, got)
        resolved = plan.resolve(world)
        expected = planner.expected_comm_bytes(cfg, resolved, tokens_per_micro=T, sources=SOURCES,
                                               micro_num=GLOBAL_MICRO // resolved.dp)
        assert all(measured == expected for measured in got["comm_bytes"]), (name, expected)


def test_internlm2_config_refuses_what_its_config_json_cannot_say():
    with pytest.raises(ValueError, match="Config.head_dim=16: InternLM2's head size is "):
        internlm2.Config(**{**TINY, "head_dim": 16})
    with pytest.raises(ValueError, match="Config.rope_scaling: InternLM2 has no LLaMA-3"):
        internlm2.Config(**TINY, rope_scaling=llama.RopeScaling())
    conf = hf.config_to_hf(internlm2.Config(**TINY))
    conf["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with pytest.raises(ValueError, match="config.json: rope_scaling type 'dynamic' is not "
                                         "supported"):
        hf.config_from_hf(conf)
