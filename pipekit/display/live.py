"""The live view of a run in Jupyter: the DAG coloured by stage state, a bar and a table.

ipywidgets and IPython load only when a widget is built, so `import pipekit` stays light.
"""

from __future__ import annotations

import html
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.events import Observer, RunInfo, StageEvent, StatusBoard
from ..core.result import RunResult
from ..core.spec import PipelineSpec
from ..core.states import State, count_states
from ..errors import GraphvizNotFoundError
from .dot import STATE_COLORS, STATE_STYLE, matrix_state
from .progress import TextProgress, in_notebook
from .render import render

#: Seconds between two redraws of the live DAG; the final state is always drawn.
MIN_INTERVAL = 0.2


class LiveRun(Observer):
    """A run's live view: the DAG coloured by stage state, a progress bar and a stage table.

    Shown once per run as one ipywidgets `VBox` (`.widget`). Redraws of the drawing are
    throttled to one per `min_interval` seconds; a pending redraw is flushed by a timer,
    and `run_finished` always draws the final state.
    """

    wants_outputs = False  # states and times only: cached outputs stay on disk

    def __init__(
        self,
        spec: PipelineSpec | None = None,
        *,
        min_interval: float = MIN_INTERVAL,
        display: bool = True,
    ):
        import ipywidgets as w  # ImportError here lets progress.auto_display fall back

        self.spec = spec
        self.min_interval = min_interval
        self.display = display
        self.board = StatusBoard()
        self.errors: dict[str, str] = {}
        self.draws = 0  # how many times the drawing was re-rendered (throttling is visible)
        self.graph = w.HTML(layout=w.Layout(overflow="auto"))
        self.progress = w.IntProgress(value=0, min=0, max=1, description="0/0")
        self.status = w.HTML()
        self.table = w.HTML()
        self.widget = w.VBox(
            [self.graph, w.HBox([self.progress, self.status]), self.table],
            layout=w.Layout(width="100%"),
        )
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self._timer: threading.Timer | None = None
        self._t0 = 0.0
        self._shown = False
        #: the Dask dashboard of an executor=distributed run (from `running` events' meta)
        self.dashboard = ""

    # --- observer hooks ---------------------------------------------------------------

    def run_started(self, run: RunInfo) -> None:
        self.spec = run.spec
        self.board.run_started(run)
        self.errors.clear()
        self._t0 = time.perf_counter()
        self.progress.max = max(len(run.stages), 1)
        self.progress.value = 0
        self.progress.bar_style = "info"
        self.dashboard = ""
        self.status.value = f"running {len(run.stages)} stages on {html.escape(run.executor)}"
        self._redraw(force=True)
        if self.display and not self._shown:
            self._show()

    def stage_changed(self, event: StageEvent) -> None:
        self.board.stage_changed(event)
        link = event.meta.get("dashboard") if event.meta else None
        if link and link != self.dashboard:
            self.dashboard = str(link)
            self.status.value += self._link()
        if event.state == "failed" and event.error is not None:
            self.errors[event.stage] = f"{type(event.error).__name__}: {event.error}"
        finished = self.board.finished
        self.progress.value = finished
        self.progress.description = f"{finished}/{len(self.board.state)}"
        if event.state == "failed":
            self.progress.bar_style = "danger"
        self._redraw()

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        for stage, error in result.errors.items():
            self.errors.setdefault(stage, str(error.cause or error))
        counts = count_states(self.board.state.values())
        seconds = time.perf_counter() - self._t0
        self.status.value = html.escape(f"{counts} in {seconds:.2f}s") + self._link()
        self.progress.bar_style = "success" if result.ok else "danger"
        self._redraw(force=True)

    def run_interrupted(self, run: RunInfo, error: BaseException) -> None:
        self.status.value = html.escape(f"run interrupted ({type(error).__name__})")
        self.progress.bar_style = "warning"
        self._redraw(force=True)

    def _link(self) -> str:
        if not self.dashboard:
            return ""
        href = html.escape(self.dashboard, quote=True)
        return f' &middot; <a href="{href}" target="_blank">Dask dashboard</a>'

    # --- state ------------------------------------------------------------------------

    def rows(self) -> list[tuple[str, str, float | None, str]]:
        """The stage table as data: (stage, state, seconds so far or taken, note); a matrix
        is one row (`train[...]`) whose note counts its members per state."""
        matrices = getattr(self.spec, "matrices", None) or {}
        rows = []
        folded: dict[str, list[str]] = {}
        for name, state in self.board.state.items():
            base = name.partition("[")[0]
            if base in matrices and name != base:
                if base not in folded:
                    folded[base] = []
                    rows.append((f"{base}[...]", "", None, ""))
                folded[base].append(state)
                continue
            note = self.errors.get(name) or self.board.reason.get(name, "")
            rows.append((name, state, self.board.elapsed(name), note))
        for index, row in enumerate(rows):
            states = folded.get(row[0][:-5]) if row[0].endswith("[...]") else None
            if states is not None:
                counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
                rows[index] = (row[0], matrix_state(states), None, counts)
        return rows

    # --- drawing ----------------------------------------------------------------------

    def _redraw(self, force: bool = False) -> None:
        """Draw now if the last drawing is old enough (or `force`), else once, a bit later."""
        with self._lock:
            wait = self._last_draw + self.min_interval - time.monotonic()
            if not force and wait > 0:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._draw()

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            self._draw()

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        self.draws += 1
        self.table.value = _table(self.rows())
        if self.spec is not None:
            self.graph.value = dag_html(self.spec, self.board.state, self.board.reason)

    def _show(self) -> None:
        if in_notebook():  # a plain script has no frontend to show widgets in
            from IPython.display import display

            display(self.widget)
        self._shown = True

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def dag_html(
    spec: PipelineSpec,
    status: Mapping[str, State] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> str:
    """The drawn DAG for an HTML widget (no XML prolog, fit to the output width); without
    Graphviz, why not and how to install it (the table and the bar still work)."""
    try:
        svg = str(render(spec, "svg", status, reasons))
    except GraphvizNotFoundError as exc:
        return f"<pre>{html.escape(str(exc))}</pre>"
    body = svg[svg.find("<svg") :] if "<svg" in svg else svg
    return f'<div class="pipekit-dag" style="max-width:100%">{body}</div>'


def _table(rows: Sequence[tuple[str, str, float | None, str]]) -> str:
    cells = []
    for name, state, seconds, note in rows:
        style = STATE_STYLE.get(state, {})
        shown = f"{seconds:.2f}" if seconds is not None else ""
        cells.append(
            f'<tr class="pipekit-stage {state}" data-stage="{html.escape(name)}">'
            f"<td>{html.escape(name)}</td>"
            f'<td style="background:{STATE_COLORS.get(state, "#fff")};'
            f'color:{style.get("fontcolor", "#000")}">{state}</td>'
            f'<td style="text-align:right">{shown}</td>'
            f"<td>{html.escape(note)}</td></tr>"
        )
    return (
        '<table class="pipekit-stages" style="font-size:12px">'
        "<tr><th>stage</th><th>state</th><th>seconds</th><th></th></tr>"
        + "".join(cells)
        + "</table>"
    )


def auto_display(spec: PipelineSpec, *, force: bool = False) -> Observer | None:
    """Live DAG in Jupyter, a text bar in a terminal, nothing in a plain script."""
    if in_notebook():
        try:
            return LiveRun(spec)
        except ImportError:
            pass
    if force or (sys.stderr.isatty() and not os.environ.get("CI")):
        return TextProgress(sys.stderr)
    return None
