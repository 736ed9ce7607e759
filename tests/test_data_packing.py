"""Packing documents into rows: checked against hand-written rows and a token-by-token reference."""

import numpy as np
import pytest

from evo.data import pack_documents


def reference_pack(docs, seq_len, micro_batch=1, into_one=False):
    """Token by token, the rules of docs/data.md, written plainly."""
    row_len = seq_len * micro_batch
    stream = [(d, j) for d, doc in enumerate(docs) for j in range(len(doc))]
    rows = []
    for r in range(0, len(stream), row_len):
        chunk = stream[r : r + row_len]
        tokens, labels, positions, source, cu = [], [], [], [], [0]
        for p, (d, j) in enumerate(chunk):
            doc = docs[d]
            tokens.append(abs(doc[j]))
            labels.append(doc[j + 1] if j + 1 < len(doc) and doc[j + 1] >= 0 else -100)
            new_segment = p == 0 or j == 0
            positions.append(0 if new_segment else positions[-1] + 1)
            source.append(d % 3)
            if new_segment and p > 0:
                cu.append(p)
        pad = row_len - len(chunk)
        cu.append(len(chunk))
        if pad:
            cu.append(row_len)
        tokens += [0] * pad
        labels += [-100] * pad
        positions += list(range(pad))
        source += [-1] * pad
        if into_one:
            positions = list(range(seq_len)) * micro_batch
            cu = list(range(0, row_len + 1, seq_len))
        rows.append((tokens, labels, positions, source, cu))
    return rows


def check_against_reference(docs, seq_len, micro_batch=1, into_one=False):
    out = pack_documents(
        [np.array(d, dtype=np.int64) for d in docs], seq_len, micro_batch=micro_batch,
        pack_sample_into_one=into_one, sources=[d % 3 for d in range(len(docs))],
    )
    ref = reference_pack(docs, seq_len, micro_batch, into_one)  # empty documents add nothing
    assert out["tokens"].shape == (len(ref), seq_len * micro_batch)
    k = max(len(r[4]) for r in ref) if ref else 2
    for name in ("tokens", "labels", "positions", "source", "cu_seqlens"):
        assert out[name].dtype == (np.int32 if name == "cu_seqlens" else np.int64), name
    for i, (tokens, labels, positions, source, cu) in enumerate(ref):
        assert out["tokens"][i].tolist() == tokens
        assert out["labels"][i].tolist() == labels
        assert out["positions"][i].tolist() == positions
        assert out["source"][i].tolist() == source
        assert out["cu_seqlens"][i].tolist() == cu + [seq_len * micro_batch] * (k - len(cu))
    return out


def test_small_example_by_hand():
    out = pack_documents([np.array([1, 2, 3]), np.array([4, -5, 6, 7, 8]), np.array([9, 10])], 4)
    assert out["tokens"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    # token 4's label is -100: its next token (-5) is negative (never a target); 5 is fed as abs(-5)
    assert out["labels"].tolist() == [[2, 3, -100, -100], [6, 7, 8, -100], [10, -100, -100, -100]]
    # the second document continues into row 1 and restarts its positions there
    assert out["positions"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert out["cu_seqlens"].tolist() == [[0, 3, 4], [0, 4, 4], [0, 2, 4]]
    assert out["source"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, -1, -1]]


def test_pack_sample_into_one_by_hand():
    out = pack_documents([np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8]), np.array([9, 10])], 3,
                         micro_batch=2, pack_sample_into_one=True)
    assert out["tokens"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]]
    assert out["labels"].tolist() == [[2, 3, -100, 5, 6, 7], [8, -100, 10, -100, -100, -100]]
    assert out["positions"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2]]
    assert out["cu_seqlens"].tolist() == [[0, 3, 6], [0, 3, 6]]


@pytest.mark.parametrize("seq_len,micro_batch,into_one", [(7, 1, False), (4, 3, False), (16, 2, False), (5, 2, True), (1, 1, False)])
def test_random_documents_match_the_reference(seq_len, micro_batch, into_one):
    rng = np.random.default_rng(seq_len * 10 + micro_batch)
    docs = []
    for _ in range(40):
        n = int(rng.choice([0, 1, 2, 5, 13, 40]))
        doc = rng.integers(0, 1000, n)
        doc[rng.random(n) < 0.2] *= -1  # some "no loss" tokens
        docs.append(doc.tolist())
    check_against_reference(docs, seq_len, micro_batch, into_one)


def test_every_token_once_labels_stay_inside_documents():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 60)
    docs, start = [], 1
    for n in lengths:  # unique ids: each token says which document and place it is
        docs.append(np.arange(start, start + n))
        start += n
    out = pack_documents(docs, 64, micro_batch=2)
    real = out["source"] >= 0
    assert np.array_equal(out["tokens"][real], np.concatenate(docs))  # once each, in order
    doc_of = {int(t): i for i, d in enumerate(docs) for t in d}
    for t, label in zip(out["tokens"][real], out["labels"][real]):
        if label != -100:
            assert label == t + 1 and doc_of[int(label)] == doc_of[int(t)]
    last_tokens = {int(d[-1]) for d in docs}
    assert {int(t) for t, lab in zip(out["tokens"][real], out["labels"][real]) if lab == -100} == last_tokens
    # boundaries: a segment starts at each document start and each row start; positions count from 0
    for r in range(out["tokens"].shape[0]):
        cu = np.unique(out["cu_seqlens"][r])
        for a, b in zip(cu[:-1], cu[1:]):
            assert out["positions"][r, a:b].tolist() == list(range(b - a))
            seg = out["tokens"][r, a:b]
            if out["source"][r, a] >= 0:
                assert len({doc_of[int(t)] for t in seg}) == 1


def test_no_documents_and_bad_arguments():
    out = pack_documents([np.array([], dtype=np.int64)], 8)
    assert out["tokens"].shape == (0, 8)
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents([np.array([1])], 0)
