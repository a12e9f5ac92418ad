"""Text progress for terminals, and where code runs (a Jupyter kernel or not)."""

from __future__ import annotations

import sys
import time
from typing import IO

from ..core.events import Observer, RunInfo, StageEvent, StatusBoard
from ..core.result import RunResult
from ..core.states import FINAL_STATES, count_states


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where rich displays render)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()  # type: ignore[attr-defined]
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class TextProgress(Observer):
    """One line per finished stage, plus a live bar on a terminal."""

    wants_outputs = False

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        live: bool | None = None,
        report_interrupt: bool = True,
    ):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        #: False when the caller reports interruptions itself (the CLI: one line, once)
        self.report_interrupt = report_interrupt
        self.board = StatusBoard()
        self._t0 = 0.0

    def run_started(self, run: RunInfo) -> None:
        self.board.run_started(run)
        self._t0 = time.perf_counter()
        self._write(
            f"pipekit: running {len(run.stages)} stages of '{run.name}' on {run.executor}\n"
        )

    def stage_changed(self, event: StageEvent) -> None:
        self.board.stage_changed(event)
        if event.state in FINAL_STATES:
            total, finished = len(self.board.state), self.board.finished
            seconds = f" {event.duration:.2f}s" if event.duration is not None else ""
            extra = f" ({event.reason})" if event.reason else ""
            if event.attempt > 1 or (event.state == "failed" and event.attempts > 1):
                seconds += f" (attempt {event.attempt}/{event.attempts})"
            if event.state == "failed" and event.error is not None:
                extra = f": {type(event.error).__name__}: {event.error}"
            self._clear()
            self._write(
                f"[{finished:>{len(str(total))}}/{total}] {event.stage} "
                f"{event.state}{seconds}{extra}\n"
            )
        if self.live:
            self._bar()

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        self._clear()
        counts = count_states(self.board.state.values())
        self._write(f"pipekit: {counts} in {time.perf_counter() - self._t0:.2f}s\n")

    def run_interrupted(self, run: RunInfo, error: BaseException) -> None:
        self._clear()
        if self.report_interrupt:
            self._write(f"pipekit: run interrupted ({type(error).__name__})\n")

    def _bar(self) -> None:
        total = max(len(self.board.state), 1)
        finished = self.board.finished
        running = [n for n, s in self.board.state.items() if s == "running"]
        width = 30
        filled = int(width * finished / total)
        names = ", ".join(running[:3]) + ("…" if len(running) > 3 else "")
        self._write(f"\r[{'#' * filled}{'.' * (width - filled)}] {finished}/{total} {names}\x1b[K")

    def _clear(self) -> None:
        if self.live:
            self._write("\r\x1b[K")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
