"""``lepton-spark``: the command line.

Exit codes: :mod:`lepton_spark.errors` (0 success or nothing to do, 2 bad input, 3 training
failed, 4 infrastructure, 130 interrupted).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from lepton_spark.cluster import interrupts
from lepton_spark.config import load_config, parse_override
from lepton_spark.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    BarrierError,
    ConfigError,
    InfrastructureError,
    InputError,
    exit_code,
)
from lepton_spark.redact import redact_text

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train PyTorch models on Spark data: ETL → Arrow shards → Horovod, DDP or FSDP → MLflow.",
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
    # mlflow installs its own INFO handler when it is imported (later, lazily) unless told not to:
    # its messages then come through ours, warnings and errors only.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")


@app.command()
def run(
    pipeline: Annotated[
        Path, typer.Argument(help="Pipeline YAML file, e.g. pipelines/tabular_demo.yaml")
    ],
    more: Annotated[
        list[str] | None,
        typer.Argument(
            help="More KEY=VALUE overrides, so that --set train.lr=0.01 train.epochs=5 sets both.",
            show_default=False,
        ),
    ] = None,
    master: Annotated[
        str | None, typer.Option(help="Spark master (overrides spark.master).")
    ] = None,
    remote: Annotated[
        str | None,
        typer.Option(
            envvar="SPARK_REMOTE",
            help="A Spark Connect server, sc://HOST:PORT (overrides spark.remote).",
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: local store)."
        ),
    ] = None,
    num_workers: Annotated[int | None, typer.Option(help="Ranks (train.num_workers).")] = None,
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
    run_key: Annotated[
        str | None,
        typer.Option(
            help="Idempotent scheduled runs (e.g. the run date): a finished run with this key "
            "is not run again, an unfinished one resumes from its checkpoint."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="With --run-key: start a fresh run regardless.")
    ] = False,
) -> None:
    """Run a pipeline end to end and print where the results are."""
    try:
        overrides = dict(parse_override(s) for s in [*(set_ or []), *(more or [])])
        if master:
            overrides["spark.master"] = master
        if remote:
            overrides["spark.remote"] = remote
        if num_workers:
            overrides["train.num_workers"] = num_workers
        cfg = load_config(pipeline, overrides)
    except ConfigError as err:
        _fail(str(err), EXIT_BAD_INPUT)

    from lepton_spark.pipeline.run import run_pipeline

    # A scheduler's SIGTERM ends the run like Ctrl-C: MLflow run KILLED, Spark jobs cancelled.
    interrupts.install(signal.SIGTERM)
    console.print(f"[bold]lepton-spark[/] {cfg.name}: {cfg.description or pipeline}")
    try:
        result = run_pipeline(
            cfg,
            tracking_uri=tracking_uri,
            rebuild_shards=rebuild_shards,
            run_key=run_key,
            force=force,
        )
    except KeyboardInterrupt:
        _fail("interrupted; the MLflow run is marked KILLED", EXIT_INTERRUPTED)
    except (InputError, InfrastructureError, BarrierError) as err:
        _fail(str(err), exit_code(err))

    if result.outcome == "already_finished":
        console.print(
            f"run key {result.run_key}: finished already in MLflow run {result.run_id}; "
            "nothing to do (--force runs it again)",
            soft_wrap=True,
        )
    elif result.outcome == "resumed":
        console.print(
            f"run key {result.run_key}: resumed the unfinished run {result.run_id}", soft_wrap=True
        )

    table = Table(title=f"{cfg.name}: done", show_header=False, title_justify="left")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.4f}")
    for key, value in result.baseline.items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("rows", ", ".join(f"{k} {v:,}" for k, v in result.rows.items()))
    if result.timings:
        table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    Console().print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    # Paths and commands on lines of their own, never wrapped, so they can be copied.
    for label, value in (
        ("MLflow run", f"{result.run_id} (experiment {result.experiment})"),
        ("model", result.model_uri),
        (
            "shards",
            redact_text(result.shard_folder) + (" (reused)" if result.shards_reused else ""),
        ),
        ("tracking", result.tracking_uri),
        ("open the UI", result.ui_command),
    ):
        typer.echo(f"{label + ':':<13}{redact_text(value)}")  # a URI may carry a password


@app.command()
def promote(
    pipeline: Annotated[Path, typer.Argument(help="The pipeline YAML (registry name and rule).")],
    version: Annotated[
        str | None, typer.Option(help="Version to promote (default: the 'candidate' alias).")
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: local)."),
    ] = None,
) -> None:
    """Move the 'champion' alias to a version only if it beats the champion (config's rule)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from lepton_spark.tracking.registry import promote as promote_version
    from lepton_spark.tracking.target import resolve_tracking

    try:
        cfg = load_config(pipeline)
    except ConfigError as err:
        _fail(str(err), EXIT_BAD_INPUT)
    name = cfg.tracking.registered_model
    if not name:
        _fail(f"{pipeline}: tracking.registered_model is not set", EXIT_BAD_INPUT)
    client = MlflowClient(resolve_tracking(cfg.tracking, tracking_uri).tracking_uri)
    try:
        decision = promote_version(
            client, name, cfg.tracking.promote_metric, cfg.tracking.promote_mode, version
        )
    except (ValueError, MlflowException) as err:
        _fail(str(err), EXIT_BAD_INPUT)
    word = "promoted" if decision.promoted else "not promoted"
    console.print(f"{name}: {word}: {decision.reason}", soft_wrap=True)


@app.command()
def score(
    model: Annotated[
        str, typer.Option(help="Model URI, e.g. models:/tabular-demo@champion or runs:/ID/model.")
    ],
    input_path: Annotated[
        str, typer.Option("--input", help="Input: a path (Parquet, CSV, JSON, ORC) or a table.")
    ],
    output: Annotated[str, typer.Option(help="Output Parquet folder (path or URI).")],
    key: Annotated[
        list[str] | None,
        typer.Option(help="Input column copied to the output (repeat; default: all non-features)."),
    ] = None,
    input_format: Annotated[
        str | None, typer.Option("--format", help="Input format (default: from the extension).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    master: Annotated[str, typer.Option(help="Spark master.")] = "local[*]",
    remote: Annotated[
        str | None,
        typer.Option(envvar="SPARK_REMOTE", help="A Spark Connect server, sc://HOST:PORT."),
    ] = None,
    partitions: Annotated[
        int | None, typer.Option(help="Repartition the input first (more parallel tasks).")
    ] = None,
    threads_per_task: Annotated[int, typer.Option(help="torch threads per Spark task.")] = 1,
    tracking_uri: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: local)."),
    ] = None,
    invalid: Annotated[
        str | None,
        typer.Option(
            help="A row whose features training would have refused (a null, NaN or infinite "
            "number, a broken array): keep (null prediction), skip (left out), error (fail, "
            "nothing written), fill (a model trained with nulls: fill). Default: the model's own "
            "(keep, or fill for nulls: fill)."
        ),
    ] = None,
) -> None:
    """Score a table with a logged model on Spark; Parquet out with keys, prediction and
    probabilities."""
    import mlflow

    from lepton_spark.config import SparkConfig, TrackingConfig
    from lepton_spark.data.session import spark_session
    from lepton_spark.serving.batch import score as score_table
    from lepton_spark.serving.scorer import POLICY_OUTCOME, invalid_summary
    from lepton_spark.tracking.target import resolve_tracking

    mlflow.set_tracking_uri(resolve_tracking(TrackingConfig(), tracking_uri).tracking_uri)
    interrupts.install(signal.SIGTERM)
    try:
        spark = spark_session(
            SparkConfig(master=master, remote=remote), app_name="lepton-spark score"
        )
        result = score_table(
            spark,
            model,
            input_path,
            output,
            keys=key,
            input_format=input_format,
            overwrite=overwrite,
            threads_per_task=threads_per_task,
            partitions=partitions,
            handle_invalid=invalid,
        )
    except Exception as err:
        _fail(_innermost(err), exit_code(err))
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    console.print(
        f"scored {result.rows:,} rows in {result.seconds:.1f} s "
        f"({result.rows_per_second:,.0f} rows/s; model loaded by {result.model_loads} Python "
        f"worker(s) for {result.batches} Arrow batches) → {redact_text(result.output)}"
    )
    what = POLICY_OUTCOME[result.handle_invalid]
    console.print(
        f"rows with invalid features: {result.invalid_rows:,}"
        + (
            f" ({invalid_summary(result.invalid)}): {what} (--invalid {result.handle_invalid})"
            if result.invalid_rows
            else ""
        ),
        soft_wrap=True,
    )


cluster_app = typer.Typer(
    no_args_is_help=True,
    help="A Spark standalone cluster on this machine (127.0.0.1), from the pyspark install.",
)
app.add_typer(cluster_app, name="cluster")
CLUSTER_FOLDER = Path(".lepton/cluster")


@cluster_app.command("up")
def cluster_up(
    workers: Annotated[int, typer.Option(help="Workers to start.")] = 2,
    cores: Annotated[int, typer.Option(help="Cores per worker.")] = 1,
    memory: Annotated[str, typer.Option(help="Memory per worker.")] = "2g",
    folder: Annotated[Path, typer.Option(help="Logs, work folders, state.")] = CLUSTER_FOLDER,
    insecure: Annotated[
        bool, typer.Option(help="No secret: any local user can submit jobs to it.")
    ] = False,
) -> None:
    """Start a master and workers; print the master URL to pass to --master.

    By default the cluster has a generated secret, with Spark's authentication and encryption
    on: applications join it with the properties file it writes (0600, in FOLDER)."""
    import secrets

    from lepton_spark.cluster.standalone import StandaloneCluster
    from lepton_spark.errors import ClusterError

    running = StandaloneCluster.load(folder)
    if running is not None:
        _fail(f"a cluster is already up at {running.master_url} (lepton-spark cluster down)", 1)
    try:
        cluster = StandaloneCluster(
            folder=folder.resolve(),
            workers=workers,
            cores_per_worker=cores,
            memory_per_worker=memory,
            secret=None if insecure else secrets.token_hex(32),
        ).start()
    except ClusterError as err:
        _fail(str(err), 1)
    console.print(
        f"{workers} workers × {cores} core(s) up; web UI http://127.0.0.1:{cluster.webui_port}"
    )
    if insecure:
        console.print(
            "[bold red]INSECURE: no secret, no authentication, no encryption: any user of this "
            "machine can run code on this cluster[/bold red]"
        )
    else:
        properties = cluster.write_properties()
        console.print(
            f"authentication and encryption on; join with: spark-submit --properties-file "
            f"{properties} ..., or lepton-spark run ... --set spark.properties_file={properties}"
        )
    typer.echo(cluster.master_url)


@cluster_app.command("down")
def cluster_down(
    folder: Annotated[Path, typer.Option(help="The folder given to 'up'.")] = CLUSTER_FOLDER,
) -> None:
    """Stop the cluster started by 'up' (its executors too)."""
    from lepton_spark.cluster.standalone import StandaloneCluster

    running = StandaloneCluster.load(folder.resolve())
    if running is None:
        console.print(f"no cluster is up (nothing in {folder})")
        return
    running.stop()
    console.print(f"stopped {running.master_url}")


connect_app = typer.Typer(
    no_args_is_help=True,
    help="A Spark Connect server on this machine (127.0.0.1), from the pyspark install.",
)
app.add_typer(connect_app, name="connect")
CONNECT_FOLDER = Path(".lepton/connect")


@connect_app.command("up")
def connect_up(
    master: Annotated[str, typer.Option(help="The server's Spark master.")] = "local[2]",
    port: Annotated[int, typer.Option(help="Port (default: a free one).")] = 0,
    folder: Annotated[Path, typer.Option(help="Log and state.")] = CONNECT_FOLDER,
) -> None:
    """Start a Spark Connect server; print the sc:// URL to pass to --remote."""
    from lepton_spark.cluster.connect_server import ConnectServer
    from lepton_spark.errors import ClusterError

    running = ConnectServer.load(folder.resolve())
    if running is not None:
        _fail(f"a Connect server is already up at {running.url} (lepton-spark connect down)", 1)
    try:
        server = ConnectServer(folder=folder.resolve(), master=master, port=port).start()
    except ClusterError as err:
        _fail(str(err), 1)
    console.print(f"Spark Connect server ({master}) up; log in {folder / 'server.log'}")
    typer.echo(server.url)


@connect_app.command("down")
def connect_down(
    folder: Annotated[Path, typer.Option(help="The folder given to 'up'.")] = CONNECT_FOLDER,
) -> None:
    """Stop the Spark Connect server started by 'up'."""
    from lepton_spark.cluster.connect_server import ConnectServer

    running = ConnectServer.load(folder.resolve())
    if running is None:
        console.print(f"no Connect server is up (nothing in {folder})")
        return
    running.stop()
    console.print(f"stopped {running.url}")


shards_app = typer.Typer(no_args_is_help=True, help="Shard folders under a shards root.")
app.add_typer(shards_app, name="shards")


@shards_app.command("gc")
def shards_gc(
    pipeline: Annotated[
        Path | None,
        typer.Argument(help="A pipeline YAML: its shards.root, name and shards.keep."),
    ] = None,
    root: Annotated[
        str | None, typer.Option(help="The shards root (a path or URI; default: the pipeline's).")
    ] = None,
    keep: Annotated[
        int | None,
        typer.Option(help="Committed folders kept per pipeline (default: shards.keep, 5)."),
    ] = None,
) -> None:
    """Remove committed shard folders beyond the newest KEEP per pipeline (folders still being
    written are left alone)."""
    from lepton_spark.config import ShardConfig
    from lepton_spark.shards import gc

    name = None
    shards = ShardConfig()
    if pipeline is not None:
        try:
            cfg = load_config(pipeline)
        except ConfigError as err:
            _fail(str(err), EXIT_BAD_INPUT)
        name, shards = cfg.name, cfg.shards
    where = root or shards.root
    try:
        removed = gc.collect(where, name, shards.keep if keep is None else keep)
    except (OSError, ValueError) as err:
        _fail(f"shards gc {redact_text(where)}: {err}", EXIT_BAD_INPUT)
    for uri in removed:
        typer.echo(redact_text(uri))
    console.print(f"removed {len(removed)} shard folder(s) under {redact_text(where)}")


def _innermost(err: BaseException) -> str:
    """The line that says what went wrong: for a failure in an executor's Python worker, the
    last ``SomethingError: …`` line of its traceback, not Spark's wrapper message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    python = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Invalid): ", line)]
    if python:
        return python[-1]
    return lines[0] if lines else type(err).__name__


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[red]error:[/] {escape(redact_text(message))}", soft_wrap=True)
    raise typer.Exit(code)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
