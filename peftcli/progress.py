"""The training progress bar: step, loss, lr, tokens/s and ETA (rich), or plain lines off a terminal."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, total: int, enabled: bool = True, console: Console | None = None, plain_every_s: float = 10.0,
                 label: str = "train"):
        self.total, self.enabled, self.label = total, enabled, label
        self.console = console or Console()
        self.plain = not self.console.is_terminal  # CI logs: a line every few seconds instead of redraws
        self.plain_every_s, self._last_plain = plain_every_s, 0.0
        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]:.4f}"), TextColumn("lr {task.fields[lr]:.2e}"),
            TextColumn("[green]{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=self.console, disable=not enabled or self.plain,
        )
        self.task = self.progress.add_task("train", total=total, loss=float("nan"), lr=0.0, tps=0.0)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        if not self.enabled:
            return
        self.progress.update(self.task, completed=step, loss=loss, lr=lr, tps=tps)
        now = time.monotonic()
        if self.plain and (now - self._last_plain >= self.plain_every_s or step == self.total):
            self._last_plain = now
            self.console.print(f"{self.label} step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tps:.0f} tok/s")

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)
