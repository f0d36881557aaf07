"""Which rows of a split each rank reads, epoch by epoch. No Spark, no torch: plain arithmetic.

A split written by the ``random`` strategy (``SplitInfo.deal == "blocks"``) is its files in path
order, each a list of record batches: one sequence of ``rows`` rows in *storage order* (the order
Spark's partitions held them, which may be sorted by a date or a label). The reader deals it:

1. The sequence, started at a row drawn from ``(seed, epoch)`` (wrapping around, so block edges
   and the rows left out move every epoch), is cut into blocks of ``b`` rows
   (:func:`block_rows`: at most :data:`BLOCK_ROWS`, and small enough that every rank gets at
   least :data:`MIN_BLOCKS_PER_RANK` blocks). Each run of ``size`` consecutive blocks (a *group*)
   gives one block to every rank, which rank gets which drawn afresh every epoch. Every rank
   therefore holds a slice of every part of the storage order: a source sorted by the label
   gives each rank the global label mix, to within one block per label change.
2. The rows after the last whole group (fewer than ``size * b``) are split into ``size`` equal
   ranges, dealt in a rotation drawn the same way; the ``< size`` rows left over (the global
   remainder) are the only rows an epoch leaves out (``every_row``: they go one each to the
   first ranks).
3. Each rank visits its ranges in an order drawn from ``(seed, epoch, rank)``; the loader's
   shuffle buffer mixes the rows of many ranges.

So every rank reads exactly ``rows // size`` rows (equal steps by construction), different rows
every epoch, the same for the same seed and epoch on any machine with the same NumPy (a resumed
run skips the batches it trained on and sees the rest as the uninterrupted run would). Without
shuffling, the same deal with no draws: rank ``r`` reads blocks ``r, r + size, ...`` in storage
order.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lepton_spark.errors import ShardError
from lepton_spark.shards.manifest import ShardInfo

BLOCK_ROWS = 4096  # the writer's record batches hold this many rows, so blocks rarely straddle
MIN_BLOCKS_PER_RANK = 64  # label mix within 1/64 of a rank's rows per label change

Range = tuple[int, int]


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of record batch ``batch`` of file ``file`` (split indices)."""

    file: int
    batch: int
    start: int
    stop: int


class RowIndex:
    """A split's rows in storage order (files by path, record batches in file order), addressed
    by row number."""

    def __init__(self, shards: Sequence[ShardInfo]) -> None:
        starts: list[int] = []
        where: list[tuple[int, int]] = []
        total = 0
        for f, shard in enumerate(shards):
            if sum(shard.batches) != shard.rows:
                raise ShardError(
                    f"{shard.path}: the manifest lists record batches of {sum(shard.batches)} "
                    f"rows for a shard of {shard.rows} (written by an older version?)"
                )
            for b, n in enumerate(shard.batches):
                if n:
                    starts.append(total)
                    where.append((f, b))
                    total += n
        self._starts = starts
        self._where = where
        self.rows = total

    def pieces(self, start: int, stop: int) -> Iterator[Piece]:
        """The record batch slices that hold rows ``[start, stop)``, in order."""
        if not 0 <= start <= stop <= self.rows:
            raise ValueError(f"rows [{start}, {stop}) outside [0, {self.rows})")
        i = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            first = self._starts[i]
            end = self._starts[i + 1] if i + 1 < len(self._starts) else self.rows
            upto = min(stop, end)
            f, b = self._where[i]
            yield Piece(f, b, start - first, upto - first)
            start = upto
            i += 1


def block_rows(rows: int, size: int) -> int:
    """Rows per dealt block for a split of ``rows`` over ``size`` ranks."""
    return max(1, min(BLOCK_ROWS, rows // (size * MIN_BLOCKS_PER_RANK)))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k % (1 << 63) for k in key])


def rank_ranges(
    rows: int,
    rank: int,
    size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    turn: int = 0,
    every_row: bool = False,
) -> list[Range]:
    """Rank ``rank``'s row ranges of epoch ``epoch``, in the order it reads them (see the module
    docstring); together ``rows // size`` rows on every rank. ``turn`` numbers the passes over
    the split within one epoch (a padded tail starts another). ``every_row``: the ``< size``
    rows of the global remainder go one each to the first ranks too (validation, k-means: every
    row read once over the ranks, not every rank the same count)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside [0, {size})")
    b = block_rows(rows, size)
    groups = rows // (b * size)
    common = _rng(seed, epoch, turn, size)  # the same draws on every rank
    if shuffle:
        rotation = common.integers(0, size, groups)
        slot = (rank + int(common.integers(0, size))) % size
        offset = int(common.integers(0, max(rows, 1)))  # block edges and the remainder move too
    else:  # in storage order: still a slice of every part of it
        rotation, slot, offset = np.zeros(groups, dtype=np.int64), rank, 0
    starts = (np.arange(groups, dtype=np.int64) * size + (rank + rotation) % size) * b
    ranges = [(int(s), int(s) + b) for s in starts]
    rest = groups * size * b
    part = (rows - rest) // size
    if part:
        ranges.append((rest + slot * part, rest + (slot + 1) * part))
    if every_row and rank < rows - rest - part * size:
        ranges.append((rest + part * size + rank, rest + part * size + rank + 1))
    if shuffle:
        order = _rng(seed, epoch, turn, size, rank + 1).permutation(len(ranges))
        ranges = [ranges[i] for i in order]
    return [piece for r in ranges for piece in _rotated(r, offset, rows)]


def _rotated(span: Range, offset: int, rows: int) -> list[Range]:
    """``span`` of the sequence started ``offset`` rows in (wrapping around), as real ranges."""
    start, stop = span[0] + offset, span[1] + offset
    if stop <= rows:
        return [(start, stop)]
    if start >= rows:
        return [(start - rows, stop - rows)]
    return [(start, rows), (0, stop - rows)]
