"""evo's LLaMA against transformers' LlamaForCausalLM (the independent reference), and the HF
checkpoint files evo.hf reads and writes.

Random weights are drawn at a scale that keeps activations O(1) (matrices ~ 1/sqrt(fan_in), norm
weights 1 ± 0.1), so logits are O(1) and a 1e-4 absolute tolerance is a real check, not a
consequence of tiny init weights. Everything runs in fp32 on CPU.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from evo import hf, models  # noqa: E402
from evo.models import internlm2, llama  # noqa: E402

TINY = dict(vocab_size=101, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
            intermediate_size=96, max_seq_len=64)
CONFIGS = {
    "gqa_untied": llama.Config(**TINY),
    "tied": llama.Config(**TINY, tie_embeddings=True),
    # original_max_position_embeddings=16 puts the blend band (wavelengths 4..16) and the
    # divided-by-factor band (> 16) inside a 40-token sequence, so the scaling changes the logits.
    "rope_llama3": llama.Config(**TINY, rope_theta=500000.0, rope_scaling=llama.RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)),
    "mha": llama.Config(**{**TINY, "num_kv_heads": None}),     # None: kv heads = heads
}
SEQ = 40


def random_params(cfg: llama.Config, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in llama.param_specs(cfg).items():
        w = torch.randn(spec.shape, generator=g)
        if spec.init == "ones":
            out[name] = 1.0 + 0.1 * w
        elif name == "embed":
            out[name] = w
        else:
            out[name] = w / math.sqrt(spec.shape[0])
    return out


def tokens(cfg: llama.Config, batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def reference_model(cfg: llama.Config, params: dict[str, torch.Tensor],
                    attn: str = "eager") -> LlamaForCausalLM:
    """LlamaForCausalLM configured by hand here (not through evo.hf) and loaded with evo's params."""
    rope = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings}
    conf = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=rope,
        tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_seq_len,
        attn_implementation=attn)
    model = LlamaForCausalLM(conf).float().eval()
    state = llama.LLAMA.to_hf(cfg, params)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    if cfg.tie_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# The model against transformers

@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    tok = tokens(cfg)
    with torch.no_grad():
        ours = llama.apply(cfg, params, tok)
        theirs = reference_model(cfg, params)(tok).logits
    assert ours.shape == theirs.shape == (2, SEQ, cfg.vocab_size)
    assert ours.std() > 0.5, "logits should be O(1) for the tolerance to mean something"
    assert max_abs(ours, theirs) <= 1e-4


def test_rope_scaling_changes_logits():
    """Guards the rope_llama3 case above against being vacuous."""
    scaled = CONFIGS["rope_llama3"]
    plain = llama.Config(**{**TINY, "rope_theta": scaled.rope_theta})
    params = random_params(plain)
    tok = tokens(plain)
    with torch.no_grad():
        assert max_abs(llama.apply(scaled, params, tok), llama.apply(plain, params, tok)) > 1e-2


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_gradients_match_transformers(name):
    cfg = CONFIGS[name]
    params = {k: v.requires_grad_() for k, v in random_params(cfg).items()}
    tok = tokens(cfg)
    logits = llama.apply(cfg, params, tok)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), tok[:, 1:].reshape(-1))
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    model = reference_model(cfg, {k: v.detach() for k, v in params.items()})
    ref_loss = model(tok, labels=tok).loss          # transformers shifts the labels itself
    ref_loss.backward()
    ref_grads = llama.LLAMA.from_hf(
        cfg, {n: p.grad for n, p in model.named_parameters()}, source="transformers grads")

    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        scale = ref_grads[k].abs().max().item()
        assert scale > 0, k
        assert max_abs(grads[k], ref_grads[k]) / scale <= 1e-4, k


# ---------------------------------------------------------------------------------------------
# config.json

@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trips(name):
    cfg = CONFIGS[name]
    d = hf.config_to_hf(cfg)
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    assert hf.config_from_hf(json.loads(json.dumps(d))) == cfg


def test_config_from_transformers_5_spelling(tmp_path):
    """transformers 5 save_pretrained writes rope_parameters instead of rope_theta/rope_scaling."""
    cfg = CONFIGS["rope_llama3"]
    reference_model(cfg, random_params(cfg)).config.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert hf.config_from_hf(d) == cfg


@pytest.mark.parametrize("change, key", [
    ({"vocab_size": None}, "vocab_size"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
])
def test_config_errors_name_file_and_key(change, key):
    d = {**hf.config_to_hf(CONFIGS["gqa_untied"]), **change}
    with pytest.raises(ValueError, match=rf"my/config\.json.*{key}"):
        hf.config_from_hf(d, source="my/config.json")


# ---------------------------------------------------------------------------------------------
# save_hf / load_hf

@pytest.mark.parametrize("name, max_shard_bytes", [("gqa_untied", None), ("tied", None),
                                                   ("rope_llama3", 40_000)])
def test_save_hf_loads_in_transformers(tmp_path, name, max_shard_bytes):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    out = hf.save_hf(cfg, params, tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(out))
    if max_shard_bytes:
        assert hf.INDEX_FILE in files and sum(f.startswith("model-0") for f in files) > 1
    else:
        assert files == ["config.json", "model.safetensors"]
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = tokens(cfg)
    with torch.no_grad():
        assert max_abs(model(tok).logits, llama.apply(cfg, params, tok)) <= 1e-4


@pytest.mark.parametrize("max_shard_bytes", [None, 30_000])
def test_load_hf_round_trips_bitwise(tmp_path, max_shard_bytes):
    cfg = CONFIGS["rope_llama3"]
    params = random_params(cfg)
    hf.save_hf(cfg, params, tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    cfg2, params2 = hf.load_hf(tmp_path / "ckpt")
    assert cfg2 == cfg
    assert list(params2) == list(params)
    for k in params:
        assert params2[k].dtype == torch.float32 and torch.equal(params2[k], params[k]), k


def test_save_hf_bf16(tmp_path):
    cfg = CONFIGS["tied"]
    params = random_params(cfg)
    hf.save_hf(cfg, params, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "ckpt/config.json").read_text())["torch_dtype"] == "bfloat16"
    _, stored = hf.load_hf(tmp_path / "ckpt", dtype=None)
    for k in params:
        assert stored[k].dtype == torch.bfloat16 and torch.equal(stored[k], params[k].bfloat16()), k


def test_save_hf_refuses_to_clobber_and_overwrites_when_asked(tmp_path):
    cfg = CONFIGS["gqa_untied"]
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="overwrite"):
        hf.save_hf(cfg, random_params(cfg), out)
    assert os.listdir(out) == ["notes.txt"]
    hf.save_hf(cfg, random_params(cfg, seed=3), out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert torch.equal(hf.load_hf(out)[1]["embed"], random_params(cfg, seed=3)["embed"])
    assert os.listdir(tmp_path) == ["ckpt"]         # no temporary or old directories left


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    cfg = CONFIGS["gqa_untied"]
    out = tmp_path / "ckpt"
    hf.save_hf(cfg, random_params(cfg), out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        hf.save_hf(cfg, random_params(cfg, seed=5), out, max_shard_bytes=30_000, overwrite=True)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["ckpt"]
    # and a fresh target is not created half-written either
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        hf.save_hf(cfg, random_params(cfg), tmp_path / "new", max_shard_bytes=30_000)
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["ckpt"]


# ---------------------------------------------------------------------------------------------
# InternLM2

def internlm2_dir(tmp_path, cfg: llama.Config, params) -> "os.PathLike":
    """A directory in InternLM2's own HF layout, written here from transformers-LLaMA tensors and
    InternLM2's published packing, independently of evo's family code: per kv head g, its
    heads//kv_heads query heads, then its key head, then its value head ("b q (h gs d)")."""
    hf_state = llama.LLAMA.to_hf(cfg, params)
    kv, r, d, h = cfg.kv_heads, cfg.q_per_kv, cfg.dim_per_head, cfg.hidden_size
    names = {"input_layernorm": "attention_norm", "self_attn.o_proj": "attention.wo",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "feed_forward.w1",
             "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
    state = {"model.tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
             "model.norm.weight": hf_state["model.norm.weight"],
             "output.weight": hf_state["lm_head.weight"]}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for a, b in names.items():
            state[p + b + ".weight"] = hf_state[p + a + ".weight"]
        q, k, v = (hf_state[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        state[p + "attention.wqkv.weight"] = torch.cat(
            [q.view(kv, r, d, h), k.view(kv, 1, d, h), v.view(kv, 1, d, h)], dim=1).reshape(-1, h)
    src = tmp_path / "internlm2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2",
        "vocab_size": cfg.vocab_size, "hidden_size": h, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": kv, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": 0.02,
        "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": False, "bias": False, "rope_theta": 10000,
        "rope_scaling": None, "attn_implementation": "eager", "torch_dtype": "float32",
    }))
    save_file({k: t.contiguous() for k, t in state.items()}, src / "model.safetensors",
              metadata={"format": "pt"})
    return src


def test_internlm2_directory_loads_and_exports_back_byte_identical(tmp_path):
    cfg = CONFIGS["gqa_untied"]
    params = random_params(cfg)
    src = internlm2_dir(tmp_path, cfg, params)

    icfg, iparams = hf.load_hf(src)                        # the family from "architectures"
    assert type(icfg) is internlm2.Config and models.family_of(icfg).name == "internlm2"
    assert icfg == internlm2.Config(**TINY)
    assert iparams.keys() == params.keys()
    assert all(torch.equal(iparams[k], params[k]) for k in params)   # = evo's own conversion

    out = hf.save_hf(icfg, iparams, tmp_path / "again")
    written, original = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    assert written.keys() == original.keys()
    for k in original:   # byte-identical tensors
        assert written[k].dtype == original[k].dtype and written[k].shape == original[k].shape, k
        assert written[k].numpy().tobytes() == original[k].numpy().tobytes(), k
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "InternLM2ForCausalLM"]
    assert hf.load_hf(out)[0] == icfg


def test_internlm2_converts_to_transformers_llama(tmp_path):
    cfg = CONFIGS["gqa_untied"]
    params = random_params(cfg)
    out = hf.convert_hf(internlm2_dir(tmp_path, cfg, params), tmp_path / "llama", "llama")
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(out / "model.safetensors")
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = tokens(cfg)
    with torch.no_grad():
        assert max_abs(model(tok).logits, llama.apply(cfg, params, tok)) <= 1e-4


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    src = tmp_path / "deepseek"
    src.mkdir()
    conf = hf.config_to_hf(CONFIGS["gqa_untied"])
    conf.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                n_routed_experts=4)
    (src / "config.json").write_text(json.dumps(conf))
    save_file({"model.embed_tokens.weight": torch.zeros(101, 64)}, src / "model.safetensors")
    with pytest.raises(ValueError) as e:
        hf.load_hf(src)
    msg = str(e.value)
    assert "'DeepseekV3ForCausalLM' is not supported" in msg and str(src / "config.json") in msg
    for arch in models.hf_architectures():
        assert arch in msg
    assert "LlamaForCausalLM" in msg and "InternLM2ForCausalLM" in msg


# ---------------------------------------------------------------------------------------------
# Bad input: one ValueError naming the file (and tensor)

@pytest.fixture
def saved(tmp_path):
    cfg = CONFIGS["gqa_untied"]
    hf.save_hf(cfg, random_params(cfg), tmp_path / "single")
    hf.save_hf(cfg, random_params(cfg), tmp_path / "sharded", max_shard_bytes=30_000)
    return tmp_path


def test_load_missing_directory(tmp_path):
    with pytest.raises(ValueError, match=r"nope.*no such checkpoint directory"):
        hf.load_hf(tmp_path / "nope")


def test_load_missing_config(saved):
    (saved / "single/config.json").unlink()
    with pytest.raises(ValueError, match=r"single/config\.json.*missing"):
        hf.load_hf(saved / "single")


def test_load_missing_shard(saved):
    shard = sorted((saved / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=rf"{shard.name}.*missing"):
        hf.load_hf(saved / "sharded")


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_load_truncated_safetensors(saved, which):
    f = sorted((saved / which).glob("model*.safetensors"))[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=rf"{f.name}.*truncated or corrupt"):
        hf.load_hf(saved / which)


def test_load_corrupt_header(saved):
    f = saved / "single/model.safetensors"
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        hf.load_hf(saved / "single")


def test_load_wrong_shape_tensor(saved):
    f = saved / "single/model.safetensors"
    state = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = torch.zeros(95, 64)
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{name}.*\(95, 64\).*\(96, 64\)"):
        hf.load_hf(saved / "single")


def test_load_missing_tensor(saved):
    f = saved / "single/model.safetensors"
    state = load_file(f)
    del state["model.norm.weight"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.norm\.weight.*missing"):
        hf.load_hf(saved / "single")


def test_load_config_disagreeing_with_tensors(saved):
    """A config.json whose sizes disagree with the tensors names the tensor's file."""
    path = saved / "sharded/config.json"
    d = json.loads(path.read_text())
    path.write_text(json.dumps({**d, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"model-\d{5}-of-\d{5}\.safetensors.*mlp.*shape"):
        hf.load_hf(saved / "sharded")
