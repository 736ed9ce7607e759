"""InternEvo's tokenized files: read exactly what an independent writer wrote, write the same bytes,
and fail clearly on every kind of damage."""

import json
import os
import re

import numpy as np
import pytest

from evo.data import BinWriter, DataError, TokenizedDataset, write_bin


def reference_write(path, docs):
    """InternEvo's tools/tokenizer.py, independently: json.dumps lines, then a meta of
    (byte_offset, n_tokens) found by re-reading the file line by line, np.save'd as int32."""
    with open(path, "wb") as f:
        for doc in docs:
            f.write((json.dumps({"tokens": [int(t) for t in doc]}) + "\n").encode())
    meta, cur = [], 0
    with open(path, "rb") as f:
        for line in f:
            meta.append((cur, len(json.loads(line)["tokens"])))
            cur += len(line)
    with open(path + ".meta", "wb") as f:
        np.save(f, np.array(meta, dtype=np.int32).reshape(-1, 2))


def save_meta(path, meta):
    with open(path, "wb") as f:  # np.save(name) would append ".npy"
        np.save(f, meta)


DOCS = [[1, 2, 3], [40000, -7, 0, 12], [], [5], list(range(100, 400))]


def test_reads_an_independent_writers_files_exactly(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "code" / "deep").mkdir(parents=True)
    reference_write(str(tmp_path / "web" / "a.bin"), DOCS[:2])
    reference_write(str(tmp_path / "web" / "b.bin"), DOCS[2:])
    reference_write(str(tmp_path / "code" / "deep" / "c.bin"), [[9, 9], [-1]])
    reference_write(str(tmp_path / "top.bin"), [[7]])
    ds = TokenizedDataset(str(tmp_path))
    own = tmp_path.name  # files directly in the folder belong to the source named after it
    assert ds.sources == sorted(["code", "web", own])
    # file order: sorted walk (top-level files first, then sub-folders by name)
    expected = [([7], own), ([9, 9], "code"), ([-1], "code")] + [(d, "web") for d in DOCS]
    assert len(ds) == len(expected)
    assert ds.lengths.tolist() == [len(d) for d, _ in expected]
    for i, (doc, source) in enumerate(expected):
        tokens, name = ds[i]
        assert tokens.dtype == np.int64 and tokens.tolist() == doc and name == source
    assert ds.locate(3) == (str(tmp_path / "web" / "a.bin"), 1)
    assert ds.locate(6) == (str(tmp_path / "web" / "b.bin"), 2)


def test_evo_writer_is_byte_compatible(tmp_path):
    reference_write(str(tmp_path / "ref.bin"), DOCS)
    assert write_bin(str(tmp_path / "evo.bin"), [np.array(d, dtype=np.int64) for d in DOCS]) == sum(map(len, DOCS))
    assert (tmp_path / "evo.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (tmp_path / "evo.bin.meta").read_bytes() == (tmp_path / "ref.bin.meta").read_bytes()
    meta = np.load(tmp_path / "evo.bin.meta")
    assert meta.dtype == np.int32 and meta.shape == (5, 2)


def test_streaming_writer_matches_and_leaves_nothing_on_error(tmp_path):
    path = str(tmp_path / "s.bin")
    with BinWriter(path) as w:
        w.write(DOCS[:2])
        assert not os.path.exists(path)  # nothing visible before the commit
        w.write(DOCS[2:])
    reference_write(str(tmp_path / "ref.bin"), DOCS)
    assert (tmp_path / "s.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (tmp_path / "s.bin.meta").read_bytes() == (tmp_path / "ref.bin.meta").read_bytes()
    with pytest.raises(RuntimeError):
        with BinWriter(str(tmp_path / "bad.bin")) as w:
            w.write(DOCS)
            raise RuntimeError("crash")
    assert sorted(os.listdir(tmp_path)) == ["ref.bin", "ref.bin.meta", "s.bin", "s.bin.meta"]


def test_other_json_spellings_are_read(tmp_path):
    path = tmp_path / "x.bin"
    lines = [b'{"tokens":[1,2,3]}\n', b'{"tokens": [-4, 5], "type": "sft"}\n', b'{"tokens": []}\n']
    path.write_bytes(b"".join(lines))
    offsets = np.cumsum([0] + [len(x) for x in lines[:-1]])
    save_meta(str(path) + ".meta", np.stack([offsets, [3, 2, 0]], axis=1).astype(np.int32))
    ds = TokenizedDataset(str(tmp_path))
    assert [ds[i][0].tolist() for i in range(3)] == [[1, 2, 3], [-4, 5], []]


def _write(tmp_path, docs=DOCS):
    path = str(tmp_path / "d.bin")
    reference_write(path, docs)
    return path


def test_truncated_bin_mid_line(tmp_path):
    path = _write(tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(DataError, match=rf"{path}:5: truncated"):
        TokenizedDataset(str(tmp_path))


def test_truncated_bin_at_a_line_boundary(tmp_path):
    path = _write(tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: data.rindex(b"\n", 0, len(data) - 1) + 1])  # drop the last line
    with pytest.raises(DataError, match=rf"{path}: truncated or not this .meta's file"):
        TokenizedDataset(str(tmp_path))


def test_meta_of_another_file_is_caught_at_open(tmp_path):
    path = _write(tmp_path)
    reference_write(str(tmp_path / "other.bin"), [[1], [2], [3]])
    os.replace(str(tmp_path / "other.bin.meta"), path + ".meta")
    os.remove(str(tmp_path / "other.bin"))
    with pytest.raises(DataError, match=rf"{path}:3: the .meta's offset \d+ is not at a line start"):
        TokenizedDataset(str(tmp_path))


def test_meta_with_wrong_token_counts_is_caught_at_read(tmp_path):
    path = _write(tmp_path)
    meta = np.load(path + ".meta")
    meta[1, 1] += 1
    save_meta(path + ".meta", meta)
    ds = TokenizedDataset(str(tmp_path))
    assert ds[0][0].tolist() == DOCS[0]
    with pytest.raises(DataError, match=rf"{path}:2: line has 4 tokens but the .meta says 5"):
        ds[1]


def test_meta_that_is_not_an_array_of_pairs(tmp_path):
    path = _write(tmp_path)
    save_meta(path + ".meta", np.zeros(5, dtype=np.float32))
    with pytest.raises(DataError, match=rf"{path}.meta: expected an int array \[n, 2\]"):
        TokenizedDataset(str(tmp_path))
    open(path + ".meta", "wb").write(b"garbage")
    with pytest.raises(DataError, match=rf"{path}.meta: not a readable np.save file"):
        TokenizedDataset(str(tmp_path))


def internevo_meta_writer(path, docs):
    """InternEvo's tools/jsonl2bin_meta.py, independently: json.dumps lines, then a meta of
    (byte_offset, n_tokens, line_index) per line, np.save'd as int64 [n, 3]."""
    with open(path, "wb") as f:
        for doc in docs:
            f.write((json.dumps({"tokens": doc}) + "\n").encode())
    rows, cur = [], 0
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            rows.append((cur, len(json.loads(line)["tokens"]), i))
            cur += len(line)
    save_meta(path + ".meta", np.array(rows, dtype=np.int64).reshape(-1, 3))


def test_three_column_meta_of_internevo_is_read_by_its_length_column(tmp_path):
    # the index column differs from every length here, so reading it as the length would fail
    docs = [[5, 6, 7, 8], [1], [], [9, 9, 9, 9, 9, 9, 9], [2, 3]]
    internevo_meta_writer(str(tmp_path / "a.bin"), docs)
    ds = TokenizedDataset(str(tmp_path))
    assert ds.lengths.tolist() == [4, 1, 0, 7, 2]
    assert [ds[i][0].tolist() for i in range(len(ds))] == docs


@pytest.mark.parametrize("shape", [(3, 1), (3, 4), (3, 2, 2)])
def test_meta_of_another_shape_is_refused_at_open_naming_the_file(tmp_path, shape):
    path = _write(tmp_path, [[1, 2], [3, 4], [5]])
    save_meta(path + ".meta", np.zeros(shape, dtype=np.int64))
    with pytest.raises(DataError, match=rf"{path}.meta: expected an int array \[n, 2\] .* or "
                                        rf"\[n, 3\] .*shape " + re.escape(str(shape))):
        TokenizedDataset(str(tmp_path))


def test_non_json_line(tmp_path):
    path = _write(tmp_path, [[1, 2], [3, 4], [5]])
    data = open(path, "rb").read().replace(b'{"tokens": [3, 4]}', b'{"tokens": [3; 4]}')
    open(path, "wb").write(data)
    ds = TokenizedDataset(str(tmp_path))
    with pytest.raises(DataError, match=rf"{path}:2: not a JSON line"):
        ds[1]
    data = data.replace(b'{"tokens": [3; 4]}', b'{"tokenz": [3, 4]}')
    open(path, "wb").write(data)
    with pytest.raises(DataError, match=rf"{path}:2: expected {{\"tokens\": \[int, ...\]}}"):
        TokenizedDataset(str(tmp_path))[1]


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}: no .bin files"):
        TokenizedDataset(str(tmp_path))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=rf"{tmp_path}: no .bin files"):
        TokenizedDataset(str(tmp_path))
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope'}: data folder does not exist"):
        TokenizedDataset(str(tmp_path / "nope"))


def test_orphans_are_errors(tmp_path):
    path = _write(tmp_path)
    os.rename(path + ".meta", path + ".meta.keep")
    with pytest.raises(DataError, match=rf"{path}: has no matching d.bin.meta"):
        TokenizedDataset(str(tmp_path))
    os.rename(path + ".meta.keep", path + ".meta")
    os.remove(path)  # what a crash between the two renames leaves
    with pytest.raises(DataError, match=rf"{path}.meta: .meta without its .bin"):
        TokenizedDataset(str(tmp_path))


def test_hidden_work_folders_are_ignored(tmp_path):
    _write(tmp_path)
    (tmp_path / ".building").mkdir()
    reference_write(str(tmp_path / ".building" / "x.bin"), [[1]])
    assert len(TokenizedDataset(str(tmp_path))) == len(DOCS)
