"""The pipeline file: its schema (:mod:`.schema`) and how it is read (:mod:`.loading`).

Everything a pipeline YAML can say is one frozen, validated :class:`PipelineConfig`; every step
takes the section it needs. ``docs/config-reference.md`` lists every field.
"""

from lepton_spark.config.loading import load_config, parse_override, validate
from lepton_spark.config.schema import (
    ArrayConfig,
    BaselineConfig,
    CompressConfig,
    FeatureSpecConfig,
    GeneratedSource,
    ModelConfig,
    PipelineConfig,
    ShardConfig,
    SourceConfig,
    SparkConfig,
    SplitConfig,
    TextConfig,
    TrackingConfig,
    TrainConfig,
)
from lepton_spark.errors import ConfigError

__all__ = [
    "ArrayConfig",
    "BaselineConfig",
    "CompressConfig",
    "ConfigError",
    "FeatureSpecConfig",
    "GeneratedSource",
    "ModelConfig",
    "PipelineConfig",
    "ShardConfig",
    "SourceConfig",
    "SparkConfig",
    "SplitConfig",
    "TextConfig",
    "TrackingConfig",
    "TrainConfig",
    "load_config",
    "parse_override",
    "validate",
]
