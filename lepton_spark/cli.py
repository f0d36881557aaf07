"""``lepton-spark``: the command line.

Exit codes: 0 success; 2 bad input (config, data, shards: a retry will not help); 3 training
failed; 4 infrastructure (not enough Spark slots, a lost rank); 130 interrupted.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from lepton_spark.config import ConfigError, load_config, parse_override

EXIT_BAD_INPUT = 2
EXIT_TRAINING = 3
EXIT_INFRA = 4
EXIT_INTERRUPTED = 130

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train PyTorch models on Spark data: ETL → Arrow shards → Horovod → MLflow.",
)
console = Console(stderr=True)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    for noisy in ("py4j", "alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def run(
    pipeline: Annotated[
        Path, typer.Argument(help="Pipeline YAML file, e.g. pipelines/tabular_demo.yaml")
    ],
    master: Annotated[
        str | None, typer.Option(help="Spark master (overrides spark.master).")
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: local store)."
        ),
    ] = None,
    num_workers: Annotated[
        int | None, typer.Option(help="Horovod ranks (train.num_workers).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value: --set train.epochs=5 (repeatable)."),
    ] = None,
    rebuild_shards: Annotated[
        bool,
        typer.Option(
            "--rebuild-shards",
            help="Write the shards again even if committed ones match the dataset fingerprint.",
        ),
    ] = False,
) -> None:
    """Run a pipeline end to end and print where the results are."""
    from lepton_spark.barrier import BarrierError, SlotsError
    from lepton_spark.etl import DataError
    from lepton_spark.manifest import ShardError

    try:
        overrides = dict(parse_override(s) for s in set_ or [])
        if master:
            overrides["spark.master"] = master
        if num_workers:
            overrides["train.num_workers"] = num_workers
        cfg = load_config(pipeline, overrides)
    except ConfigError as err:
        _fail(str(err), EXIT_BAD_INPUT)

    from lepton_spark.pipeline import run_pipeline

    # A scheduler's SIGTERM ends the run like Ctrl-C: MLflow run KILLED, Spark jobs cancelled.
    signal.signal(signal.SIGTERM, _interrupt)
    console.print(f"[bold]lepton-spark[/] {cfg.name}: {cfg.description or pipeline}")
    try:
        result = run_pipeline(cfg, tracking_uri=tracking_uri, rebuild_shards=rebuild_shards)
    except KeyboardInterrupt:
        _fail("interrupted; the MLflow run is marked KILLED", EXIT_INTERRUPTED)
    except (DataError, ShardError) as err:
        _fail(str(err), EXIT_BAD_INPUT)
    except SlotsError as err:
        _fail(str(err), EXIT_INFRA)
    except BarrierError as err:
        _fail(str(err), EXIT_TRAINING)

    table = Table(title=f"{cfg.name}: done", show_header=False, title_justify="left")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("rows", ", ".join(f"{k} {v:,}" for k, v in result.rows.items()))
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    Console().print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    # Paths and commands on lines of their own, never wrapped, so they can be copied.
    for label, value in (
        ("MLflow run", f"{result.run_id} (experiment {result.experiment})"),
        ("model", result.model_uri),
        ("shards", result.shard_folder + (" (reused)" if result.shards_reused else "")),
        ("tracking", result.tracking_uri),
        ("open the UI", result.ui_command),
    ):
        typer.echo(f"{label + ':':<13}{value}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
