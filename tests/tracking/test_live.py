"""Live metrics: rank 0's events as MLflow metrics, and the ones that never arrived logged after."""

from __future__ import annotations

from mlflow import MlflowClient

from lepton_spark import events
from lepton_spark.tracking.live import LiveMetrics
from lepton_spark.tracking.run import TrackedRun
from lepton_spark.tracking.target import TrackingTarget


def progress(step: int) -> events.Progress:
    return events.Progress(
        epoch=1,
        step=step,
        steps=40,
        global_step=step,
        loss=0.5,
        window_loss=0.4,
        samples_per_second=1000.0,
    )


def test_reports_that_did_not_arrive_live_are_logged_once_after_training(tmp_path):
    target = TrackingTarget(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "a").as_uri())
    sent = [progress(10), progress(20), events.Epoch(epoch=1, metrics={"val/accuracy": 0.7})]
    with TrackedRun(target, "live", "live-test") as run:
        live = LiveMetrics(run)
        live(sent[0])  # only the first one made it over the network
        missed = live.replay([events.encode(e) for e in sent] + [{"event": "nonsense"}])
        again = live.replay([events.encode(e) for e in sent])
        run.flush()
    assert (missed, again) == (2, 0)
    client = MlflowClient(target.tracking_uri)
    steps = client.get_metric_history(run.run_id, "train/loss_step")
    assert sorted(m.step for m in steps) == [10, 20]
    assert [m.value for m in client.get_metric_history(run.run_id, "val/accuracy")] == [0.7]
