"""Raw input columns → the model's input arrays, exactly as ETL prepared them on Spark (and back).

What ETL does on Spark is done here with Arrow compute, the same way:

- a categorical value is matched as Spark casts it to a string (``3`` → ``"3"``, ``True`` →
  ``"true"``); a value not in the vocabulary, or null, is the "unknown" index 0;
- a number is standardised with the training statistics (when ``features.standardize`` was on);
- a row training would have refused (a null, NaN or infinite number; an array that is null, holds
  such a value or has the wrong length) is *invalid*: :meth:`Preprocessor.prepare` says which rows
  and columns, and fills its numbers with the spec's ``fill_value`` (then standardised, as ETL
  does under ``features.nulls: fill``), its arrays with zeros; the scorer decides what becomes of
  it (``handleInvalid``: error, skip, keep, fill);
- text is lower-cased and split on anything but letters and digits, words become token ids.

:func:`decode` goes the other way (shard rows as raw input columns), for checks and notebooks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from lepton_spark.shards.loader import read_split
from lepton_spark.shards.manifest import read_manifest
from lepton_spark.spec import (
    FIRST_WORD,
    PAD_TOKEN,
    TOKEN_SPLIT,
    UNKNOWN_INDEX,
    UNKNOWN_TOKEN,
    FeatureSpec,
)

Columnar = pa.Table | pa.RecordBatch


@dataclass(frozen=True)
class Prepared:
    """The model's input arrays for every row, and which rows are invalid and why.

    ``bad`` maps a column to its invalid rows (a bool per row), only for columns that have some;
    ``numeric_only`` is true for rows whose only invalid values are numbers (what ``nulls: fill``
    fills). Invalid rows hold placeholders (filled numbers, zero arrays)."""

    inputs: dict[str, np.ndarray]
    rows: int
    bad: dict[str, np.ndarray]

    @property
    def invalid(self) -> np.ndarray:
        """A bool per row: any invalid value."""
        out = np.zeros(self.rows, dtype=bool)
        for mask in self.bad.values():
            out |= mask
        return out

    def counts(self) -> dict[str, int]:
        """Invalid rows per column."""
        return {c: int(m.sum()) for c, m in self.bad.items()}


class Preprocessor:
    """Raw columns → the model's input arrays (:mod:`lepton_spark.spec`), as ETL prepares them."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._vocabularies = [pa.array(c.vocabulary, pa.string()) for c in spec.categorical]
        self._word_ids = [
            {w: i + FIRST_WORD for i, w in enumerate(t.vocabulary)} for t in spec.texts
        ]
        for t in spec.texts:  # a Hugging Face tokenizer, in memory now (its folder may go)
            if t.tokenizer:
                from lepton_spark import hf

                hf.load_tokenizer(t.tokenizer)

    def missing_columns(self, columns: list[str]) -> list[str]:
        return [c for c in self.spec.input_columns if c not in columns]

    def __call__(self, data: Columnar) -> dict[str, np.ndarray]:
        """The model's inputs, numbers that training would have refused filled with the spec's
        ``fill_value``; a ``ValueError`` for an array it would have refused."""
        prepared = self.prepare(data)
        arrays = {a.name for a in self.spec.arrays}
        for name, mask in prepared.bad.items():
            if name in arrays:
                raise ValueError(
                    f"array column {name!r} has {int(mask.sum())} rows that are null, hold a "
                    f"null, NaN or infinite value, or do not have the model's "
                    f"{_length(self.spec, name)} values"
                )
        return prepared.inputs

    def prepare(self, data: Columnar) -> Prepared:
        """Every row's inputs and which rows training would have refused (see :class:`Prepared`)."""
        spec = self.spec
        missing = self.missing_columns(data.schema.names)
        if missing:
            raise ValueError(
                f"input lacks the model's columns {missing} (it has {data.schema.names}); "
                f"the model reads {spec.input_columns}"
            )
        rows = data.num_rows
        bad: dict[str, np.ndarray] = {}
        numeric = np.empty((rows, len(spec.numeric)), dtype=np.float32)
        for i, name in enumerate(spec.numeric):
            values = np.asarray(
                pc.cast(data.column(name), pa.float64()).to_numpy(zero_copy_only=False),
                dtype=np.float64,
            ).copy()
            broken = ~np.isfinite(values)
            if broken.any():
                bad[name] = broken
                values[broken] = spec.fill_value
            scale = spec.standardize.get(name)
            if scale is not None:
                values = (values - scale.mean) / scale.std
            numeric[:, i] = values
        categorical = np.empty((rows, len(spec.categorical)), dtype=np.int64)
        for i, (feature, vocabulary) in enumerate(
            zip(spec.categorical, self._vocabularies, strict=True)
        ):
            column = data.column(feature.name)
            if column.type != pa.string():
                column = pc.cast(column, pa.string())
            index = pc.index_in(column, value_set=vocabulary)  # null: not in the vocabulary
            categorical[:, i] = (
                pc.fill_null(index, UNKNOWN_INDEX - 1).to_numpy(zero_copy_only=False) + 1
            )
        out = {"numeric": numeric, "categorical": categorical}
        for a in spec.arrays:
            values, broken = _fixed_array(data.column(a.name), a.length)
            if broken.any():
                bad[a.name] = broken
            out[a.name] = values.reshape(rows, *a.shape)
        for t, ids in zip(spec.texts, self._word_ids, strict=True):
            texts = data.column(t.name).to_pylist()
            if t.tokenizer:  # a Hugging Face tokenizer's ids, as the executors made them
                from lepton_spark import hf

                out[t.name] = hf.encode(t.tokenizer, texts, t.max_length)
            else:
                out[t.name] = token_ids(texts, ids, t.max_length)
        return Prepared(out, rows, bad)


def _length(spec: FeatureSpec, name: str) -> int:
    return next(a.length for a in spec.arrays if a.name == name)


def _fixed_array(column: Any, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``[rows, length]`` float32 values, and a bool per row that is null, holds a null, NaN or
    infinite value, or has another length (its values are zeros)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    rows = len(column)
    lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
    # flatten() skips null rows and respects slicing; nulls inside a row become NaN.
    flat = np.asarray(
        pc.cast(column.flatten(), pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64
    )
    if rows and (lengths == length).all() and np.isfinite(flat).all():
        return flat.astype(np.float32).reshape(rows, length), np.zeros(rows, dtype=bool)
    starts = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]]).astype(np.int64)
    broken = lengths != length
    out = np.zeros((rows, length), dtype=np.float32)
    good = np.flatnonzero(~broken)
    if len(good):
        values = flat[starts[good, None] + np.arange(length)]
        finite = np.isfinite(values).all(axis=1)
        broken[good[~finite]] = True
        out[good[finite]] = values[finite]
    return out, broken


def tokens(text: str | None) -> list[str]:
    """Lower case, split on anything but letters and digits: what ETL does on Spark."""
    return [t for t in re.split(TOKEN_SPLIT, (text or "").lower()) if t]


def token_ids(texts: list[str | None], ids: dict[str, int], length: int) -> np.ndarray:
    out = np.full((len(texts), length), PAD_TOKEN, dtype=np.int64)
    for row, text in enumerate(texts):
        words = tokens(text)[:length]
        out[row, : len(words)] = [ids.get(w, UNKNOWN_TOKEN) for w in words]
    return out


def decode(
    spec: FeatureSpec,
    numeric: np.ndarray,
    categorical: np.ndarray,
    extras: tuple[np.ndarray, ...] = (),
) -> pd.DataFrame:
    """Preprocessed features back to raw columns (vocabulary values, unstandardised numbers,
    arrays as lists, token ids as words): shard rows as the model's raw input, for checks and
    notebooks. Categorical index 0 becomes ``None``; an unknown word is left out of the text."""
    frame: dict[str, Any] = {}
    for i, name in enumerate(spec.numeric):
        scale = spec.standardize.get(name)
        values = numeric[:, i].astype(np.float64)
        frame[name] = values * scale.std + scale.mean if scale else values
    for i, feature in enumerate(spec.categorical):
        lookup = np.array([None, *feature.vocabulary], dtype=object)
        frame[feature.name] = lookup[categorical[:, i]]
    rest = iter(extras)
    for a in spec.arrays:
        frame[a.name] = list(next(rest).astype(np.float64))
    for t in spec.texts:
        if t.tokenizer:
            from lepton_spark import hf

            frame[t.name] = hf.decode(t.tokenizer, next(rest))
            continue
        words = np.array(["", "", *t.vocabulary], dtype=object)
        frame[t.name] = [" ".join(w for w in words[row] if w) for row in next(rest)]
    return pd.DataFrame(frame)


def shard_rows(folder: str, split: str = "validation") -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """A split's shards as (raw input frame, labels) per record batch."""
    manifest = read_manifest(folder)
    for batch in read_split(folder, manifest, split):
        raw = decode(
            manifest.feature_spec,
            batch.numeric.numpy(),
            batch.categorical.numpy(),
            tuple(t.numpy() for t in batch.extras),
        )
        yield raw, batch.label.numpy()
