"""The resumable, data-parallel loader and the validation sets.

The global stream (independent of the number of data-parallel ranks): epoch ``e`` orders the
documents (a permutation seeded by ``(seed, e)``, or a weighted mixture, below), lays them back to
back and cuts them into rows of ``row_len = micro_batch * seq_len`` tokens (``evo.data.packing``);
the epoch's last row is padded and the next epoch starts a fresh row. Global step ``i`` takes the
next ``micro_num * dp_size`` rows of the stream and rank ``r`` gets rows
``[r * micro_num, (r + 1) * micro_num)`` of them. So the global batch of a step depends only on the
dataset, seed, seq_len, micro_batch and ``micro_num * dp_size``: one rank with micro_num=4 sees
exactly the rows two ranks with micro_num=2 see together. Row boundaries come from the metas'
lengths alone, so a rank reads only the documents its own rows touch.

The position in the stream is (epoch, row): ``state_dict()`` holds it with the step count, and a
loader with another dp_size or micro_num continues from the same row.

Mixtures (``weights={source: w}``): in epoch ``e`` source ``s`` contributes the documents whose
start falls in tokens ``[floor(e * t_s), floor((e + 1) * t_s))`` of its own endless stream (its
documents reshuffled every pass, seeded by ``(seed, s, pass)``), where ``t_s = w_s / sum(w) * T``
and ``T`` is the tokens of all sources with a positive weight; the chosen documents are then
shuffled together (seeded by ``(seed, e)``). Token shares follow the weights to within a document
per source and epoch; a small source is repeated, a large one is spread over several epochs.

Dummy mode (``folder=None``): row ``g`` of the stream is random documents (lengths uniform in
[1, seq_len]) of random tokens in [0, vocab_size), drawn from ``(seed, g)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .format import DataError, TokenizedDataset
from .packing import Pieces, assemble_rows, cut_rows

__all__ = ["Packed", "Loader", "eval_batches", "EvalSet", "parse_skip_batches"]

_STATE_VERSION = 1


def parse_skip_batches(spec: str) -> tuple[tuple[int, int], ...]:
    """InternEvo's ``skip_batches`` syntax: ``"a-b,c"`` -> ((a, b), (c, c)), inclusive global step
    ranges counted from 0. Raises DataError naming the value."""
    ranges = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise DataError(f"Packed.skip_batches={spec!r}: {part!r} is not a step or a range a-b") from None
        if a < 0 or b < a:
            raise DataError(f"Packed.skip_batches={spec!r}: range {part!r} must have 0 <= start <= end")
        ranges.append((a, b))
    return tuple(sorted(ranges))


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DataError(f"Packed.{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class Packed:
    """Packed pre-training data: what an experiment file holds.

    Attributes:
        folder: tokenized folder (sub-folders = sources); None = dummy random tokens.
        seq_len: tokens per sequence; a row (one micro-batch) holds ``micro_batch * seq_len``.
        micro_batch: sequences per row (InternEvo's micro_bsz).
        micro_num: rows per optimizer step per data-parallel rank (gradient accumulation).
        seed: shuffling (and dummy tokens) seed.
        pack_sample_into_one: InternEvo's mode: attention ignores document boundaries.
        valid_folder: validation folder, each sub-folder a named set (``eval_batches``).
        weights: {source: weight} mixture by tokens; every source of the folder must be named
            (weight 0 leaves it out). None = every document once per epoch.
        skip_batches: global steps whose data is skipped, ``"a-b,c"`` (inclusive, from 0).
        valid_max_batches: cap on batches per validation set (None = all).
    """

    folder: str | None = None
    seq_len: int = 2048
    micro_batch: int = 1
    micro_num: int = 1
    seed: int = 0
    pack_sample_into_one: bool = False
    valid_folder: str | None = None
    weights: dict[str, float] | None = None
    skip_batches: str = ""
    valid_max_batches: int | None = None

    def __post_init__(self):
        for name in ("folder", "valid_folder"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise DataError(f"Packed.{name} must be a folder path or None, got {value!r}")
        _check_int("seq_len", self.seq_len, 1)
        _check_int("micro_batch", self.micro_batch, 1)
        _check_int("micro_num", self.micro_num, 1)
        _check_int("seed", self.seed, 0)
        if self.valid_max_batches is not None:
            _check_int("valid_max_batches", self.valid_max_batches, 1)
        if not isinstance(self.pack_sample_into_one, bool):
            raise DataError(f"Packed.pack_sample_into_one must be a bool, got {self.pack_sample_into_one!r}")
        if not isinstance(self.skip_batches, str):
            raise DataError(f"Packed.skip_batches must be a string like '0-99,200', got {self.skip_batches!r}")
        parse_skip_batches(self.skip_batches)
        if self.weights is not None:
            if not isinstance(self.weights, dict) or not self.weights:
                raise DataError(f"Packed.weights must be a non-empty dict {{source: weight}} or None, got {self.weights!r}")
            for k, w in self.weights.items():
                if not isinstance(k, str) or isinstance(w, bool) or not isinstance(w, (int, float)) or not (
                    math.isfinite(w) and w >= 0
                ):
                    raise DataError(f"Packed.weights[{k!r}] must be a finite number >= 0, got {w!r}")
            if sum(self.weights.values()) <= 0:
                raise DataError(f"Packed.weights must have a positive weight, got {self.weights!r}")
        if self.weights is not None and self.folder is None:
            raise DataError("Packed.weights needs Packed.folder (there are no sources in dummy mode)")
        _check_apart(self.folder, self.valid_folder)

    @property
    def row_len(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def positions(self) -> int:
        """How many positions (0, 1, ...) a row can number: ``seq_len`` with
        ``pack_sample_into_one`` or dummy data (documents of at most ``seq_len``), else ``row_len``
        (positions restart per document, and a document may fill a whole row)."""
        return self.seq_len if self.pack_sample_into_one or self.folder is None else self.row_len


def _check_apart(folder: str | None, valid_folder: str | None) -> None:
    """Refuse training and validation folders that are the same, or one inside the other
    (symlinks and relative paths resolved): the held-out loss would be measured on training data."""
    if folder is None or valid_folder is None:
        return
    a, b = os.path.realpath(folder), os.path.realpath(valid_folder)
    if a == b or os.path.commonpath([a, b]) in (a, b):
        relation = "is" if a == b else "contains" if os.path.commonpath([a, b]) == a else "is inside"
        raise DataError(
            f"Packed.folder={folder!r} ({a}) {relation} Packed.valid_folder={valid_folder!r} ({b}): "
            "validation would measure documents the run trains on; use separate folders")


class _RowReader:
    """Reads the tokens of stream pieces from a dataset (with the vocabulary check) and assembles
    rows. Keeps the previous call's documents, so a document continued across calls is parsed once."""

    def __init__(self, dataset: TokenizedDataset, vocab_size: int):
        self.dataset = dataset
        self.vocab_size = vocab_size
        self._cache: dict[int, np.ndarray] = {}

    def doc(self, i: int, fresh: dict[int, np.ndarray]) -> np.ndarray:
        arr = fresh.get(i)
        if arr is None:
            arr = self._cache.get(i)
            if arr is None:
                arr = self.dataset.read(i)
                if arr.size and (arr.max() >= self.vocab_size or arr.min() <= -self.vocab_size):
                    bad = int(arr[np.abs(arr) >= self.vocab_size][0])
                    raise DataError(
                        f"{self.dataset.where(i)}: token id {bad} is outside the vocabulary "
                        f"[0, {self.vocab_size}) (negative ids mean no loss; their absolute value must fit)"
                    )
            fresh[i] = arr
        return arr

    def rows(self, parts: list[tuple[Pieces, np.ndarray]], n_rows: int, cfg: Packed) -> dict[str, np.ndarray]:
        """``parts``: (pieces with rows counted in the output, global doc id of each piece)."""
        fresh: dict[int, np.ndarray] = {}
        chunks, next_ids, pieces_all, doc_ids = [], [], [], []
        for pieces, gids in parts:
            for g, off, n, end in zip(gids.tolist(), pieces.offset.tolist(), pieces.length.tolist(), pieces.ends_doc.tolist()):
                arr = self.doc(g, fresh)
                chunks.append(arr[off : off + n])
                next_ids.append(0 if end else int(arr[off + n]))
            pieces_all.append(pieces)
            doc_ids.append(gids)
        self._cache = fresh
        pieces = Pieces(*(np.concatenate(f) for f in zip(*pieces_all))) if pieces_all else cut_rows(np.zeros(0, np.int64), 1, 0, 0)
        gids = np.concatenate(doc_ids) if doc_ids else np.zeros(0, np.int64)
        flat = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        return assemble_rows(
            flat, pieces, np.asarray(next_ids, dtype=np.int64), self.dataset.source_ids[gids],
            n_rows, cfg.seq_len, cfg.micro_batch, cfg.pack_sample_into_one,
        )


def _to_torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


class Loader:
    """Iterator over the batches of one data-parallel rank; ``next()`` = one optimizer step.

    Each batch is a dict of torch tensors (row_len = micro_batch * seq_len):
    ``tokens``, ``labels`` (-100 = no loss), ``positions``, ``source`` (index into
    ``loader.sources``, -1 for padding): int64 [micro_num, row_len]; ``cu_seqlens`` int32
    [micro_num, K] (each row's document boundaries, padded on the right with row_len).
    Endless: epochs follow each other. See the module docstring for the stream and the sharding.
    """

    def __init__(self, config: Packed, *, vocab_size: int, dp_rank: int = 0, dp_size: int = 1):
        if not isinstance(config, Packed):
            raise DataError(f"Loader needs an evo.data.Packed config, got {type(config).__name__}")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise DataError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if not (isinstance(dp_size, int) and dp_size >= 1 and isinstance(dp_rank, int) and 0 <= dp_rank < dp_size):
            raise DataError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank!r}, dp_size={dp_size!r}")
        self.config = config
        self.vocab_size = vocab_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self._skip = parse_skip_batches(config.skip_batches)
        self.step = 0  # global steps taken (skipped ones included)
        self.epoch = 0
        self.row = 0  # next row of the current epoch
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if config.folder is None:
            self.dataset = None
            self.sources = ["dummy"]
            return
        self.dataset = TokenizedDataset(config.folder)
        self.sources = list(self.dataset.sources)
        self._reader = _RowReader(self.dataset, vocab_size)
        self._nonempty = np.flatnonzero(self.dataset.lengths > 0)
        if config.weights is None:
            if self._nonempty.size == 0:
                raise DataError(f"{config.folder}: every document is empty")
            return
        unknown = sorted(set(config.weights) - set(self.sources))
        missing = sorted(set(self.sources) - set(config.weights))
        if unknown or missing:
            raise DataError(
                f"Packed.weights={config.weights!r} does not match the sources of {config.folder} "
                f"({self.sources}): unknown {unknown}, missing {missing} (give 0 to leave a source out)"
            )
        lengths = self.dataset.lengths.astype(np.int64)
        self._mix = []  # (source index, weight, nonempty doc ids, their lengths, tokens)
        for s, name in enumerate(self.sources):
            ids = self._nonempty[self.dataset.source_ids[self._nonempty] == s]
            w = float(config.weights[name])
            if w > 0 and ids.size == 0:
                raise DataError(f"Packed.weights[{name!r}]={w} but source {name!r} in {config.folder} has no tokens")
            if w > 0:
                self._mix.append((s, w, ids, lengths[ids], int(lengths[ids].sum())))
        self._mix_tokens = sum(m[4] for m in self._mix)

    # ---- the global stream ------------------------------------------------------------------

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(global doc ids in stream order, cumulative lengths) of an epoch; the last two kept."""
        plan = self._plans.get(epoch)
        if plan is None:
            if self.config.weights is None:
                rng = np.random.default_rng([self.config.seed, epoch])
                order = self._nonempty[rng.permutation(self._nonempty.size)]
            else:
                order = self._mixture_order(epoch)
            ends = np.cumsum(self.dataset.lengths[order], dtype=np.int64)
            plan = (order, ends)
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = plan
        return plan

    def _mixture_order(self, epoch: int) -> np.ndarray:
        total_w = sum(m[1] for m in self._mix)
        chosen = []
        for s, w, ids, lens, tokens in self._mix:
            share = w / total_w * self._mix_tokens
            lo, hi = math.floor(epoch * share), math.floor((epoch + 1) * share)
            if hi <= lo:
                continue
            for k in range(lo // tokens, (hi - 1) // tokens + 1):  # passes over the source
                perm = np.random.default_rng([self.config.seed, 1, s, k]).permutation(ids.size)
                ends = k * tokens + np.cumsum(lens[perm])
                starts = ends - lens[perm]
                chosen.append(ids[perm[(starts >= lo) & (starts < hi)]])
        order = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        if order.size == 0:
            raise DataError(f"Packed.weights={self.config.weights!r}: epoch {epoch} selects no documents")
        return order[np.random.default_rng([self.config.seed, 2, epoch]).permutation(order.size)]

    def _rows_in(self, epoch: int) -> int:
        if self.dataset is None:
            return 2**62  # the dummy stream is one endless epoch
        return -(-int(self._plan(epoch)[1][-1]) // self.config.row_len)

    def _segments(self, count: int) -> tuple[list[tuple[int, int, int]], int, int]:
        """The next ``count`` rows from the pointer as (epoch, first row, end row) segments, and the
        pointer after them."""
        segs, epoch, row = [], self.epoch, self.row
        while count > 0:
            rows = self._rows_in(epoch)
            take = min(count, rows - row)
            if take > 0:
                segs.append((epoch, row, row + take))
                row += take
                count -= take
            if row >= rows:
                epoch, row = epoch + 1, 0
        return segs, epoch, row

    def _skipped(self, step: int) -> bool:
        return any(a <= step <= b for a, b in self._skip)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        per_step = self.config.micro_num * self.dp_size
        while self._skipped(self.step):
            _, self.epoch, self.row = self._segments(per_step)
            self.step += 1
        segs, end_epoch, end_row = self._segments(per_step)
        # this rank's rows are [rank * micro_num, (rank + 1) * micro_num) of the step's rows
        mine, first, last, seen = [], self.dp_rank * self.config.micro_num, (self.dp_rank + 1) * self.config.micro_num, 0
        for epoch, r0, r1 in segs:
            lo, hi = max(r0, r0 + first - seen), min(r1, r0 + last - seen)
            if lo < hi:
                mine.append((epoch, lo, hi, seen + (lo - r0) - first))
            seen += r1 - r0
        batch = self._read(mine)
        self.epoch, self.row = end_epoch, end_row
        self.step += 1
        return _to_torch(batch)

    def _read(self, segments: list[tuple[int, int, int, int]]) -> dict[str, np.ndarray]:
        cfg = self.config
        if self.dataset is None:
            return self._dummy(segments)
        parts = []
        for epoch, r0, r1, out_row in segments:
            order, ends = self._plan(epoch)
            pieces = cut_rows(ends, cfg.row_len, r0, r1)
            pieces = pieces._replace(row=pieces.row + out_row)
            parts.append((pieces, order[pieces.doc]))
        return self._reader.rows(parts, cfg.micro_num, cfg)

    def _dummy(self, segments) -> dict[str, np.ndarray]:
        cfg = self.config
        lengths, rows, flat = [], [], []
        for _, r0, r1, out_row in segments:
            for g in range(r0, r1):
                rng = np.random.default_rng([cfg.seed, g])
                lens = []
                while sum(lens) < cfg.row_len:
                    lens.extend(rng.integers(1, cfg.seq_len + 1, size=2 * cfg.micro_batch + 2).tolist())
                cut = np.cumsum(lens)
                k = int(np.searchsorted(cut, cfg.row_len))
                lens = lens[: k + 1]
                lens[-1] -= int(cut[k]) - cfg.row_len
                lengths.extend(lens)
                rows.extend([out_row + g - r0] * len(lens))
                flat.append(rng.integers(0, self.vocab_size, size=cfg.row_len))
        n = len(lengths)
        pieces = Pieces(np.arange(n), np.zeros(n, np.int64), np.asarray(lengths, np.int64),
                        np.asarray(rows, np.int64), np.ones(n, dtype=bool))
        return assemble_rows(np.concatenate(flat).astype(np.int64), pieces, np.zeros(n, np.int64), np.zeros(n, np.int64),
                             cfg.micro_num, cfg.seq_len, cfg.micro_batch, cfg.pack_sample_into_one)

    # ---- state ---------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        cfg = self.config
        ds = self.dataset
        return {
            "seed": cfg.seed,
            "seq_len": cfg.seq_len,
            "micro_batch": cfg.micro_batch,
            "weights": None if cfg.weights is None else {k: float(v) for k, v in sorted(cfg.weights.items())},
            "documents": None if ds is None else len(ds),
            "tokens": None if ds is None else ds.num_tokens,
        }

    def state_dict(self) -> dict:
        """Where the global stream stands (JSON-serialisable, independent of dp_size/micro_num)."""
        return {"version": _STATE_VERSION, "step": self.step, "epoch": self.epoch, "row": self.row, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from any dp_size or micro_num). The seed, seq_len, micro_batch,
        weights and dataset size must match; a mismatch raises DataError naming the field."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise DataError(f"not a data loader state (version {_STATE_VERSION}): {state!r:.200}")
        for key, mine in self._fingerprint().items():
            if state.get(key) != mine:
                raise DataError(f"data loader state was saved with {key}={state.get(key)!r} but this loader has {key}={mine!r}")
        for key in ("step", "epoch", "row"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise DataError(f"data loader state has a bad {key}: {state.get(key)!r}")
        if self.dataset is not None and state["row"] >= self._rows_in(state["epoch"]):
            raise DataError(f"data loader state row {state['row']} is past the end of epoch {state['epoch']}")
        self.step, self.epoch, self.row = state["step"], state["epoch"], state["row"]

    def __repr__(self) -> str:
        return (f"Loader({self.config!r}, vocab_size={self.vocab_size}, dp_rank={self.dp_rank}, "
                f"dp_size={self.dp_size}, step={self.step}, epoch={self.epoch}, row={self.row})")


class EvalSet:
    """One validation set: its documents in file order, packed into rows, never shuffled.

    ``len(s)`` batches; ``s[i]`` / iteration give the Loader's batch layout with micro_num=1
    (tensors [1, row_len], cu_seqlens [1, K]). ``s.sources`` names the ``source`` indices.
    """

    def __init__(self, folder: str, *, seq_len: int, micro_batch: int, vocab_size: int, max_batches: int | None = None):
        self.config = Packed(folder=folder, seq_len=seq_len, micro_batch=micro_batch)
        self.dataset = TokenizedDataset(folder)
        self.sources = list(self.dataset.sources)
        self._reader = _RowReader(self.dataset, vocab_size)
        self._order = np.flatnonzero(self.dataset.lengths > 0)
        self._ends = np.cumsum(self.dataset.lengths[self._order], dtype=np.int64)
        rows = -(-int(self._ends[-1]) // self.config.row_len) if self._ends.size else 0
        self._len = rows if max_batches is None else min(rows, max_batches)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self._len:
            raise IndexError(f"batch {i} out of range for {self._len} batches of {self.config.folder}")
        pieces = cut_rows(self._ends, self.config.row_len, i, i + 1)
        cfg = dataclasses.replace(self.config, micro_num=1)
        return _to_torch(self._reader.rows([(pieces, self._order[pieces.doc])], 1, cfg))

    def __iter__(self):
        return (self[i] for i in range(self._len))


def eval_batches(
    folder: str, *, seq_len: int, micro_batch: int, vocab_size: int, max_batches: int | None = None
) -> dict[str, EvalSet]:
    """Validation sets of ``folder``: {set name: EvalSet} (re-iterable, deterministic, no shuffle).

    If ``folder`` holds .bin files directly it is one set named after it (its sub-folders are its
    sources); otherwise each sub-folder is one set named after the sub-folder.
    """
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: validation folder does not exist")
    names = sorted(os.listdir(folder))
    kwargs = dict(seq_len=seq_len, micro_batch=micro_batch, vocab_size=vocab_size, max_batches=max_batches)
    if any(n.endswith(".bin") for n in names):
        return {os.path.basename(os.path.abspath(folder)): EvalSet(folder, **kwargs)}
    subs = [n for n in names if os.path.isdir(os.path.join(folder, n)) and not n.startswith(".")]
    if not subs:
        raise DataError(f"{folder}: no .bin files and no sub-folders (validation sets) in this folder")
    return {n: EvalSet(os.path.join(folder, n), **kwargs) for n in subs}
