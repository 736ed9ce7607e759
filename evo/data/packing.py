"""Packing documents into fixed-length rows: pure numpy functions.

The stream: documents are laid back to back (empty ones dropped) and cut into rows of
``row_len = micro_batch * seq_len`` tokens; the last row is padded. A document longer than what is
left of a row continues at the start of the next row. Per row:

- ``tokens`` int64 [row_len]: ``abs(id)``; padding is 0.
- ``labels`` int64 [row_len]: the next token of the same document, even when that token starts the
  next row; -100 at each document's last token, at padding, and where the next token's id is
  negative in the file (a negative id is never a loss target: InternEvo's SFT prompt masking;
  unlike InternEvo, a target id 0 is kept).
- ``positions`` int64 [row_len]: restart at 0 at each document start and at the start of every row
  (a document continued from the previous row restarts at 0, as in InternEvo); padding counts
  0, 1, ... as its own segment.
- ``cu_seqlens`` int32 [K]: segment boundaries over the row: 0, each document (piece) end, and
  row_len; padding at the row end is one more segment. Rows of one batch are padded on the right
  to the same K by repeating row_len (zero-length segments at the end).
- ``source`` int64 [row_len]: the document's source index, -1 for padding.

``pack_sample_into_one=True`` (InternEvo's mode) ignores document boundaries for attention:
cu_seqlens = [0, seq_len, 2*seq_len, ..., row_len] and positions 0..seq_len-1 in every seq_len
chunk; labels still never cross a document boundary.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["pack_documents", "Pieces", "cut_rows", "assemble_rows", "IGNORE"]

IGNORE = -100  # label of a position that has no loss


class Pieces(NamedTuple):
    """Where each row's tokens come from: one entry per (document, row) overlap, in stream order."""

    doc: np.ndarray  # int64 [p] index into the stream's documents
    offset: np.ndarray  # int64 [p] first token of the piece inside its document
    length: np.ndarray  # int64 [p] tokens in the piece (> 0)
    row: np.ndarray  # int64 [p] row of the piece, counted from the first row asked for
    ends_doc: np.ndarray  # bool [p] the piece ends its document (its last label is -100)


def cut_rows(ends: np.ndarray, row_len: int, row_start: int, row_stop: int) -> Pieces:
    """Pieces of rows [row_start, row_stop) of a stream, from document lengths alone.

    Args:
        ends: int64 [n_docs] cumulative token counts of the stream's documents (``cumsum(lengths)``,
            no zero lengths), so document k covers tokens [ends[k] - len_k, ends[k]).
        row_len: tokens per row.
    Rows past the stream's end give no pieces; the caller pads them.
    """
    total = int(ends[-1]) if ends.size else 0
    a, b = row_start * row_len, min(row_stop * row_len, total)
    if a >= b:
        e = np.zeros(0, dtype=np.int64)
        return Pieces(e, e, e, e, np.zeros(0, dtype=bool))
    i0 = int(np.searchsorted(ends, a, side="right"))
    i1 = int(np.searchsorted(ends, b, side="left"))
    doc_cuts = ends[i0:i1]
    row_cuts = np.arange(row_start + 1, row_stop, dtype=np.int64) * row_len
    cuts = np.union1d(np.concatenate([doc_cuts, row_cuts[row_cuts < b]]), [a, b])
    start, stop = cuts[:-1], cuts[1:]
    doc = np.searchsorted(ends, start, side="right")
    doc_end = ends[doc]
    doc_start = np.where(doc > 0, ends[np.maximum(doc - 1, 0)], 0)
    offset = start - doc_start
    return Pieces(doc, offset, stop - start, start // row_len - row_start, stop == doc_end)


def assemble_rows(
    flat: np.ndarray,
    pieces: Pieces,
    next_ids: np.ndarray,
    piece_source: np.ndarray,
    n_rows: int,
    seq_len: int,
    micro_batch: int,
    pack_sample_into_one: bool,
) -> dict[str, np.ndarray]:
    """Build the row arrays (see the module docstring) from the pieces' raw ids.

    Args:
        flat: int64 [sum(pieces.length)] raw ids of the pieces, concatenated in piece order.
        next_ids: int64 [p] raw id following each piece in its document (ignored where
            ``pieces.ends_doc``).
        piece_source: int [p] source index of each piece.
    Returns:
        tokens, labels, positions, source int64 [n_rows, row_len]; cu_seqlens int32 [n_rows, K].
    """
    row_len = seq_len * micro_batch
    n = flat.size
    tokens = np.zeros((n_rows, row_len), dtype=np.int64)
    labels = np.full((n_rows, row_len), IGNORE, dtype=np.int64)
    source = np.full((n_rows, row_len), -1, dtype=np.int64)
    if pack_sample_into_one:
        positions = np.tile(np.arange(seq_len, dtype=np.int64), (n_rows, micro_batch))
    else:
        positions = np.empty((n_rows, row_len), dtype=np.int64)

    lengths = pieces.length
    piece_first = np.cumsum(lengths) - lengths  # index in flat of each piece's first token
    lab = np.empty(n, dtype=np.int64)
    lab[:-1] = flat[1:]
    if n:
        last = piece_first + lengths - 1
        lab[last] = np.where(pieces.ends_doc, IGNORE, next_ids)
    np.copyto(lab, IGNORE, where=lab < 0)
    src = np.repeat(np.asarray(piece_source, dtype=np.int64), lengths)
    if not pack_sample_into_one:
        pos = np.arange(n, dtype=np.int64) - np.repeat(piece_first, lengths)

    # pieces are in row order and fill each row from its start
    row_used = np.bincount(pieces.row, weights=lengths, minlength=n_rows).astype(np.int64)
    row_first = np.cumsum(row_used) - row_used
    pieces_per_row = np.bincount(pieces.row, minlength=n_rows)
    split_at = np.cumsum(pieces_per_row)[:-1]
    cu_rows = []
    for r in range(n_rows):
        s, u = int(row_first[r]), int(row_used[r])
        tokens[r, :u] = np.abs(flat[s : s + u])
        labels[r, :u] = lab[s : s + u]
        source[r, :u] = src[s : s + u]
        if not pack_sample_into_one:
            positions[r, :u] = pos[s : s + u]
            positions[r, u:] = np.arange(row_len - u)
    if pack_sample_into_one:
        cu = np.tile(np.arange(0, row_len + 1, seq_len, dtype=np.int32), (n_rows, 1))
    else:
        for r, row_lengths in enumerate(np.split(lengths, split_at) if n_rows else []):
            bounds = np.concatenate([[0], np.cumsum(row_lengths)])
            if bounds[-1] < row_len:
                bounds = np.append(bounds, row_len)
            cu_rows.append(bounds)
        k = max((b.size for b in cu_rows), default=2)
        cu = np.full((n_rows, k), row_len, dtype=np.int32)
        for r, bounds in enumerate(cu_rows):
            cu[r, : bounds.size] = bounds
    return {"tokens": tokens, "labels": labels, "positions": positions, "cu_seqlens": cu, "source": source}


def pack_documents(
    docs: Sequence[np.ndarray],
    seq_len: int,
    *,
    micro_batch: int = 1,
    pack_sample_into_one: bool = False,
    sources: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Pack documents, in the given order, into rows of ``micro_batch * seq_len`` tokens.

    Args:
        docs: 1-D int arrays of raw token ids (negative = never a loss target); empty ones are dropped.
        seq_len, micro_batch: a row holds ``row_len = micro_batch * seq_len`` tokens.
        pack_sample_into_one: InternEvo's mode (fixed cu_seqlens per seq_len chunk).
        sources: source index of each document (default 0).
    Returns:
        ``tokens``, ``labels``, ``positions``, ``source``: int64 [rows, row_len];
        ``cu_seqlens``: int32 [rows, K], rows = ceil(total tokens / row_len). Exactly as the module
        docstring defines them; this is the Loader's row layout.
    """
    if seq_len < 1 or micro_batch < 1:
        raise ValueError(f"seq_len and micro_batch must be >= 1, got seq_len={seq_len}, micro_batch={micro_batch}")
    arrays = [np.asarray(d, dtype=np.int64).ravel() for d in docs]
    src = np.zeros(len(arrays), dtype=np.int64) if sources is None else np.asarray(sources, dtype=np.int64)
    if src.shape != (len(arrays),):
        raise ValueError(f"sources has shape {src.shape}, expected ({len(arrays)},)")
    keep = [i for i, a in enumerate(arrays) if a.size]
    arrays = [arrays[i] for i in keep]
    src = src[keep]
    row_len = seq_len * micro_batch
    ends = np.cumsum([a.size for a in arrays], dtype=np.int64)
    total = int(ends[-1]) if ends.size else 0
    n_rows = -(-total // row_len)
    pieces = cut_rows(ends, row_len, 0, n_rows)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    next_ids = np.array(
        [0 if e else arrays[d][o + n] for d, o, n, e in zip(pieces.doc, pieces.offset, pieces.length, pieces.ends_doc)],
        dtype=np.int64,
    )
    return assemble_rows(flat, pieces, next_ids, src[pieces.doc], n_rows, seq_len, micro_batch, pack_sample_into_one)
