"""Reading a pipeline file: YAML, dotted-key overrides, validation with errors that name the field.

``load_config("pipelines/tabular_demo.yaml", {"train.epochs": 2})`` → a frozen
:class:`~lepton_spark.config.schema.PipelineConfig`. Errors name the file and the field
(``train.epochs: Input should be greater than 0``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lepton_spark.config.schema import PipelineConfig
from lepton_spark.errors import ConfigError

# Free-form mappings whose keys contain dots themselves (Spark conf keys, reader options): in an
# override, everything after them is one key (``spark.conf.spark.sql.shuffle.partitions=8``).
_DOTTED_KEY_SECTIONS = ("conf", "options")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    while len(parts) > 1:
        part = parts.pop(0)
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
        if part in _DOTTED_KEY_SECTIONS:
            parts = [".".join(parts)]
    node[parts[0]] = value


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a config as plain values) with dotted keys replaced, in place; returns it."""
    for dotted, value in overrides.items():
        _set_dotted(data, dotted, value)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.01"`` -> ``("train.lr", 0.01)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    return key.strip(), yaml.safe_load(raw)


def validate(data: Any, source: str) -> PipelineConfig:
    """Plain values → a validated config; a :class:`ConfigError` listing every bad field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {where}: {e['msg']}")
        raise ConfigError(f"{source}: invalid pipeline config\n" + "\n".join(lines)) from None


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML file, applying dotted-key overrides."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(data, dict) and overrides:
        apply_overrides(data, overrides)
    return validate(data, source=str(path))
