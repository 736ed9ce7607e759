"""The loader: one global stream whatever the dp size, exact resume (also across dp sizes),
skip_batches, mixtures, dummy mode, validation sets and bad input."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from evo.data import DataError, Loader, Packed, eval_batches, pack_documents
from test_data_format import reference_write

VOCAB = 5000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources; every token id is unique, so each one tells where it came from."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    docs, start = {"code": [], "web": []}, 1
    for source, n_docs in (("code", 30), ("web", 50)):
        (root / source).mkdir()
        for n in rng.integers(1, 90, n_docs):
            docs[source].append(list(range(start, start + int(n))))
            start += int(n)
        half = n_docs // 2
        reference_write(str(root / source / "a.bin"), docs[source][:half])
        reference_write(str(root / source / "b.bin"), docs[source][half:] + [[]])  # an empty doc too
    assert start < VOCAB
    return str(root), docs


def cfg(folder, **kw):
    return Packed(**{"folder": folder, "seq_len": 16, "micro_batch": 2, "micro_num": 2, "seed": 3, **kw})


def take(loader, n):
    return [next(loader) for _ in range(n)]


def global_batch(config, dp_size, n_steps, state=None, vocab_size=VOCAB):
    """Concatenation over ranks of each step's batch."""
    loaders = [Loader(config, vocab_size=vocab_size, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    steps = [take(ld, n_steps) for ld in loaders]
    out = [{k: torch.cat([steps[r][i][k] for r in range(dp_size)]) for k in ("tokens", "labels", "positions", "source")}
           for i in range(n_steps)]
    return out, loaders[0].state_dict()


def rows_of(batches, key="tokens"):
    return torch.cat([b[key] for b in batches])


def test_batch_layout(corpus):
    folder, _ = corpus
    b = next(Loader(cfg(folder), vocab_size=VOCAB))
    for key in ("tokens", "labels", "positions", "source"):
        assert b[key].dtype == torch.int64 and b[key].shape == (2, 32)
    assert b["cu_seqlens"].dtype == torch.int32 and b["cu_seqlens"].shape[0] == 2
    assert (b["cu_seqlens"][:, 0] == 0).all() and (b["cu_seqlens"][:, -1] == 32).all()


def test_an_epoch_holds_every_token_once(corpus):
    folder, docs = corpus
    loader = Loader(cfg(folder, micro_num=1), vocab_size=VOCAB)
    all_tokens = sorted(t for d in docs["code"] + docs["web"] for t in d)
    rows = -(-len(all_tokens) // 32)
    epoch = rows_of(take(loader, rows))
    real = epoch[epoch != 0]  # padding is 0 and no real token is 0
    assert sorted(real.tolist()) == all_tokens
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["row"] == 0
    assert loader.sources == ["code", "web"]
    # the next epoch is another order of the same tokens
    epoch2 = rows_of(take(loader, rows))
    assert sorted(epoch2[epoch2 != 0].tolist()) == all_tokens and not torch.equal(epoch, epoch2)
    # source ids and labels agree with the files
    b = next(Loader(cfg(folder), vocab_size=VOCAB))
    source_of = {t: s for s, name in enumerate(["code", "web"]) for d in docs[name] for t in d}
    last = {d[-1] for d in docs["code"] + docs["web"]}
    for t, s, lab in zip(b["tokens"].flatten().tolist(), b["source"].flatten().tolist(), b["labels"].flatten().tolist()):
        if t:
            assert s == source_of[t] and lab == (-100 if t in last else t + 1)


def test_same_global_batch_for_any_dp_size(corpus):
    folder, _ = corpus
    one, _ = global_batch(cfg(folder, micro_num=4), 1, 25)  # crosses an epoch boundary
    two, _ = global_batch(cfg(folder, micro_num=2), 2, 25)
    four, _ = global_batch(cfg(folder, micro_num=1), 4, 25)
    for key in ("tokens", "labels", "positions", "source"):
        assert torch.equal(rows_of(one, key), rows_of(two, key))
        assert torch.equal(rows_of(one, key), rows_of(four, key))


def test_ranks_are_disjoint_and_complete(corpus):
    folder, _ = corpus
    stream = rows_of(take(Loader(cfg(folder, micro_num=1), vocab_size=VOCAB), 24))
    r0 = rows_of(take(Loader(cfg(folder, micro_num=3), vocab_size=VOCAB, dp_rank=0, dp_size=2), 4))
    r1 = rows_of(take(Loader(cfg(folder, micro_num=3), vocab_size=VOCAB, dp_rank=1, dp_size=2), 4))
    for step in range(4):
        assert torch.equal(r0[3 * step : 3 * step + 3], stream[6 * step : 6 * step + 3])
        assert torch.equal(r1[3 * step : 3 * step + 3], stream[6 * step + 3 : 6 * step + 6])


def test_resume_exactly(corpus):
    folder, _ = corpus
    whole = take(Loader(cfg(folder), vocab_size=VOCAB), 40)
    first = Loader(cfg(folder), vocab_size=VOCAB)
    take(first, 17)
    state = json.loads(json.dumps(first.state_dict()))
    assert set(state) >= {"step", "epoch", "row"} and state["step"] == 17
    resumed = Loader(cfg(folder), vocab_size=VOCAB)
    resumed.load_state_dict(state)
    for a, b in zip(whole[17:], take(resumed, 23)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_dp2_into_dp4(corpus):
    folder, _ = corpus
    stream = rows_of(take(Loader(cfg(folder, micro_num=1), vocab_size=VOCAB), 4 * 7 + 8 * 9))
    before, state = global_batch(cfg(folder), 2, 7)  # 7 steps of 2 ranks x 2 rows
    state = json.loads(json.dumps(state))
    after, _ = global_batch(cfg(folder), 4, 9, state)  # 9 steps of 4 ranks x 2 rows
    assert torch.equal(rows_of(before), stream[:28])
    assert torch.equal(rows_of(after), stream[28:])


def test_skip_batches(corpus):
    folder, _ = corpus
    plain = take(Loader(cfg(folder), vocab_size=VOCAB), 10)
    skipping = Loader(cfg(folder, skip_batches="1-3,6"), vocab_size=VOCAB)
    got = take(skipping, 5)
    for b, i in zip(got, [0, 4, 5, 7, 8]):
        assert torch.equal(b["tokens"], plain[i]["tokens"])
    assert skipping.state_dict()["step"] == 9


def test_mixture_follows_the_weights(corpus):
    folder, docs = corpus
    tokens = {s: sum(map(len, d)) for s, d in docs.items()}
    config = cfg(folder, micro_num=8, weights={"code": 3.0, "web": 1.0})
    batches = take(Loader(config, vocab_size=VOCAB), 40)
    source = rows_of(batches, "source")
    share = (source == 0).sum().item() / (source >= 0).sum().item()
    assert abs(share - 0.75) < 0.03, share
    assert tokens["code"] / (tokens["code"] + tokens["web"]) < 0.5  # code was upsampled
    again = take(Loader(config, vocab_size=VOCAB), 40)
    assert torch.equal(rows_of(batches), rows_of(again))
    other = take(Loader(dataclasses.replace(config, seed=4), vocab_size=VOCAB), 40)
    assert not torch.equal(rows_of(batches), rows_of(other))
    # only code
    only = rows_of(take(Loader(cfg(folder, weights={"code": 1, "web": 0}), vocab_size=VOCAB), 10), "source")
    assert set(only.unique().tolist()) <= {-1, 0}
    # same global stream rule and resume with a mixture
    two, state = global_batch(dataclasses.replace(config, micro_num=4), 2, 12)
    assert torch.equal(rows_of(two), rows_of(batches[:12]))
    ld = Loader(config, vocab_size=VOCAB)
    ld.load_state_dict(state)
    assert torch.equal(rows_of(take(ld, 5)), rows_of(batches[12:17]))


def test_mixture_weights_must_name_the_sources(corpus):
    folder, _ = corpus
    with pytest.raises(DataError, match=r"unknown \['cod'\], missing \['code'\]"):
        Loader(cfg(folder, weights={"cod": 1.0, "web": 1.0}), vocab_size=VOCAB)


def test_dummy_mode():
    config = Packed(seq_len=32, micro_batch=2, micro_num=4, seed=5)
    a = take(Loader(config, vocab_size=100), 6)
    b = take(Loader(config, vocab_size=100), 6)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    tokens = rows_of(a)
    assert tokens.shape == (24, 64) and tokens.min() >= 0 and tokens.max() < 100
    assert (rows_of(a, "labels")[:, -1] == -100).all()  # documents end inside their row
    two, state = global_batch(dataclasses.replace(config, micro_num=2), 2, 3, vocab_size=100)
    assert torch.equal(rows_of(two), rows_of(a[:3]))
    ld = Loader(dataclasses.replace(config, micro_num=1), vocab_size=100, dp_rank=1, dp_size=4)
    ld.load_state_dict(state)
    assert torch.equal(rows_of(take(ld, 3)), torch.cat([tokens[12 + 4 * i + 1 : 12 + 4 * i + 2] for i in range(3)]))


def test_token_outside_the_vocabulary(tmp_path):
    reference_write(str(tmp_path / "x.bin"), [[1, 2, 3], [4, 60, 5]])
    loader = Loader(Packed(folder=str(tmp_path), seq_len=8), vocab_size=50)
    with pytest.raises(DataError, match=rf"{tmp_path / 'x.bin'}:2: token id 60 is outside the vocabulary \[0, 50\)"):
        next(loader)
    reference_write(str(tmp_path / "x.bin"), [[1, -50, 3]])
    with pytest.raises(DataError, match=rf"{tmp_path / 'x.bin'}:1: token id -50"):
        next(Loader(Packed(folder=str(tmp_path), seq_len=8), vocab_size=50))


def test_bad_config_and_state(corpus):
    folder, _ = corpus
    with pytest.raises(DataError, match="Packed.seq_len must be an int >= 1, got 0"):
        Packed(seq_len=0)
    with pytest.raises(DataError, match=r"Packed.skip_batches='3-1'"):
        Packed(skip_batches="3-1")
    with pytest.raises(DataError, match=r"Packed.weights\['web'\] must be a finite number >= 0, got -1"):
        Packed(folder="x", weights={"web": -1})
    with pytest.raises(DataError, match="dp_rank=2, dp_size=2"):
        Loader(cfg(folder), vocab_size=VOCAB, dp_rank=2, dp_size=2)
    with pytest.raises(DataError, match=rf"{folder}/nope: data folder does not exist"):
        Loader(cfg(folder + "/nope"), vocab_size=VOCAB)
    state = Loader(cfg(folder), vocab_size=VOCAB).state_dict()
    with pytest.raises(DataError, match="saved with seq_len=16 but this loader has seq_len=32"):
        Loader(cfg(folder, seq_len=32), vocab_size=VOCAB).load_state_dict(state)


def test_validation_sets(corpus):
    folder, docs = corpus
    sets = eval_batches(folder, seq_len=16, micro_batch=2, vocab_size=VOCAB)
    assert list(sets) == ["code", "web"]
    code = list(sets["code"])
    expected = pack_documents([np.array(d) for d in docs["code"]], 16, micro_batch=2)
    assert len(code) == len(sets["code"]) == expected["tokens"].shape[0]
    for i, b in enumerate(code):
        assert b["tokens"].shape == (1, 32) and b["cu_seqlens"].shape[0] == 1
        for key in ("tokens", "labels", "positions"):
            assert b[key][0].tolist() == expected[key][i].tolist()
    assert torch.equal(list(sets["code"])[3]["tokens"], code[3]["tokens"])  # re-iterable, same
    capped = eval_batches(folder + "/web", seq_len=16, micro_batch=2, vocab_size=VOCAB, max_batches=2)
    assert list(capped) == ["web"] and len(capped["web"]) == 2
