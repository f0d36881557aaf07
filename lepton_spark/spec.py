"""What the model sees: the feature spec that ETL produces and shards, loader and model share.

No Spark, no MLflow: ranks read this from the manifest.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Shard column names: numeric features packed into one fixed-size list column (a zero-copy
# [rows, n_numeric] float32 matrix), categorical indices likewise as int64, the label as int64.
NUMERIC_COLUMN = "numeric"
CATEGORICAL_COLUMN = "categorical"
LABEL_COLUMN = "label"

# Index 0 of every categorical column stands for null and for values not in the vocabulary.
UNKNOWN_INDEX = 0


class CategoricalFeature(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    vocabulary: list[str] = Field(description="value at index i + 1; index 0 is unknown/null")

    @property
    def cardinality(self) -> int:
        """Rows of the embedding table: the vocabulary plus the unknown index."""
        return len(self.vocabulary) + 1


class Standardization(BaseModel):
    """``(x - mean) / std`` for one numeric column, computed on Spark over the cleaned rows."""

    model_config = ConfigDict(frozen=True)

    mean: float
    std: float = Field(gt=0.0)


class FeatureSpec(BaseModel):
    """The features as the shards hold them, and how raw input becomes that.

    The preprocessing (vocabularies, standardisation, the value a missing number takes) is part of
    the spec, so the served model applies exactly what ETL applied (:mod:`lepton_spark.serving`).
    """

    model_config = ConfigDict(frozen=True)

    numeric: list[str]
    categorical: list[CategoricalFeature]
    label: str
    num_classes: int = Field(ge=2)
    standardize: dict[str, Standardization] = Field(
        default_factory=dict, description="numeric columns standardised in ETL"
    )
    fill_value: float = Field(
        0.0, description="what a null/NaN/inf numeric value becomes (before standardisation)"
    )

    @property
    def categorical_names(self) -> list[str]:
        return [c.name for c in self.categorical]

    @property
    def input_columns(self) -> list[str]:
        """Model input columns, in the order the exported model expects them."""
        return [*self.numeric, *self.categorical_names]
