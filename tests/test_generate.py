"""Generation: KV-cache decoding against recomputing the whole sequence (fp32, 1e-5 relative to
the logits' scale), batched ragged prompts against one prompt at a time, the sampling filters, and
`evo generate` on a trained run."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import repo_env
from evo import generate
from evo.models import llama

CONFIGS = {
    "gqa": llama.Config(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                        intermediate_size=96, max_seq_len=64),
    "tied-mha-llama3": llama.Config(vocab_size=61, hidden_size=48, num_layers=2, num_heads=3,
                                    intermediate_size=80, max_seq_len=64, tie_embeddings=True,
                                    rope_theta=500000.0,
                                    rope_scaling=llama.RopeScaling(factor=8.0, low_freq_factor=1.0,
                                                                   high_freq_factor=4.0,
                                                                   original_max_position_embeddings=16)),
}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_equals_recomputation(name):
    cfg = CONFIGS[name]
    params = llama.init(cfg, seed=1)
    seq = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    full = llama.apply(cfg, params, seq)
    cache = llama.init_cache(cfg, 2, 24)
    pieces = []
    for a, b in ((0, 9), (9, 10), (10, 16), *((i, i + 1) for i in range(16, 24))):
        logits, cache = llama.decode(cfg, params, seq[:, a:b], cache)
        pieces.append(logits)
    assert cache.length == 24
    assert rel(torch.cat(pieces, 1), full) <= 1e-5


def test_left_padded_batch_equals_each_prompt_alone():
    cfg = CONFIGS["gqa"]
    params = llama.init(cfg, seed=2)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    batched = generate.generate(cfg, params, prompts, 8, temperature=0)
    for prompt, got in zip(prompts, batched):
        tokens = list(prompt)
        for _ in range(8):  # greedy by recomputing the whole sequence each time
            tokens.append(int(llama.apply(cfg, params, torch.tensor([tokens]))[0, -1].argmax()))
        assert got == tokens[len(prompt):]
    # Sampling: a row's tokens do not depend on the batch it is in.
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, seed=5)
    together = generate.generate(cfg, params, prompts, 6, **kw)
    assert together[0] == generate.generate(cfg, params, prompts[:1], 6, **kw)[0]


def test_stop_token_and_bad_arguments():
    cfg = CONFIGS["gqa"]
    params = llama.init(cfg, seed=2)
    greedy = generate.generate(cfg, params, [[1, 2, 3]], 8, temperature=0)[0]
    assert generate.generate(cfg, params, [[1, 2, 3]], 8, temperature=0,
                             stop_token=greedy[3])[0] == greedy[:greedy.index(greedy[3])]
    for kwargs, culprit in (({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k"),
                            ({"temperature": -1.0}, "temperature")):
        with pytest.raises(ValueError, match=culprit):
            generate.generate(cfg, params, [[1]], 4, **kwargs)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate.generate(cfg, params, [[1] * 60], 10)
    with pytest.raises(ValueError, match="prompt"):
        generate.generate(cfg, params, [[]], 4)


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    p = generate.next_token_distribution(logits, temperature=1.0, top_k=2)
    assert (p[0, 2:] == 0).all() and abs(p.sum().item() - 1) < 1e-6
    full = logits.softmax(-1)
    p = generate.next_token_distribution(logits, temperature=1.0, top_p=0.8)
    keep = int((full[0].cumsum(0) - full[0] < 0.8).sum())       # smallest prefix reaching 0.8
    assert (p[0, keep:] == 0).all() and torch.allclose(p[0, :keep], full[0, :keep] / full[0, :keep].sum())
    assert generate.next_token_distribution(logits, temperature=0).argmax().item() == 0


def test_evo_generate_command(tmp_path):
    exp = tmp_path / "exp.py"
    exp.write_text(
        "from evo import Experiment, data, models, optim\n"
        "experiment = Experiment(model=models.llama.Config(vocab_size=258, hidden_size=32,\n"
        "    num_layers=2, num_heads=4, intermediate_size=48, max_seq_len=64),\n"
        "    data=data.Packed(folder=None, seq_len=32, micro_batch=2),\n"
        f"    optimizer=optim.adamw(lr=1e-3), steps=2, checkpoint_every=2, run_dir={str(tmp_path / 'run')!r},\n"
        "    tokenizer='byte')\n")
    env = repo_env()

    def evo(*args):
        return subprocess.run([sys.executable, "-m", "evo", *args], capture_output=True, text=True,
                              env=env, timeout=900)
    assert evo("train", str(exp)).returncode == 0
    r = evo("generate", str(tmp_path / "run"), "--prompt", "ab", "--prompt", "xyz",
            "--max-new-tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    # The same text as generating in-process from the checkpoint's weights.
    cfg, params, tok = generate.load_for_generation(str(tmp_path / "run"))
    outs = generate.generate(cfg, params, [tok.encode("ab"), tok.encode("xyz")], 5, temperature=0)
    assert r.stdout == "".join(f"--- [{i}]\n{p}{tok.decode(o)}\n"
                               for i, (p, o) in enumerate(zip(["ab", "xyz"], outs)))
    bad = evo("generate", str(tmp_path / "nowhere"), "--prompt", "a")
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr
    bad = evo("generate", str(tmp_path / "run"), "--prompt", "a", "--top-p", "0")
    assert bad.returncode == 2 and "top_p" in bad.stderr
