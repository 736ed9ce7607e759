"""Tokenizers, the tokenize tool and the stdlib demo corpus."""

import json
import multiprocessing
import os
import sysconfig
import zlib

import numpy as np
import pytest

from conftest import repo_env
from evo.data import DataError, TokenizedDataset, build_stdlib_corpus, load_tokenizer, tokenize
from test_data_format import reference_write


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]  # never adds BOS/EOS by itself
    assert tok.decode([256, 97, 0xC3, 0xA9, 257]) == "aé"
    assert tok.decode([0xC3]) == "\ufffd"


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["hello world", "the quick brown fox", "hello there"] * 50, trainer)
    path = str(tmp_path_factory.mktemp("tok") / "tok.json")
    tok.save(path)
    return path


def test_hf_tokenizer(hf_tokenizer_file):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(hf_tokenizer_file)
    tok = load_tokenizer(hf_tokenizer_file)
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    assert (tok.bos_id, tok.eos_id) == (ref.token_to_id("<s>"), ref.token_to_id("</s>"))
    ids = tok.encode("hello world")
    assert ids == ref.encode("hello world", add_special_tokens=False).ids and tok.bos_id not in ids
    assert tok.decode([tok.bos_id] + ids) == "hello world"


def test_missing_or_unknown_tokenizer(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path / 'tok.json'}: tokenizer file does not exist"):
        load_tokenizer(str(tmp_path / "tok.json"))
    with pytest.raises(DataError, match=rf"{tmp_path / 'sp.model'}: tokenizer file does not exist"):
        load_tokenizer(str(tmp_path / "sp.model"))
    with pytest.raises(DataError, match="'gpt2': expected 'byte'"):
        load_tokenizer("gpt2")
    with pytest.raises(DataError, match=rf"{tmp_path / 'tok.json'}: tokenizer file does not exist"):
        tokenize([__file__], str(tmp_path / "out"), tokenizer=str(tmp_path / "tok.json"), progress=False)


def test_sentencepiece_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match=rf"{bad}: reading a .model tokenizer needs sentencepiece"):
            load_tokenizer(str(bad))
        pytest.skip("sentencepiece is not installed")
    with pytest.raises(DataError, match=rf"{bad}: not a sentencepiece model"):
        load_tokenizer(str(bad))


def write_inputs(tmp_path):
    texts = [f"document {i} " + "é" * (i % 4) + "x" * i for i in range(300)]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    plain = tmp_path / "note.txt"
    plain.write_text("a whole file\nis one document\n")
    return [str(jsonl), str(plain)], texts + [plain.read_text()]


def test_tokenize_reads_back_and_matches_an_independent_writer(tmp_path):
    inputs, texts = write_inputs(tmp_path)
    summary = tokenize(inputs, str(tmp_path / "out"), progress=False)
    expected = [list(t.encode()) for t in texts]
    assert summary == {"files": [str(tmp_path / "out" / "part-00000.bin")], "documents": len(texts),
                       "tokens": sum(map(len, expected))}
    reference_write(str(tmp_path / "ref.bin"), expected)
    assert (tmp_path / "out" / "part-00000.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (tmp_path / "out" / "part-00000.bin.meta").read_bytes() == (tmp_path / "ref.bin.meta").read_bytes()


def test_bos_eos_only_when_asked_and_shards(tmp_path, hf_tokenizer_file):
    inputs, texts = write_inputs(tmp_path)
    tok = load_tokenizer(hf_tokenizer_file)
    summary = tokenize(inputs, str(tmp_path / "out"), tokenizer=hf_tokenizer_file, add_bos=True, add_eos=True,
                       shard_tokens=2000, progress=False)
    ds = TokenizedDataset(str(tmp_path / "out"))
    assert len(summary["files"]) == len(ds._files) > 1
    assert max(int(np.load(f + ".meta")[:, 1].sum()) for f in summary["files"]) <= 2000
    assert [ds[i][0].tolist() for i in range(len(ds))] == [[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts]
    tokenize(inputs[:1], str(tmp_path / "plain"), tokenizer=hf_tokenizer_file, progress=False)
    assert TokenizedDataset(str(tmp_path / "plain"))[0][0].tolist() == tok.encode(texts[0])


def test_workers_write_the_same_bytes(tmp_path):
    inputs, _ = write_inputs(tmp_path)
    big = tmp_path / "big.jsonl"  # several chunks
    big.write_text("".join(json.dumps({"text": "y" * (i % 5000)}) + "\n" for i in range(3000)))
    inputs.append(str(big))
    one = tokenize(inputs, str(tmp_path / "one"), add_eos=True, progress=False)
    two = tokenize(inputs, str(tmp_path / "two"), add_eos=True, workers=2, progress=False)
    assert one["tokens"] == two["tokens"] and one["documents"] == two["documents"] == 3000 + 301
    for a, b in zip(one["files"], two["files"]):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_bad_jsonl_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: has no field 'text'"):
        tokenize([str(path)], str(tmp_path / "out"), progress=False)
    path.write_text('{"text": "fine"}\n{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=rf"{path}:3: not a JSON line"):
        tokenize([str(path)], str(tmp_path / "out2"), progress=False)
    assert not any(n.endswith(".bin") for n in os.listdir(tmp_path / "out2"))  # nothing half-written
    with pytest.raises(DataError, match=rf"{tmp_path / 'missing.jsonl'}: input file does not exist"):
        tokenize([str(tmp_path / "missing.jsonl")], str(tmp_path / "out3"), progress=False)


def test_refuses_to_mix_with_earlier_output(tmp_path):
    inputs, _ = write_inputs(tmp_path)
    tokenize(inputs, str(tmp_path / "out"), progress=False)
    with pytest.raises(DataError, match="already holds tokenized files"):
        tokenize(inputs, str(tmp_path / "out"), progress=False)


def _build(out_dir):
    return build_stdlib_corpus(out_dir, max_files=40)


def test_stdlib_corpus(tmp_path):
    out = str(tmp_path / "corpus")
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # two builders at once
        results = pool.map(_build, [out, out])
    assert results[0] == results[1] == (f"{out}/train/stdlib", f"{out}/valid/stdlib")
    assert _build(out) == results[0]  # already there: returns at once
    train, valid = TokenizedDataset(results[0][0]), TokenizedDataset(results[0][1])
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))[:40]  # top-level files sort first
    docs = {"train": [], "valid": []}
    for n in names:
        data = open(os.path.join(root, n), "rb").read()
        docs["valid" if zlib.crc32(n.encode()) / 2**32 < 0.05 else "train"].append(list(data) + [257])
    assert len(docs["valid"]) >= 1
    assert [train[i][0].tolist() for i in range(len(train))] == docs["train"]
    assert [valid[i][0].tolist() for i in range(len(valid))] == docs["valid"]
    assert train.sources == ["stdlib"]
    assert not [n for n in os.listdir(f"{out}/train") if n != "stdlib"]  # no temp folders left
    with pytest.raises(DataError, match="holds a corpus built as"):
        build_stdlib_corpus(out, max_files=41)


def test_sentencepiece_model_encodes_like_sentencepiece(tmp_path):
    """A model trained here by sentencepiece itself: evo's wrapper gives sentencepiece's ids, adds
    no BOS/EOS unless asked, and `tokenize` writes exactly those ids."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(200)))
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    tok = load_tokenizer(f"{prefix}.model")
    ref = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    text = "the lazy fox jumps"
    assert tok.encode(text) == ref.encode(text)
    assert tok.vocab_size == ref.get_piece_size()
    assert tok.decode(tok.encode(text)) == text
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"text": text}) + "\n")
    out = tmp_path / "out"
    tokenize([str(jsonl)], str(out), tokenizer=f"{prefix}.model", add_eos=True, progress=False)
    ds = TokenizedDataset(str(out))
    assert ds[0][0].tolist() == ref.encode(text) + [ref.eos_id()]


def test_evo_tokenize_command(tmp_path):
    """The command line writes what the function writes; a bad line is one error naming it."""
    import subprocess
    import sys
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "first"}\n{"text": "second document"}\n')
    env = repo_env()

    def evo(*args):
        return subprocess.run([sys.executable, "-m", "evo", "tokenize", *args], capture_output=True,
                              text=True, env=env, timeout=900)
    r = evo(str(src), "--out", str(tmp_path / "cli"), "--eos", "--quiet")
    assert r.returncode == 0, r.stderr
    tokenize([str(src)], str(tmp_path / "fn"), add_eos=True, progress=False)
    names = sorted(os.listdir(tmp_path / "fn"))
    assert names == sorted(os.listdir(tmp_path / "cli"))
    for n in names:
        assert (tmp_path / "fn" / n).read_bytes() == (tmp_path / "cli" / n).read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    r = evo(str(bad), "--out", str(tmp_path / "bad"), "--quiet")
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr


def test_bpe_stdlib_corpus_and_the_bytes_each_token_stands_for(tmp_path):
    """A BPE demo corpus: its documents decode (with the tokenizers package itself) to the stdlib
    files; each document's token_bytes sum to the file's size; target_bytes counts the labels."""
    from tokenizers import Tokenizer

    from evo.data import IGNORE, target_bytes
    out = str(tmp_path / "bpe")
    train, valid = build_stdlib_corpus(out, max_files=40, vocab_size=400, tests=False)
    ref = Tokenizer.from_file(f"{out}/tokenizer.json")
    tok = load_tokenizer(f"{out}/tokenizer.json")
    assert tok.vocab_size == ref.get_vocab_size() == 400 and tok.eos_id == 0
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))[:40]
    files = {open(os.path.join(root, n), "rb").read() for n in names}
    table = tok.token_bytes()
    ds = TokenizedDataset(train)
    for i in range(len(ds)):
        ids = ds[i][0].tolist()
        assert ids[-1] == tok.eos_id
        text = ref.decode(ids[:-1]).encode()
        assert text in files and int(table[ids[:-1]].sum()) == len(text)
    labels = np.array([[ids[0], IGNORE, ids[2], tok.eos_id]])
    assert target_bytes(labels, table) == table[ids[0]] + table[ids[2]]
    assert load_tokenizer("byte").token_bytes().tolist() == [1] * 256 + [0, 0]
    with pytest.raises(DataError, match="holds a corpus built as"):
        build_stdlib_corpus(out, max_files=40, vocab_size=500, tests=False)
