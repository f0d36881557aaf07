"""Metric names: sections for the MLflow UI, and the flat names of runs logged before 0.2."""

from __future__ import annotations

import pytest

from lepton_spark import names


@pytest.mark.parametrize(
    ("new", "old"),
    [
        (names.VAL_ACCURACY, "val_accuracy"),
        (names.TRAIN_LOSS, "train_loss"),
        (names.TRAIN_LOSS_STEP, "train_loss_step"),
        (names.TRAIN_THROUGHPUT, "throughput_samples_per_second"),
        (names.TRAIN_SAMPLES_PER_SECOND, "samples_per_second"),
        (names.TRAIN_EPOCH_SECONDS, "epoch_seconds"),
        (names.TRAIN_COST, "train_cost"),
        (names.time_metric("etl"), "time_etl_s"),
        (names.skew_metric("train", "rank_max_over_mean"), "skew_train_rank_max_over_mean"),
        (names.data_metric("bad_values.x0"), "data_bad_values.x0"),
        (names.mllib_metric(names.VAL_ACCURACY), "mllib_val_accuracy"),
        (names.COMPRESS_VAL_ACCURACY, "compressed_val_accuracy"),
        (names.user_metric("pkg.mod:top_is_positive"), "val_top_is_positive"),
    ],
)
def test_every_metric_has_a_section_and_maps_to_its_old_flat_name(new, old):
    assert "/" in new and new.split("/")[0] in {
        "train",
        "val",
        "time",
        "skew",
        "data",
        "mllib",
        "compress",
    }
    assert names.legacy(new) == old
    assert names.current(old) == new
    assert names.current(new) == new


def test_a_run_s_metric_is_read_under_either_name():
    assert names.read_metric({"val_accuracy": 0.9}, "val/accuracy") == 0.9
    assert names.read_metric({"val/accuracy": 0.8}, "val_accuracy") == 0.8
    assert names.read_metric({"val/accuracy": 0.8, "val_accuracy": 0.1}, "val/accuracy") == 0.8
    assert names.read_metric({"val_loss": 1.0}, "val/accuracy") is None
    assert names.current("my_metric") == "my_metric"  # not ours: left as it is
