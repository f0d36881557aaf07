"""Synthetic data sets for the pipeline templates, chosen by ``GeneratedSource.kind``.

Every table made on Spark is a pure function of ``seed`` and the row id (hashed uniforms, never
``rand``), so the same config gives the same table whatever the partitioning.

``tabular_classification`` (the demo): eight numeric columns ``x0..x7`` (standard normal; ``x6``
and ``x7`` are noise), two categorical string columns ``cat_a`` (12 levels) and ``cat_b``
(6 levels), and a binary ``label``::

    score = 1.5 sin(1.5 x0) + x1 x2 + 0.8 (x3² - 1) - 0.6 x4 + w_a[cat_a] + w_b[cat_b] x5
    label = [score > 0], flipped with probability ``label_noise``

The clean label is a deterministic function of the features, so the Bayes accuracy (the best any
model can do) is exactly ``1 - label_noise``.

``tabular_regression``: the same columns ``id, x0..x7, cat_a, cat_b``, and a double ``label``
``= score + target_noise · N(0, 1)``; the best possible mean squared error is ``target_noise²``
(:func:`best_mse`).

``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, no download): ``id``,
``pixels`` (64 doubles in [0, 1]: the 0..16 intensities divided by 16, row by row) and ``label``
(0..9). ``rows`` is ignored; ``partitions`` is honoured.

``topics``: a text classification corpus: ``id``, ``text`` (words separated by single spaces) and
``label`` (0..topics-1). The vocabulary has ``vocabulary`` pronounceable made-up words
(:func:`topic_vocabulary`): the first half is split evenly between the topics, each owning a
disjoint slice, and the rest are common words. A document of topic t has a length uniform in
[min_words, max_words]; each of its words is, with probability 0.35, a uniform pick among topic
t's words and otherwise a uniform pick among the common words. A bag-of-words model classifies it
well, but any single word is most likely uninformative, and a short document may hold no word of
its topic at all. The label is replaced with probability ``label_noise`` by a topic drawn
uniformly (possibly the same one). The Bayes accuracy is not known in closed form.

``blobs``: data for k-means: ``clusters`` Gaussian clusters in ``dims`` dimensions. The centers
are drawn once from ``seed`` (``numpy.random.default_rng(seed).uniform(-10, 10, (clusters,
dims))``, :func:`blob_centers`); each row picks a cluster uniformly, and its features
``f0..f{dims-1}`` are the center plus ``cluster_std`` times independent standard normals.
``label`` is the cluster index (for checks; k-means does not use it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lepton_spark.config import GeneratedSource
from lepton_spark.sparkinfo import default_parallelism

CAT_A_WEIGHTS = [-1.6, -1.2, -0.9, -0.6, -0.3, -0.1, 0.1, 0.3, 0.6, 0.9, 1.2, 1.6]
CAT_B_WEIGHTS = [-1.5, -0.8, -0.2, 0.2, 0.8, 1.5]
NUMERIC = [f"x{i}" for i in range(8)]
CATEGORICAL = ["cat_a", "cat_b"]

DIGITS_ROWS = 1797
DIGITS_PIXELS = 64
TOPIC_WORD_SHARE = 0.35
"""topics: probability that a word of a document is a word of its topic (else a common word)."""

# topics: words are syllables (consonant + vowel) spelling a scrambled word index in base 70.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
_WORD_SCRAMBLE = 7919  # a prime: coprime with 70**n, so index -> word is one-to-one

# Salts of the hashed uniforms, one per use, so no two columns share random bits.
# _normal(seed, s) uses the uniform salts 2s and 2s+1.
_SALT_CAT_A, _SALT_CAT_B, _SALT_FLIP = 100, 101, 200
_NORMAL_SALT_TARGET = 120  # uniforms 240, 241
_SALT_TOPIC, _SALT_LENGTH, _SALT_TOPIC_FLIP, _SALT_TOPIC_NOISY = 300, 301, 302, 303
_SALT_IS_TOPIC_WORD, _SALT_TOPIC_WORD, _SALT_COMMON_WORD = 310, 311, 312
_SALT_CLUSTER = 400
_NORMAL_SALT_BLOB = 1000  # + dimension: uniforms 2000..2511


def bayes_accuracy(source: GeneratedSource) -> float | None:
    """The best accuracy any classifier can reach on this table, where it is known exactly.

    ``tabular_classification``: ``1 - label_noise``. ``None`` for every other kind: regression
    and k-means data have no accuracy, and for ``digits`` and ``topics`` it is not known exactly
    (a ``topics`` document may hold no word of its topic, so even a perfect model misses some).
    """
    if source.kind == "tabular_classification":
        return 1.0 - source.label_noise
    return None


def best_mse(source: GeneratedSource) -> float | None:
    """The best mean squared error any model can reach on a ``tabular_regression`` table.

    The noise variance ``target_noise²``: the target is a deterministic function of the features
    plus independent Gaussian noise. ``None`` for the other kinds.
    """
    if source.kind == "tabular_regression":
        return source.target_noise**2
    return None


def blob_centers(source: GeneratedSource) -> np.ndarray:
    """The ``blobs`` cluster centers, shape ``(clusters, dims)``, drawn from ``seed`` alone."""
    return np.random.default_rng(source.seed).uniform(-10, 10, (source.clusters, source.dims))


def topic_vocabulary(source: GeneratedSource) -> tuple[list[list[str]], list[str]]:
    """The ``topics`` words: each topic's own words (disjoint lists), and the common words."""
    per_topic, _ = _topic_slices(source)
    words = [_word_str(k, source.vocabulary) for k in range(source.vocabulary)]
    own = [words[t * per_topic : (t + 1) * per_topic] for t in range(source.topics)]
    return own, words[source.topics * per_topic :]


def generate(spark: SparkSession, source: GeneratedSource) -> DataFrame:
    """The table of ``source.kind`` described in the module docstring.

    ``source.rows`` rows, except ``digits`` (always 1,797), in ``source.partitions`` partitions.
    """
    partitions = source.partitions or max(default_parallelism(spark), 2)
    if source.kind == "digits":
        return _digits(spark, partitions)
    df = spark.range(0, source.rows, numPartitions=partitions)
    if source.kind == "tabular_classification":
        return _tabular_classification(df, source)
    if source.kind == "tabular_regression":
        return _tabular_regression(df, source)
    if source.kind == "topics":
        return _topics(df, source)
    if source.kind == "blobs":
        return _blobs(df, source)
    raise ValueError(f"unknown generated source kind {source.kind!r}")


def score() -> Column:
    """The noiseless score of the tabular tables, over their columns ``x0..x5, cat_a, cat_b``."""
    x = {n: F.col(n) for n in NUMERIC}
    a_idx = F.substring("cat_a", 2, 8).cast("int")  # "a07" -> 7
    b_idx = F.substring("cat_b", 2, 8).cast("int")  # "b3" -> 3
    return (
        1.5 * F.sin(1.5 * x["x0"])
        + x["x1"] * x["x2"]
        + 0.8 * (x["x3"] * x["x3"] - 1.0)
        - 0.6 * x["x4"]
        + _pick(a_idx, CAT_A_WEIGHTS)
        + _pick(b_idx, CAT_B_WEIGHTS) * x["x5"]
    )


def _uniform(seed: int, salt: int, *extra: Column) -> Column:
    """A uniform [0, 1) value from (seed, salt, id, *extra) only: independent of partitioning."""
    bits = F.xxhash64(F.lit(seed), F.lit(salt), F.col("id"), *extra)
    return (F.abs(bits % (1 << 52))).cast("double") / float(1 << 52)


def _normal(seed: int, salt: int) -> Column:
    """Box–Muller from two hashed uniforms."""
    u1 = F.greatest(_uniform(seed, 2 * salt), F.lit(1e-12))
    u2 = _uniform(seed, 2 * salt + 1)
    return F.sqrt(-2.0 * F.log(u1)) * F.cos(2.0 * 3.141592653589793 * u2)


def _pick(index: Column, values: Sequence[float | str]) -> Column:
    """``values[index]`` (0-based) as a column."""
    return F.element_at(F.array(*[F.lit(v) for v in values]), index + 1)


def _randint(u: Column, n: int | Column) -> Column:
    """An int uniform in [0, n) from a uniform [0, 1) column."""
    return F.floor(u * n).cast("int")


def _tabular_features(df: DataFrame, seed: int) -> DataFrame:
    """``id, x0..x7, cat_a, cat_b`` on top of ``spark.range``'s ``id``."""
    for i, name in enumerate(NUMERIC):
        df = df.withColumn(name, _normal(seed, i))
    a_idx = _randint(_uniform(seed, _SALT_CAT_A), len(CAT_A_WEIGHTS))
    b_idx = _randint(_uniform(seed, _SALT_CAT_B), len(CAT_B_WEIGHTS))
    return df.withColumn("cat_a", F.format_string("a%02d", a_idx)).withColumn(
        "cat_b", F.format_string("b%d", b_idx)
    )


def _tabular_classification(df: DataFrame, source: GeneratedSource) -> DataFrame:
    df = _tabular_features(df, source.seed)
    clean = (score() > 0).cast("int")
    flip = (_uniform(source.seed, _SALT_FLIP) < source.label_noise).cast("int")
    df = df.withColumn("label", F.abs(clean - flip))
    return df.select("id", *NUMERIC, *CATEGORICAL, "label")


def _tabular_regression(df: DataFrame, source: GeneratedSource) -> DataFrame:
    df = _tabular_features(df, source.seed)
    noise = F.lit(float(source.target_noise)) * _normal(source.seed, _NORMAL_SALT_TARGET)
    df = df.withColumn("label", (score() + noise).cast("double"))
    return df.select("id", *NUMERIC, *CATEGORICAL, "label")


def _digits(spark: SparkSession, partitions: int) -> DataFrame:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (np.asarray(digits.data, dtype=np.float64) / 16.0).tolist()
    labels = np.asarray(digits.target).tolist()
    schema = T.StructType(
        [
            T.StructField("id", T.LongType(), False),
            T.StructField("pixels", T.ArrayType(T.DoubleType(), False), False),
            T.StructField("label", T.IntegerType(), False),
        ]
    )
    rows = [(i, p, int(y)) for i, (p, y) in enumerate(zip(pixels, labels, strict=True))]
    return spark.createDataFrame(rows, schema).repartitionByRange(partitions, "id")


def _topic_slices(source: GeneratedSource) -> tuple[int, int]:
    """(words per topic, common words): topics share the first half of the vocabulary."""
    per_topic = (source.vocabulary // 2) // source.topics
    return per_topic, source.vocabulary - source.topics * per_topic


def _syllable_count(vocabulary: int) -> int:
    """Syllables per word: enough for ``vocabulary`` distinct words, at least two."""
    return max(2, math.ceil(math.log(vocabulary) / math.log(len(_SYLLABLES))))


def _word_str(index: int, vocabulary: int) -> str:
    """Word ``index`` of the ``topics`` vocabulary (the Python twin of :func:`_word`)."""
    base = len(_SYLLABLES)
    n = _syllable_count(vocabulary)
    code = index * _WORD_SCRAMBLE % base**n
    return "".join(_SYLLABLES[code // base**s % base] for s in range(n))


def _word(index: Column, vocabulary: int) -> Column:
    """Word ``index`` of the ``topics`` vocabulary, as a Spark expression."""
    base = len(_SYLLABLES)
    n = _syllable_count(vocabulary)
    code = (index.cast("long") * _WORD_SCRAMBLE) % (base**n)
    parts = [_pick((F.floor(code / (base**s)) % base).cast("int"), _SYLLABLES) for s in range(n)]
    return F.concat(*parts)


def _topics(df: DataFrame, source: GeneratedSource) -> DataFrame:
    seed, topics = source.seed, source.topics
    per_topic, common = _topic_slices(source)
    topic = _randint(_uniform(seed, _SALT_TOPIC), topics)
    length = source.min_words + _randint(
        _uniform(seed, _SALT_LENGTH), source.max_words - source.min_words + 1
    )
    df = df.withColumn("_topic", topic).withColumn("_length", length)

    def word(i: Column) -> Column:
        own = F.col("_topic") * per_topic + _randint(_uniform(seed, _SALT_TOPIC_WORD, i), per_topic)
        shared = topics * per_topic + _randint(_uniform(seed, _SALT_COMMON_WORD, i), common)
        is_own = _uniform(seed, _SALT_IS_TOPIC_WORD, i) < TOPIC_WORD_SHARE
        return _word(F.when(is_own, own).otherwise(shared), source.vocabulary)

    words = F.transform(F.sequence(F.lit(0), F.col("_length") - 1), word)
    flip = _uniform(seed, _SALT_TOPIC_FLIP) < source.label_noise
    noisy = _randint(_uniform(seed, _SALT_TOPIC_NOISY), topics)
    return df.select(
        "id",
        F.array_join(words, " ").alias("text"),
        F.when(flip, noisy).otherwise(F.col("_topic")).cast("int").alias("label"),
    )


def _blobs(df: DataFrame, source: GeneratedSource) -> DataFrame:
    centers = blob_centers(source)
    cluster = F.col("_cluster")
    df = df.withColumn("_cluster", _randint(_uniform(source.seed, _SALT_CLUSTER), source.clusters))
    features = [
        (
            _pick(cluster, [float(c) for c in centers[:, d]])
            + F.lit(float(source.cluster_std)) * _normal(source.seed, _NORMAL_SALT_BLOB + d)
        ).alias(f"f{d}")
        for d in range(source.dims)
    ]
    return df.select("id", *features, cluster.alias("label"))
