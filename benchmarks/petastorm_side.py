"""The Petastorm side of ``vs_petastorm``, run by the Petastorm environment's python.

Prints one JSON line: seconds to materialize (``make_spark_converter``) and to read one epoch
through ``make_torch_dataloader``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _frame import local_spark, make_frame


def main() -> None:
    rows, batch, cache = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    spark = local_spark(
        "petastorm side", **{SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF: cache}
    )
    df = make_frame(spark, rows)
    materialize = []
    for _ in ("cold", "warm"):
        started = time.perf_counter()
        converter = make_spark_converter(df)
        materialize.append(time.perf_counter() - started)
        if len(materialize) == 1:
            converter.delete()  # otherwise the second call finds the cached copy
    started = time.perf_counter()
    seen = 0
    with converter.make_torch_dataloader(batch_size=batch, num_epochs=1) as loader:
        for item in loader:
            seen += int(item["label"].shape[0])
    read = time.perf_counter() - started
    converter.delete()
    spark.stop()
    assert seen == rows, (seen, rows)
    print(
        json.dumps(
            {
                "rows": seen,
                "materialize_cold_s": materialize[0],
                "materialize_s": materialize[1],
                "read_s": read,
            }
        )
    )


if __name__ == "__main__":
    main()
