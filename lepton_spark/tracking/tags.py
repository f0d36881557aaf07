"""The tags that say what a run is: the pipeline, its config hashes, the code and libraries."""

from __future__ import annotations

import importlib.metadata as md
import subprocess

from lepton_spark import __version__
from lepton_spark.config import PipelineConfig
from lepton_spark.names import (
    TAG_CONFIG_HASH,
    TAG_GIT_COMMIT,
    TAG_PIPELINE,
    TAG_PIPELINE_HASH,
    TAG_VERSION,
    TAG_VERSIONS_PREFIX,
)

_VERSIONED = ("torch", "pyspark", "pyarrow", "mlflow", "horovod")


def environment_tags() -> dict[str, str]:
    """The code and libraries behind a run: the git commit of the working directory (when it is
    a git checkout) and the versions of the libraries that decide the result."""
    tags = {}
    for package in _VERSIONED:
        try:
            tags[TAG_VERSIONS_PREFIX + package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        tags[TAG_GIT_COMMIT] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def pipeline_tags(cfg: PipelineConfig) -> dict[str, str]:
    """What every run of ``cfg`` is tagged with when it starts."""
    return {
        TAG_VERSION: __version__,
        TAG_PIPELINE: cfg.name,
        TAG_PIPELINE_HASH: cfg.fingerprint(),
        TAG_CONFIG_HASH: cfg.training_fingerprint(),
        **environment_tags(),
    }
