"""What the model sees: the feature spec that ETL produces and shards, loader and model share.

No Spark, no MLflow: ranks read this from the manifest.

A model gets one dict of tensors per batch (:meth:`lepton_spark.shards.loader.Layout.inputs`):
``"numeric"`` ``[rows, n_numeric]`` float32, ``"categorical"`` ``[rows, n_categorical]`` int64
(vocabulary indices), and one entry per array feature (``[rows, *shape]`` float32) and per text
feature (``[rows, max_length]`` int64 token ids), under the feature's name.
"""

from __future__ import annotations

from math import prod
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Shard column names: numeric features packed into one fixed-size list column (a zero-copy
# [rows, n_numeric] float32 matrix), categorical indices likewise as int64, the label as int64
# (classes) or float32 (regression targets), an optional float32 sample weight, and one
# fixed-size list column per array ("a:<name>", float32) and text feature ("t:<name>", int64).
NUMERIC_COLUMN = "numeric"
CATEGORICAL_COLUMN = "categorical"
LABEL_COLUMN = "label"
WEIGHT_COLUMN = "weight"
ARRAY_PREFIX = "a:"
TEXT_PREFIX = "t:"

# Index 0 of every categorical column stands for null and for values not in the vocabulary.
UNKNOWN_INDEX = 0
# Token ids: 0 pads a short text, 1 is a word not in the vocabulary, vocabulary[i] is i + 2.
PAD_TOKEN = 0
UNKNOWN_TOKEN = 1
FIRST_WORD = 2
# Text is lower-cased and split on anything but letters and digits, on Spark and when serving.
TOKEN_SPLIT = "[^a-z0-9]+"

Task = Literal["classification", "regression", "clustering"]
# What training did with a row whose numbers or arrays were null, NaN or infinite
# (``features.nulls``).
Nulls = Literal["fail", "drop", "fill"]
# What scoring does with such a row (Spark ML's ``handleInvalid``): fail naming the column, leave
# the row out, keep it with a null prediction, or fill its numbers as training filled them (only
# for a model trained with ``nulls: fill``).
InvalidPolicy = Literal["error", "skip", "keep", "fill"]
INVALID_POLICIES: tuple[InvalidPolicy, ...] = ("error", "skip", "keep", "fill")


def default_invalid_policy(nulls: Nulls | None) -> InvalidPolicy:
    """What scoring does with invalid rows unless told: what training did. A model trained with
    ``nulls: drop`` or ``fail`` never saw such a row, so it predicts nothing for one (``keep``: no
    row lost, none made up); one trained with ``nulls: fill`` fills it as training did. A model
    logged before 0.3 (``nulls`` unknown) filled, and still does."""
    return "keep" if nulls in ("drop", "fail") else "fill"


class CategoricalFeature(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    vocabulary: list[str] = Field(description="value at index i + 1; index 0 is unknown/null")

    @property
    def cardinality(self) -> int:
        """Rows of the embedding table: the vocabulary plus the unknown index."""
        return len(self.vocabulary) + 1


class ArrayFeature(BaseModel):
    """A fixed-length numeric array column (pixels, an embedding, a Spark ML vector)."""

    model_config = ConfigDict(frozen=True)

    name: str
    shape: list[int] = Field(description="per-row shape the model sees, e.g. [1, 8, 8]")

    @property
    def length(self) -> int:
        return prod(self.shape)

    @property
    def column(self) -> str:
        return ARRAY_PREFIX + self.name


class TextFeature(BaseModel):
    """A text column as token ids: vocabulary built on Spark, padded/truncated to max_length; or
    (``tokenizer``) a Hugging Face fast tokenizer's ids, padded with its ``pad_id``."""

    model_config = ConfigDict(frozen=True)

    name: str
    vocabulary: list[str] = Field(description="the word of token id i + 2 (0: padding, 1: unknown)")
    max_length: int = Field(gt=0)
    # A Hugging Face tokenizer (lepton_spark.hf): where it was at training (a served model
    # carries its own copy), its vocabulary size and pad id. None: our words and vocabulary.
    tokenizer: str | None = None
    vocab_size: int | None = None
    pad_id: int = PAD_TOKEN

    @property
    def column(self) -> str:
        return TEXT_PREFIX + self.name

    @property
    def tokens(self) -> int:
        """Rows of the token embedding: the vocabulary plus padding and unknown (a tokenizer's:
        its vocabulary size)."""
        if self.vocab_size is not None:
            return self.vocab_size
        return len(self.vocabulary) + FIRST_WORD


class Standardization(BaseModel):
    """``(x - mean) / std`` for one numeric column, computed on Spark over the cleaned rows."""

    model_config = ConfigDict(frozen=True)

    mean: float
    std: float = Field(gt=0.0)


class FeatureSpec(BaseModel):
    """The features as the shards hold them, and how raw input becomes that.

    The preprocessing (vocabularies, standardisation, the value a missing number takes) is part of
    the spec, so the served model applies exactly what ETL applied
    (:mod:`lepton_spark.serving.preprocess`).
    """

    model_config = ConfigDict(frozen=True)

    numeric: list[str]
    categorical: list[CategoricalFeature]
    label: str | None = Field(description="None only for clustering")
    num_classes: int | None = Field(None, ge=2, description="classification only")
    task: Task = "classification"
    arrays: list[ArrayFeature] = Field(default_factory=list)
    texts: list[TextFeature] = Field(default_factory=list)
    weight: str | None = Field(None, description="sample weight column (training loss only)")
    standardize: dict[str, Standardization] = Field(
        default_factory=dict, description="numeric columns standardised in ETL"
    )
    fill_value: float = Field(
        0.0,
        description="what a null/NaN/inf numeric value becomes (before standardisation) under "
        "nulls: fill, in training and in scoring",
    )
    nulls: Nulls | None = Field(
        None, description="features.nulls in training; None: a model logged before 0.3"
    )
    handle_invalid: InvalidPolicy | None = Field(
        None,
        description="what scoring does with a row training would have refused, unless told "
        "otherwise; None: a model logged before 0.3 (it fills)",
    )

    @model_validator(mode="after")
    def _task_fields(self) -> FeatureSpec:
        if self.task == "classification" and self.num_classes is None:
            raise ValueError("a classification spec needs num_classes")
        if self.task != "classification" and self.num_classes is not None:
            raise ValueError(f"num_classes is for classification, not {self.task}")
        if self.task != "clustering" and self.label is None:
            raise ValueError(f"{self.task} needs a label")
        return self

    @property
    def invalid_policy(self) -> InvalidPolicy:
        """What scoring does with invalid rows unless told otherwise."""
        return self.handle_invalid or default_invalid_policy(self.nulls)

    def check_invalid_policy(self, policy: str) -> InvalidPolicy:
        """``policy`` if this model can score by it; a ``ValueError`` naming why not."""
        if policy not in INVALID_POLICIES:
            raise ValueError(
                f"handleInvalid={policy!r}: one of {', '.join(INVALID_POLICIES[:3])} (or 'fill', "
                "for a model trained with features.nulls: fill)"
            )
        if policy == "fill" and self.nulls in ("drop", "fail"):
            raise ValueError(
                f"handleInvalid='fill': this model was trained with features.nulls: {self.nulls} "
                "and never saw a filled value; use keep, skip or error"
            )
        return policy  # type: ignore[return-value]

    @property
    def categorical_names(self) -> list[str]:
        return [c.name for c in self.categorical]

    @property
    def input_columns(self) -> list[str]:
        """The model's raw input columns: numeric, categorical, array, text."""
        return [
            *self.numeric,
            *self.categorical_names,
            *(a.name for a in self.arrays),
            *(t.name for t in self.texts),
        ]

    @property
    def output_size(self) -> int:
        """Outputs a built-in supervised model has: one per class, or one for regression."""
        return self.num_classes if self.num_classes is not None else 1
