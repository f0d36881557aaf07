"""Text on Spark: lower case, split on anything but letters and digits, a vocabulary, token ids;
or a Hugging Face fast tokenizer's ids (:func:`hf_token_ids`), on the executors.

The served model tokenises raw strings the same way (:mod:`lepton_spark.serving.preprocess`).
"""

from __future__ import annotations

import pandas as pd  # at the top: pandas_udf reads the function's type hints by name
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, LongType

from lepton_spark.spec import FIRST_WORD, PAD_TOKEN, TOKEN_SPLIT, UNKNOWN_TOKEN, TextFeature


def tokens(text: Column) -> Column:
    """Lower case, split on anything but letters and digits (as the served model does)."""
    return F.filter(F.split(F.lower(F.coalesce(text, F.lit(""))), TOKEN_SPLIT), lambda t: t != "")


def words(df: DataFrame, column: str, limit: int, min_count: int) -> list[str]:
    """The text column's most frequent words (ties by word), seen at least ``min_count`` times."""
    rows = (
        df.select(F.explode(tokens(F.col(column))).alias("w"))
        .groupBy("w")
        .count()
        .where(F.col("count") >= min_count)
        .orderBy(F.desc("count"), F.asc("w"))
        .limit(limit)
        .collect()
    )
    return [r["w"] for r in rows]


def token_ids(text: Column, feature: TextFeature) -> Column:
    """Token ids, padded with 0 or cut to ``max_length``; unknown words are 1."""
    ids = {w: i + FIRST_WORD for i, w in enumerate(feature.vocabulary)}
    lookup = F.create_map(*[F.lit(x) for pair in ids.items() for x in pair]) if ids else None
    cut = F.slice(tokens(text), 1, feature.max_length)
    if lookup is None:
        mapped = F.transform(cut, lambda _: F.lit(UNKNOWN_TOKEN).cast("long"))
    else:
        mapped = F.transform(
            cut,
            lambda t: F.coalesce(F.try_element_at(lookup, t), F.lit(UNKNOWN_TOKEN)).cast("long"),
        )
    padding = F.array_repeat(F.lit(PAD_TOKEN).cast("long"), feature.max_length - F.size(mapped))
    return F.concat(mapped, padding)


def hf_token_ids(text: Column, feature: TextFeature) -> Column:
    """The Hugging Face tokenizer's ids, ``max_length`` of them (its special tokens, cut, padded
    with its pad id), computed on the executors in Arrow batches; the tokenizer is loaded once
    per Python worker (:func:`lepton_spark.hf.load_tokenizer`)."""
    where, length = feature.tokenizer, feature.max_length
    assert where is not None

    def ids(texts: pd.Series) -> pd.Series:
        from lepton_spark import hf

        encoded = hf.encode(where, texts.where(texts.notna(), None).tolist(), length)
        return pd.Series(list(encoded))

    return F.pandas_udf(ids, ArrayType(LongType()))(text)
