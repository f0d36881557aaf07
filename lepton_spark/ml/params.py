"""The estimator's Params, derived from the pipeline config's schema: one name, one validation.

Every field a pipeline file can set for the features, the split, the shards, the training, the
model and the tracking is a ``pyspark.ml`` Param of :class:`~lepton_spark.ml.TorchEstimator`,
under the field's own name (``lr``, ``epochs``, ``numeric``, ``registered_model``...; the few
names two sections share are prefixed: ``split_seed``, ``shard_seed``, ``shards_root``,
``shard_strategy``, ``shard_key``, ``shard_compression``, ``model_options``; ``model`` is
``model.name``). Each Param's doc is the field's description, and its type converter is the
field's own pydantic validation, so a bad value fails when it is set, naming the param. The
label, weight and a vector features column are Spark ML's ``labelCol``, ``weightCol`` and
``featuresCol``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pyspark.ml.param import Param, Params

from lepton_spark.config.schema import (
    FeatureSpecConfig,
    ModelConfig,
    ShardConfig,
    SparkConfig,
    SplitConfig,
    TrackingConfig,
    TrainConfig,
)

_SECTIONS: dict[str, type[BaseModel]] = {
    "features": FeatureSpecConfig,
    "split": SplitConfig,
    "shards": ShardConfig,
    "train": TrainConfig,
    "model": ModelConfig,
    "tracking": TrackingConfig,
    "spark": SparkConfig,
}
# Config fields a Spark ML user sets otherwise (labelCol, weightCol), or that belong to the
# session the DataFrame already has.
_LEFT_OUT = {
    ("features", "label"),
    ("features", "weight"),
    ("spark", "master"),
    ("spark", "app_name"),
    ("spark", "log_level"),
    ("spark", "conf"),
    ("spark", "remote"),
}
_RENAMED = {
    ("split", "seed"): "split_seed",
    ("shards", "seed"): "shard_seed",
    ("shards", "root"): "shards_root",
    ("shards", "strategy"): "shard_strategy",
    ("shards", "key"): "shard_key",
    ("shards", "keep"): "keep_shards",
    ("shards", "compression"): "shard_compression",
    ("model", "name"): "model",
    ("model", "options"): "model_options",
}

# Lists of sections whose items may be given by name alone (arrays=["pixels"], text=["doc"]).
_NAMED_ITEMS = {("features", "arrays"), ("features", "text")}


def _fields() -> dict[str, tuple[str, str]]:
    fields: dict[str, tuple[str, str]] = {}
    for section, model in _SECTIONS.items():
        for name in model.model_fields:
            if (section, name) in _LEFT_OUT:
                continue
            param = _RENAMED.get((section, name), name)
            if param in fields:  # two sections' fields under one Param: rename one above
                raise RuntimeError(
                    f"Param {param!r} would be {fields[param]} and {(section, name)}"
                )
            fields[param] = (section, name)
    return fields


# Param name → (config section, field), for every field the estimator takes.
FIELDS: dict[str, tuple[str, str]] = _fields()


def _converter(param: str, section: str, name: str) -> Any:
    """The field's pydantic validation as a pyspark type converter (TypeError names the param's
    problem; pyspark adds the param's name)."""
    field = _SECTIONS[section].model_fields[name]
    adapter: TypeAdapter[Any] = TypeAdapter(Annotated[field.annotation, field])

    def convert(value: Any) -> Any:
        if (section, name) in _NAMED_ITEMS and isinstance(value, list | tuple):
            value = [{"name": v} if isinstance(v, str) else v for v in value]  # text=["doc"]
        try:
            return adapter.dump_python(adapter.validate_python(value), mode="json")
        except ValidationError as err:
            problems = "; ".join(e["msg"] for e in err.errors())
            raise TypeError(
                f"{param}={value!r}: {problems} (config field {section}.{name})"
            ) from None

    return convert


def _default(section: str, name: str) -> Any:
    field = _SECTIONS[section].model_fields[name]
    return field.get_default(call_default_factory=True)


class ConfigParams(Params):
    """Mixin: one Param per config field in :data:`FIELDS`, defaults as in the config."""

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(**{p: _default(*FIELDS[p]) for p in FIELDS})

    def config_sections(self) -> dict[str, dict[str, Any]]:
        """The params as config sections (``{"train": {"lr": ...}, ...}``), set or default."""
        sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        for param, (section, name) in FIELDS.items():
            value = self.getOrDefault(getattr(self, param))
            sections[section][name] = _plain(value)
        return sections


def _plain(value: Any) -> Any:
    """Config sections inside a param's value as plain dicts (for the pipeline config)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def param_of(section: str, name: str) -> str | None:
    """The Param name of a config field (``None``: the estimator does not take it)."""
    for param, place in FIELDS.items():
        if place == (section, name):
            return param
    return None


for _param, (_section, _name) in FIELDS.items():
    _field = _SECTIONS[_section].model_fields[_name]
    setattr(
        ConfigParams,
        _param,
        Param(
            Params._dummy(),
            _param,
            " ".join((_field.description or "").split()) + f" (config: {_section}.{_name})",
            typeConverter=_converter(_param, _section, _name),
        ),
    )
