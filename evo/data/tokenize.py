"""Tokenizers and the ``evo tokenize`` tool: raw JSONL or text files -> InternEvo tokenized files.

``load_tokenizer(spec)``: ``"byte"`` (built in: ids 0..255 are UTF-8 bytes, 256 = BOS, 257 = EOS),
``PATH.json`` (a Hugging Face ``tokenizers`` file) or ``PATH.model`` (sentencepiece). ``encode``
never adds BOS/EOS; ``tokenize(..., add_bos=True/add_eos=True)`` adds them when asked.

``tokenize`` writes ``OUT/part-00000.bin`` (+ ``.meta``), ``part-00001.bin``, ... in input order
whatever the number of workers: documents are every line of each ``.jsonl`` input (the text in
``field``), and each other input file as one document. Each pair is committed atomically (see
``evo.data.format``), so a crash leaves complete pairs and at most an orphan ``.meta`` that the
reader reports. It refuses an output folder that already holds tokenized files, so two runs never
mix.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sysconfig
import tempfile
import zlib
from typing import Iterator

import numpy as np

from .format import BinWriter, DataError, format_lines

__all__ = ["ByteTokenizer", "load_tokenizer", "tokenize", "build_stdlib_corpus", "target_bytes"]

_CHUNK_BYTES = 4 << 20  # JSONL is cut into chunks of about this size, one task each
_MAX_SHARD_BYTES = 2**31 - 1  # int32 offsets in the .meta
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, 256 = BOS, 257 = EOS."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: the bytes of text each id stands for (BOS/EOS: none)."""
        return np.array([1] * 256 + [0, 0], dtype=np.int64)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON file. BOS/EOS come from a ``tokenizer_config.json`` beside
    it (``bos_token``/``eos_token``), else from well-known token names; None when absent."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:
            raise DataError(f"{path}: not a tokenizers JSON file ({e})") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = {}
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                config = json.load(f)
        self.bos_id = self._special(config.get("bos_token"), _BOS_NAMES)
        self.eos_id = self._special(config.get("eos_token"), _EOS_NAMES)

    def _special(self, configured, names) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for name in ([configured] if configured else []) + list(names):
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray | None:
        """int64 [vocab_size]: the bytes of text each id stands for, known for a byte-level
        tokenizer (each character of a token's string is one byte; added tokens stand for none);
        None for other tokenizers."""
        spec = json.loads(self._tok.to_str())
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            return None
        from tokenizers.pre_tokenizers import ByteLevel
        alphabet = set(ByteLevel.alphabet())
        added = {t["id"] for t in spec.get("added_tokens") or []}
        table = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if i in added or token is None:
                continue
            if not set(token) <= alphabet:
                return None
            table[i] = len(token)
        return table

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` file (sentencepiece is imported only here)."""

    def __init__(self, path: str):
        try:
            import sentencepiece
        except ImportError:
            raise DataError(f"{path}: reading a .model tokenizer needs sentencepiece (pip install sentencepiece)") from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise DataError(f"{path}: not a sentencepiece model ({e})") from None
        self.path = path
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self._sp.encode(texts)]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_bytes(self) -> None:
        """Unknown for sentencepiece models (pieces are not bytes)."""
        return None

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r})"


def load_tokenizer(spec: str):
    """``"byte"``, a tokenizers ``.json`` path or a sentencepiece ``.model`` path -> a tokenizer with
    ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``bos_id``, ``eos_id``
    and ``token_bytes()`` (bytes of text per id, or None where unknown)."""
    if spec == "byte":
        return ByteTokenizer()
    if not spec.endswith((".json", ".model")):
        raise DataError(f"tokenizer {spec!r}: expected 'byte', a tokenizers .json file or a sentencepiece .model file")
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: tokenizer file does not exist")
    return HFTokenizer(spec) if spec.endswith(".json") else SentencePieceTokenizer(spec)


# --------------------------------------------------------------------------------------------------
# The tokenize tool

_worker_tokenizer = None  # set once per worker process by _init_worker (process-local, not shared)


def _init_worker(spec: str) -> None:
    global _worker_tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker
    _worker_tokenizer = load_tokenizer(spec)


def _line_number(path: str, byte: int) -> int:
    """1-based number of the line starting at ``byte`` (only computed for error messages)."""
    n = 1
    with open(path, "rb") as f:
        while byte > 0:
            block = f.read(min(byte, 1 << 20))
            n += block.count(b"\n")
            byte -= len(block)
    return n


def _read_texts(task) -> list[str]:
    path, start, end, field = task
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if field is None:  # a plain text file is one document
        try:
            return [data.decode("utf-8")]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 8]!r})") from None
    texts = []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{_line_number(path, start) + i}: not a JSON line ({e}): {line[:80]!r}") from None
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            what = "has no" if not isinstance(obj, dict) or field not in obj else "has a non-string"
            raise DataError(f"{path}:{_line_number(path, start) + i}: {what} field {field!r}: {line[:80]!r}")
        texts.append(text)
    return texts


def _tokenize_task(task, tokenizer=None, add_bos=False, add_eos=False):
    """One chunk -> (formatted lines, line bytes, lengths, input bytes)."""
    tok = tokenizer if tokenizer is not None else _worker_tokenizer
    docs = tok.encode_batch(_read_texts(task))
    if add_bos or add_eos:
        head = [tok.bos_id] if add_bos else []
        tail = [tok.eos_id] if add_eos else []
        docs = [np.concatenate([np.asarray(head, np.int64), d.astype(np.int64), np.asarray(tail, np.int64)]) for d in docs]
    return (*format_lines(docs), task[2] - task[1])


def _worker_task(args):
    task, add_bos, add_eos = args
    return _tokenize_task(task, None, add_bos, add_eos)


def _tasks(inputs: list[str], field: str) -> Iterator[tuple]:
    for path in inputs:
        size = os.path.getsize(path)
        if not path.endswith(".jsonl"):
            yield (path, 0, size, None)
            continue
        start = 0
        with open(path, "rb") as f:
            while start < size:
                f.seek(min(start + _CHUNK_BYTES, size))
                f.readline()  # move to the next line start
                end = min(f.tell(), size)
                yield (path, start, end, field)
                start = end


def tokenize(
    inputs: list[str],
    out: str,
    *,
    tokenizer: str = "byte",
    field: str = "text",
    add_bos: bool = False,
    add_eos: bool = False,
    workers: int = 1,
    progress: bool = True,
    shard_tokens: int | None = None,
) -> dict:
    """Tokenize ``.jsonl`` files (one document per line, text in ``field``) and other text files
    (one document each) into ``out/part-NNNNN.bin`` + ``.bin.meta``.

    Args:
        shard_tokens: start a new part after this many tokens (at a document boundary); parts are
            also cut before 2 GiB (int32 offsets).
    Returns:
        {"files": [paths of the .bin written], "documents": int, "tokens": int}.
    Raises:
        DataError naming the file (and line) for a missing input, a bad JSON line, a line without
        the field, a missing tokenizer, BOS/EOS asked of a tokenizer that has none, or an output
        folder that already holds tokenized files.
    """
    from tqdm import tqdm

    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if shard_tokens is not None and shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not inputs:
        raise DataError("tokenize: no input files given")
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"{path}: input file does not exist")
    tok = load_tokenizer(tokenizer)
    if add_bos and tok.bos_id is None:
        raise DataError(f"{tokenizer}: BOS asked for, but this tokenizer has no BOS token")
    if add_eos and tok.eos_id is None:
        raise DataError(f"{tokenizer}: EOS asked for, but this tokenizer has no EOS token")
    os.makedirs(out, exist_ok=True)
    existing = sorted(n for n in os.listdir(out) if n.endswith((".bin", ".bin.meta")))
    if existing:
        raise DataError(f"{out}: already holds tokenized files ({existing[0]}, ...); delete them or choose another folder")

    written: list[str] = []
    totals = {"documents": 0, "tokens": 0}
    writer: BinWriter | None = None

    def write(data: bytes, line_bytes: np.ndarray, lengths: np.ndarray) -> None:
        nonlocal writer
        # split the chunk wherever the current part would pass shard_tokens or 2 GiB
        i = 0
        while i < len(lengths):
            if writer is None:
                writer = BinWriter(os.path.join(out, f"part-{len(written):05d}.bin"))
                written.append(writer.path)
            tok_room = (shard_tokens - writer.tokens) if shard_tokens else None
            byte_room = _MAX_SHARD_BYTES - writer.bytes
            csum_tok = np.cumsum(lengths[i:])
            csum_byte = np.cumsum(line_bytes[i:])
            fits = csum_byte <= byte_room
            if tok_room is not None:
                fits &= csum_tok <= tok_room
            k = int(np.argmin(fits)) if not fits.all() else len(fits)
            if k == 0 and writer.documents == 0:
                if line_bytes[i] > byte_room:
                    raise DataError(f"a document of {int(lengths[i])} tokens is larger than the 2 GiB a .bin can address")
                k = 1  # one document alone over shard_tokens gets a part of its own
            if k:
                lo = int(np.sum(line_bytes[:i]))
                hi = lo + int(csum_byte[k - 1])
                writer.write_formatted(data[lo:hi], line_bytes[i : i + k], lengths[i : i + k])
                i += k
            if i < len(lengths):
                writer.close()
                writer = None
        totals["documents"] += len(lengths)
        totals["tokens"] += int(np.sum(lengths))

    tasks = list(_tasks(inputs, field))
    total_bytes = sum(t[2] - t[1] for t in tasks)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
    try:
        if workers == 1:
            results = (_tokenize_task(t, tok, add_bos, add_eos) for t in tasks)
            for data, line_bytes, lengths, nbytes in results:
                write(data, line_bytes, lengths)
                bar.update(nbytes)
        else:
            # spawn: workers start clean (no forked tokenizer threads); each loads the tokenizer once
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
                args = ((t, add_bos, add_eos) for t in tasks)
                for data, line_bytes, lengths, nbytes in pool.imap(_worker_task, args):
                    write(data, line_bytes, lengths)
                    bar.update(nbytes)
        if writer is not None:
            writer.close()
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    return {"files": written, **totals}


# --------------------------------------------------------------------------------------------------
# Bytes of text, for bits per byte


def target_bytes(labels, token_bytes: np.ndarray) -> int:
    """UTF-8 bytes of the text that the loss targets of ``labels`` spell.

    ``labels``: int array or tensor of any shape, ``IGNORE`` (-100) where there is no target;
    ``token_bytes``: int64 [vocab_size] from a tokenizer's ``token_bytes()``. Summed loss (nats) /
    ln 2 / this = bits per byte, comparable across tokenizers.
    """
    labels = np.asarray(labels)
    return int(token_bytes[labels[labels >= 0]].sum())


# --------------------------------------------------------------------------------------------------
# The demo corpus

_TEST_FOLDERS = ("test", "tests", "idle_test")
EOS_TOKEN = "<|endoftext|>"


def _stdlib_files(max_files: int | None, tests: bool) -> list[tuple[str, bytes]]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__")
                             and (tests or d not in _TEST_FOLDERS))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue  # a handful of test files are deliberately in other encodings
            files.append((os.path.relpath(path, root).replace(os.sep, "/"), data))
            if max_files is not None and len(files) >= max_files:
                return files
    return files


def _train_bpe(texts: list[str], vocab_size: int, path: str) -> None:
    """A byte-level BPE of ``vocab_size`` ids (``EOS_TOKEN`` is id 0, the only special token)
    trained on ``texts`` with the ``tokenizers`` package, written atomically to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tmp = f"{path}.tmp-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)


def _corpus_docs(out_dir: str, files: list[tuple[str, bytes]], valid_fraction: float,
                 vocab_size: int | None) -> dict[str, list[np.ndarray]]:
    """Each file's ids with EOS appended, split into train/valid by a CRC32 of its path; trains the
    BPE on the train split first when ``vocab_size`` is set."""
    split = {"train": [], "valid": []}
    for rel, data in files:
        split["valid" if zlib.crc32(rel.encode()) / 2**32 < valid_fraction else "train"].append(data)
    if vocab_size is None:
        tok = ByteTokenizer()
    else:
        path = os.path.join(out_dir, "tokenizer.json")
        if not os.path.exists(path):
            os.makedirs(out_dir, exist_ok=True)
            _train_bpe([d.decode("utf-8") for d in split["train"]], vocab_size, path)
        tok = HFTokenizer(path)
        if tok.vocab_size != vocab_size:
            raise DataError(f"{path}: a tokenizer of {tok.vocab_size} ids, not {vocab_size}; delete "
                            "it to rebuild")
    eos = np.array([tok.eos_id], dtype=np.int64)
    return {name: [np.concatenate([ids.astype(np.int64), eos]) for ids in
                   tok.encode_batch([d.decode("utf-8") for d in datas])]
            for name, datas in split.items()}


def build_stdlib_corpus(out_dir: str, *, valid_fraction: float = 0.05, max_files: int | None = None,
                        vocab_size: int | None = None, tests: bool = True) -> tuple[str, str]:
    """Build the demo corpus: the Python standard library's ``.py`` files, tokenized.

    One document per file (EOS appended), sorted by path, split into train/valid by a CRC32 of the
    relative path (valid when ``crc32 / 2**32 < valid_fraction``), written to
    ``out_dir/train/stdlib/`` and ``out_dir/valid/stdlib/`` (one ``stdlib.bin`` each, with a
    ``corpus.json`` stating how it was built). ``vocab_size=None`` tokenizes bytes (``"byte"``);
    an int trains a byte-level BPE of that many ids on the train split's text (EOS is
    ``<|endoftext|>``) and writes it as ``out_dir/tokenizer.json``. ``tests=False`` leaves out the
    stdlib's test folders (``test/``, ``tests/``, ``idle_test/``: 60 % of its bytes). Idempotent and
    safe under concurrent callers: each folder is built in a temporary folder and renamed into
    place; a finished corpus is returned at once. Returns (train_folder, valid_folder).
    """
    if not 0 <= valid_fraction < 1:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if max_files is not None and max_files < 1:
        raise DataError(f"max_files must be >= 1 or None, got {max_files}")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 257):
        raise DataError(f"vocab_size must be an int >= 257 (256 bytes + EOS) or None, got {vocab_size!r}")
    recipe = {"source": sysconfig.get_paths()["stdlib"],
              "tokenizer": "byte" if vocab_size is None else f"bpe {vocab_size} tokenizer.json",
              "eos": True, "valid_fraction": valid_fraction, "max_files": max_files}
    if not tests:
        recipe["tests"] = False
    finals = {split: os.path.join(out_dir, split, "stdlib") for split in ("train", "valid")}

    def complete(folder: str) -> bool:
        manifest = os.path.join(folder, "corpus.json")
        if not os.path.exists(manifest):
            return False
        with open(manifest) as f:
            found = json.load(f)
        if found.get("recipe") != recipe:
            raise DataError(f"{folder}: holds a corpus built as {found.get('recipe')}, not {recipe}; delete it to rebuild")
        return True

    if all(complete(f) for f in finals.values()):
        return finals["train"], finals["valid"]
    docs = _corpus_docs(out_dir, _stdlib_files(max_files, tests), valid_fraction, vocab_size)
    for split, final in finals.items():
        if not complete(final):
            _write_corpus_folder(final, docs[split], recipe, complete)
    return finals["train"], finals["valid"]


def _write_corpus_folder(final: str, docs: list[np.ndarray], recipe: dict, complete) -> None:
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".stdlib-", dir=parent)  # hidden: readers skip it
    try:
        os.chmod(tmp, 0o755)
        with BinWriter(os.path.join(tmp, "stdlib.bin")) as w:
            for i in range(0, len(docs), 256):
                w.write(docs[i : i + 256])
        with open(os.path.join(tmp, "corpus.json"), "w") as f:
            json.dump({"recipe": recipe, "documents": w.documents, "tokens": w.tokens}, f)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not complete(final):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
