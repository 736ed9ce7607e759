"""InternEvo's tokenized files, read and written as they are.

A tokenized folder holds pairs of files:

- ``NAME.bin``: JSON lines, one document per line, ``{"tokens": [1, 2, 3]}\\n`` exactly as
  ``json.dumps(...) + "\\n"`` writes it (", " between ids). Negative ids mean "never a loss
  target" (InternEvo's SFT prompt masking); see ``evo.data.packing``.
- ``NAME.bin.meta``: an ``np.save``d int32 array ``[n_lines, 2]`` of ``(byte_offset, n_tokens)``
  (evo and InternEvo's tokenizer write this); InternEvo's ``tools/jsonl2bin_meta.py`` writes int64
  ``[n_lines, 3]`` of ``(byte_offset, n_tokens, line_index)``, read the same way (column 1 is the
  length in both).

Sub-folders are named *sources* (for per-source loss and mixture weights): every file under the
first-level sub-folder ``web/`` belongs to source ``"web"``; files directly in the folder belong to
the source named after the folder itself.

Write rule (atomic pairs): a writer writes both files under temporary names, fsyncs them, removes any
old ``NAME.bin``, renames the ``.meta`` into place and then the ``.bin``. The appearance of
``NAME.bin`` is the commit point, so a ``.bin`` that a reader sees always has the ``.meta`` written
with it. A crash can leave a ``.meta`` without its ``.bin`` (or temporary files); the reader reports
that orphan as an error instead of guessing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["DataError", "TokenizedDataset", "BinWriter", "write_bin", "format_lines", "parse_line"]

PREFIX = b'{"tokens": ['
SUFFIX = b"]}\n"
_INT32_MAX = 2**31 - 1
_MAX_OPEN_FILES = 256  # file descriptors a dataset keeps open for positioned reads


class DataError(ValueError):
    """Bad data, tokenizer or data config. The message names the file (and line) and the value."""


# --------------------------------------------------------------------------------------------------
# Writing


def format_lines(docs) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Format documents as InternEvo JSON lines.

    Args:
        docs: a sequence of 1-D int arrays or lists (one per document, empty allowed).
    Returns:
        (data, line_bytes, lengths): ``data`` is exactly
        ``b"".join((json.dumps({"tokens": doc}) + "\n").encode() for doc in docs)``;
        ``line_bytes`` int64 [n_docs] each line's size in bytes (newline included);
        ``lengths`` int64 [n_docs] tokens per document.
    """
    # json's C encoder measured faster (about 12 M ids/s) than a vectorised numpy formatter.
    lines = []
    lengths = np.empty(len(docs), dtype=np.int64)
    for i, d in enumerate(docs):
        ids = d.tolist() if isinstance(d, np.ndarray) else [int(x) for x in d]
        lengths[i] = len(ids)
        lines.append(f'{{"tokens": {json.dumps(ids)}}}\n'.encode())
    line_bytes = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
    return b"".join(lines), line_bytes, lengths


class BinWriter:
    """Stream documents into one ``.bin`` + ``.bin.meta`` pair, committed atomically on close.

    ``with BinWriter("out/part-00000.bin") as w: w.write(tokens, lengths)``. Nothing is visible under
    the final names until ``close()``; an exception inside the ``with`` removes the temporary files.
    Raises DataError when the file would pass 2 GiB - 1 bytes (the int32 offsets of the meta).
    """

    def __init__(self, path: str):
        if not path.endswith(".bin"):
            raise DataError(f"{path}: a tokenized file name must end with .bin")
        self.path = path
        self._tmp_bin = f"{path}.tmp-{os.getpid()}"
        self._tmp_meta = f"{path}.meta.tmp-{os.getpid()}"
        self._f = open(self._tmp_bin, "wb")
        self._offsets: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self.bytes = 0
        self.documents = 0
        self.tokens = 0

    def write(self, docs) -> None:
        """Append documents (a sequence of 1-D int arrays or lists)."""
        self.write_formatted(*format_lines(docs))

    def write_formatted(self, data: bytes, line_bytes: np.ndarray, lengths: np.ndarray) -> None:
        """Append lines already made by ``format_lines`` (workers format, the writer only writes)."""
        if self.bytes + len(data) > _INT32_MAX:
            raise DataError(
                f"{self.path}: would reach {self.bytes + len(data)} bytes, past the 2147483647 an "
                "int32 .meta offset can address; write fewer documents per file"
            )
        starts = self.bytes + np.cumsum(line_bytes) - line_bytes
        self._offsets.append(starts.astype(np.int32))
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self._f.write(data)
        self.bytes += len(data)
        self.documents += len(line_bytes)
        self.tokens += int(np.sum(lengths))

    def close(self) -> None:
        """Commit: fsync both temp files, drop an old .bin, rename .meta then .bin into place."""
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        meta = np.stack(
            [np.concatenate(self._offsets or [np.zeros(0, np.int32)]),
             np.concatenate(self._lengths or [np.zeros(0, np.int32)])], axis=1
        ).astype(np.int32)
        with open(self._tmp_meta, "wb") as f:
            np.save(f, meta)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(self.path):
            os.remove(self.path)  # from here until the last rename a reader sees no .bin
        os.replace(self._tmp_meta, self.path + ".meta")
        os.replace(self._tmp_bin, self.path)

    def abort(self) -> None:
        """Close and remove the temporary files; the final names are untouched."""
        if not self._f.closed:
            self._f.close()
        for p in (self._tmp_bin, self._tmp_meta):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self) -> "BinWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_bin(path: str, docs) -> int:
    """Write documents (a sequence of 1-D int arrays/lists) to ``path`` and ``path + ".meta"``.

    Byte-compatible with InternEvo's tokenizer tool. Returns the number of tokens written.
    """
    with BinWriter(path) as w:
        w.write(list(docs))
    return w.tokens


# --------------------------------------------------------------------------------------------------
# Reading


_ID_CHARS = b"0123456789, -"


def _canonical_inner(line: bytes) -> bytes | None:
    """The text between the brackets when ``line`` looks like json.dumps's form, else None.

    Cheap C-speed checks that guarantee np.fromstring(inner, sep=",") either reads every id right or
    returns fewer than ``commas + 1`` ids (it stops at the first thing it cannot read), so the
    caller's count check catches any malformed line: only id characters; the last id well formed;
    each "-" directly before a digit and after a separator (numpy reads a bare "-" as 0).
    """
    if not (line.startswith(PREFIX) and line.endswith(SUFFIX)):
        return None
    inner = line[len(PREFIX) : -len(SUFFIX)]
    if not inner:
        return inner
    if inner.translate(None, _ID_CHARS):
        return None
    last = inner[inner.rfind(b",") + 1 :].lstrip(b" ")
    if not last.lstrip(b"-").isdigit() or last.startswith(b"--"):
        return None
    if b"-" in inner:
        a = np.frombuffer(inner, dtype=np.uint8)
        m = np.flatnonzero(a == 45)
        after = a[np.minimum(m + 1, a.size - 1)]
        before = a[np.maximum(m - 1, 0)]
        if not (((after >= 48) & (after <= 57)).all() and ((m == 0) | (before == 32) | (before == 44)).all()):
            return None
    return inner


def parse_line(line: bytes, where: str, expect: int | None = None) -> np.ndarray:
    """Parse one ``{"tokens": [...]}`` line into int64 [n]. ``where`` = "file:line" for errors.

    The canonical form (what json.dumps writes) is parsed by numpy directly; anything else
    (other keys, other spacing) goes through ``json.loads``. ``expect`` checks the token count.
    """
    inner = _canonical_inner(line)
    if inner is not None:
        try:
            arr = np.fromstring(inner, dtype=np.int64, sep=",")
        except ValueError:  # numpy's "could not be read to its end", when warnings are errors
            arr = None
        if arr is not None and arr.size == (inner.count(b",") + 1 if inner else 0):  # all read
            if expect is not None and arr.size != expect:
                raise DataError(
                    f"{where}: line has {arr.size} tokens but the .meta says {expect} "
                    "(the .meta does not belong to this .bin)"
                )
            return arr
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not a JSON line ({e}): {line[:80]!r}") from None
    toks = obj.get("tokens") if isinstance(obj, dict) else None
    if not isinstance(toks, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in toks):
        raise DataError(f'{where}: expected {{"tokens": [int, ...]}}, got {line[:80]!r}')
    try:
        arr = np.array(toks, dtype=np.int64)
    except OverflowError:
        raise DataError(f"{where}: a token id does not fit in int64: {line[:80]!r}") from None
    if expect is not None and arr.size != expect:
        raise DataError(
            f"{where}: line has {arr.size} tokens but the .meta says {expect} "
            "(the .meta does not belong to this .bin)"
        )
    return arr


@dataclass(frozen=True)
class _File:
    path: str
    source: int
    size: int
    offsets: np.ndarray  # int [n] byte offset of each line (memory-mapped .meta column)
    first_doc: int  # global index of this file's first document


def _scan(folder: str) -> list[tuple[str, str]]:
    """(path of each .bin, source name), sorted; errors on orphans and empty/missing folders."""
    if not os.path.exists(folder):
        raise DataError(f"{folder}: data folder does not exist")
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not a folder")
    folder = os.path.normpath(folder)
    own_name = os.path.basename(os.path.abspath(folder))
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        # hidden folders are work in progress (e.g. a corpus being built before its atomic rename)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        source = own_name if rel == "." else rel.split(os.sep)[0]
        names = set(filenames)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.endswith(".bin"):
                if name + ".meta" not in names:
                    raise DataError(f"{path}: has no matching {name}.meta (write it with evo tokenize)")
                found.append((path, source))
            elif name.endswith(".bin.meta") and name[: -len(".meta")] not in names:
                raise DataError(
                    f"{path}: .meta without its .bin, left by an interrupted write; delete it "
                    "and re-run the tokenizer"
                )
    if not found:
        raise DataError(f"{folder}: no .bin files in this folder or its sub-folders")
    return found


def _load_meta(path: str) -> np.ndarray:
    meta_path = path + ".meta"
    try:
        meta = np.load(meta_path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy raises several types for a damaged .npy
        raise DataError(f"{meta_path}: not a readable np.save file ({type(e).__name__}: {e})") from None
    if meta.ndim != 2 or meta.shape[1] not in (2, 3) or meta.dtype.kind not in "iu":
        if meta.size == 0:
            return np.zeros((0, 2), dtype=np.int32)
        raise DataError(
            f"{meta_path}: expected an int array [n, 2] of (byte_offset, n_tokens) or [n, 3] of "
            f"(byte_offset, n_tokens, index), got dtype {meta.dtype} shape {meta.shape}"
        )
    return meta


class TokenizedDataset:
    """A folder of InternEvo tokenized files, indexed by document.

    ``ds[i] -> (tokens int64 [n], source_name)``; ``ds.lengths`` int32 [len(ds)] token counts from
    the metas (read once; the offsets stay memory-mapped); ``ds.source_ids`` int16 [len(ds)] index
    into ``ds.sources``. A document is one positioned read (``os.pread``) of its line, never the
    whole file: measured as fast as slicing an mmap, and it keeps resident memory flat, where an
    mmap's fault-around maps 64 KB per random read and grew RSS to the corpus size. Files are
    checked cheaply at open (meta shape, offsets increasing and inside the file, the last line
    complete); each line is checked when read (it parses, and has the meta's token count).
    """

    def __init__(self, folder: str):
        self.folder = folder
        found = _scan(folder)
        self.sources: list[str] = sorted({s for _, s in found})
        source_index = {s: i for i, s in enumerate(self.sources)}
        files, lengths, source_ids = [], [], []
        n = 0
        for path, source in found:
            meta = _load_meta(path)
            size = os.path.getsize(path)
            offsets = meta[:, 0]
            lens = np.asarray(meta[:, 1], dtype=np.int32)  # a third column is a line index
            self._check_file(path, size, offsets, lens)
            files.append(_File(path, source_index[source], size, offsets, n))
            lengths.append(lens)
            source_ids.append(np.full(len(lens), source_index[source], dtype=np.int16))
            n += len(lens)
        self._files = files
        self._file_starts = np.array([f.first_doc for f in files], dtype=np.int64)
        self.lengths: np.ndarray = np.concatenate(lengths)
        self.source_ids: np.ndarray = np.concatenate(source_ids)
        self._fds: dict[int, int] = {}

    @staticmethod
    def _check_file(path: str, size: int, offsets: np.ndarray, lens: np.ndarray) -> None:
        n = len(offsets)
        if n == 0:
            if size:
                raise DataError(f"{path}: the .meta lists no lines but the file has {size} bytes")
            return
        if lens.min() < 0:
            i = int(np.argmin(lens))
            raise DataError(f"{path}:{i + 1}: the .meta gives a negative token count {int(lens[i])}")
        if int(offsets[0]) != 0:
            raise DataError(f"{path}: the .meta's first offset is {int(offsets[0])}, expected 0")
        steps = np.diff(offsets)
        if steps.size and steps.min() <= 0:
            i = int(np.argmin(steps))
            raise DataError(
                f"{path}:{i + 2}: the .meta's offsets do not increase ({int(offsets[i])} then "
                f"{int(offsets[i + 1])}); the .meta does not belong to this .bin"
            )
        last = int(offsets[-1])
        if last >= size:
            raise DataError(
                f"{path}: truncated or not this .meta's file: the .meta puts line {n} at byte {last} "
                f"but the file has {size} bytes"
            )
        with open(path, "rb") as f:
            f.seek(last - 1 if last else 0)
            tail = f.read(size - last + (1 if last else 0))
        if last and tail[:1] != b"\n":
            raise DataError(
                f"{path}:{n}: the .meta's offset {last} is not at a line start; the .meta does not "
                "belong to this .bin"
            )
        line = tail[1:] if last else tail
        if not line.endswith(b"\n"):
            raise DataError(f"{path}:{n}: truncated: the file ends in the middle of line {n}")
        if line.count(b"\n") != 1:
            raise DataError(
                f"{path}: the .meta lists {n} lines but the file has more after byte {last}; the "
                ".meta does not belong to this .bin"
            )

    def __len__(self) -> int:
        return int(self.lengths.size)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def locate(self, i: int) -> tuple[str, int]:
        """(path, 1-based line number) of document ``i``."""
        f = self._files[int(np.searchsorted(self._file_starts, i, side="right")) - 1]
        return f.path, i - f.first_doc + 1

    def where(self, i: int) -> str:
        path, line = self.locate(i)
        return f"{path}:{line}"

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN_FILES:
                self.close()
            fd = self._fds[k] = os.open(self._files[k].path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close the open file descriptors (reopened on the next read)."""
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        self.close()

    def read(self, i: int) -> np.ndarray:
        """Tokens int64 [n] of document ``i`` (negative ids kept as they are in the file)."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents in {self.folder}")
        k = int(np.searchsorted(self._file_starts, i, side="right")) - 1
        f = self._files[k]
        j = i - f.first_doc
        start = int(f.offsets[j])
        end = int(f.offsets[j + 1]) if j + 1 < len(f.offsets) else f.size
        line = os.pread(self._fd(k), end - start, start)
        return parse_line(line, f"{f.path}:{j + 1}", int(self.lengths[i]))

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        i = int(i)
        return self.read(i), self.sources[int(self.source_ids[i])]

    def __getstate__(self):  # file descriptors do not travel; reopen lazily in the receiving process
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __repr__(self) -> str:
        return (f"TokenizedDataset({self.folder!r}: {len(self._files)} files, {len(self)} documents, "
                f"{self.num_tokens} tokens, sources={self.sources})")
