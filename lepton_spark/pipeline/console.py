"""The driver's view of training while it runs: rank 0's progress on the console.

On a terminal, a live progress bar per epoch; elsewhere (a scheduler's log, a notebook cell, CI),
a plain line every quarter epoch and at each epoch's end.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lepton_spark import events


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class ConsoleProgress:
    """Turns rank events into console output. Call :meth:`close` at the end."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None
        self._epochs = 0
        self._last_quarter = -1
        self._failure_shown = False

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.Start):
            self._on_start(event)
        elif isinstance(event, events.Progress):
            self._on_progress(event)
        elif isinstance(event, events.Epoch):
            self._last_quarter = -1
            if self._progress is not None and self._task is not None:
                self._progress.remove_task(self._task)
                self._task = None
            self.console.print(
                f"epoch {event.epoch}/{self._epochs}  {format_metrics(event.metrics)}"
            )
        elif isinstance(event, events.RankFailed):
            if not self._failure_shown:  # the first failure; the others follow from it
                self._failure_shown = True
                self.console.print(f"[red]{escape(event.error.splitlines()[0])}", soft_wrap=True)
        elif isinstance(event, events.Retry):
            self.close()
            self._failure_shown = False
            self.console.print(
                f"[yellow]retrying the training stage (attempt {event.attempt} of "
                f"{event.of}) from the last checkpoint"
            )

    def _on_start(self, event: events.Start) -> None:
        self.close()  # a new attempt after a retry starts its own display
        self._failure_shown = False
        self._epochs = event.epochs
        self.console.print(
            f"training: {event.size} ranks on {event.device}, "
            f"{self._epochs} epochs × {event.steps_per_epoch} steps per rank"
        )
        if event.resumed_from:
            epoch, step = event.resumed_from
            self.console.print(f"resumed from the checkpoint at epoch {epoch + 1}, step {step}")
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()

    def _on_progress(self, event: events.Progress) -> None:
        label = f"{event.epoch}/{self._epochs}"
        if self._progress is not None:
            if self._task is None:
                self._task = self._progress.add_task(
                    "train", total=event.steps, epoch=label, loss=event.loss
                )
            self._progress.update(self._task, completed=event.step, epoch=label, loss=event.loss)
            return
        quarter = 4 * event.step // event.steps
        if quarter != self._last_quarter and quarter < 4:
            self._last_quarter = quarter
            self.console.print(
                f"epoch {label}  step {event.step}/{event.steps}  loss {event.loss:.4f}"
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None
