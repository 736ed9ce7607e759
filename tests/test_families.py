"""Every family evo reads from HF (LLaMA with llama3 rope scaling, tied and untied; Qwen2; Qwen3;
Mistral with a window shorter than the sequence) against transformers itself: the tiny random
models of ``hf_families`` (every tensor redrawn to matter), saved with ``save_pretrained`` and read
by evo. Everything runs in fp32 on CPU; logits are O(1), so 1e-4 absolute (fp32 rounding through
two layers, measured ~1e-6) is a real check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
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
    import dataclasses
    unwindowed = dataclasses.replace(cfg, sliding_window=None)
    tok = F.tokens()
    assert (evo_logits(cfg, params, tok) - evo_logits(unwindowed, params, tok)).abs().max() > 1e-2


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
