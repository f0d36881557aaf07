"""Sources → transform → features and label → the seeded train/validation split.

The result is a :class:`PreparedData`: the train and validation DataFrames as the shards hold them
and the :class:`~lepton_spark.spec.FeatureSpec` that describes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lepton_spark.config import PipelineConfig, SplitConfig
from lepton_spark.data.columns import check_columns
from lepton_spark.data.features import build_features
from lepton_spark.data.sources import empty_source, load_and_transform
from lepton_spark.errors import DataError
from lepton_spark.spec import FeatureSpec

__all__ = ["DataError", "PreparedData", "prepare", "split"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    train: DataFrame
    validation: DataFrame
    feature_spec: FeatureSpec
    rows: int
    features: DataFrame  # both splits' parent, cached while the shards are written
    quality: dict[str, int]  # bad values per column, rows dropped or filled (features.nulls)

    def release(self) -> None:
        """Drop the cached features (once the shards are written)."""
        self.features.unpersist()


_UNIT = 1 << 30


def split(df: DataFrame, cfg: SplitConfig) -> tuple[DataFrame, DataFrame]:
    """Seeded train/validation split by a hash of each row's values: a row goes to validation
    when ``xxhash64(seed, row) mod 2^30 / 2^30 < validation_fraction``.

    No sort and no second look at the data (``randomSplit`` sorts every partition to be
    repeatable): the same rows and seed give the same split whatever the partitioning, and
    identical rows land on the same side.
    """
    draw = F.pmod(F.xxhash64(F.lit(cfg.seed), *[F.col(c) for c in df.columns]), F.lit(_UNIT))
    held_out = draw < F.lit(int(cfg.validation_fraction * _UNIT))
    return df.where(~held_out), df.where(held_out)


def prepare(spark: SparkSession, cfg: PipelineConfig) -> PreparedData:
    """Sources → transform → features and label → train/validation split."""
    df = load_and_transform(spark, cfg)
    try:
        check_columns(df, cfg.features)  # no Spark job (build_features checks them again)
    except DataError:
        empty = empty_source(spark, cfg, df)  # the cause, when a source has no rows
        if empty is None:
            raise
        raise empty from None
    keep = (cfg.shards.key,) if cfg.shards.key else ()
    quality: dict[str, int] = {}
    features, spec, rows = build_features(df, cfg.features, keep, quality)
    # Both splits and the shard writer read these rows more than once: compute them once.
    features = features.persist(StorageLevel.MEMORY_AND_DISK)
    train, validation = split(features, cfg.split)
    log.info("prepared %d rows: %s", rows, spec.input_columns)
    return PreparedData(
        train=train,
        validation=validation,
        feature_spec=spec,
        rows=rows,
        features=features,
        quality=quality,
    )
