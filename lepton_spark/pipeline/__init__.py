"""The main job, as named steps: ``run_pipeline`` (:mod:`.run`) and its steps (:mod:`.steps`),
run keys (:mod:`.runkey`), the console (:mod:`.console`). The orchestrator: the one room that
imports every other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lepton_spark.pipeline.run import PipelineResult, run_pipeline

__all__ = ["PipelineResult", "run_pipeline"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lepton_spark.pipeline import run

        return getattr(run, name)
    raise AttributeError(f"module 'lepton_spark.pipeline' has no attribute {name!r}")
