"""Jupyter widgets: the DAG coloured live during a run, and a parameter panel to re-run.

ipywidgets and IPython load only when a widget is built, so `import pipekit` stays light.
"""

from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .events import Observer, RunInfo, StageEvent, StatusBoard, count_states

if TYPE_CHECKING:
    from .events import State
    from .pipeline import Pipeline
    from .result import RunResult

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
        pipeline: Pipeline | None = None,
        *,
        min_interval: float = MIN_INTERVAL,
        display: bool = True,
    ):
        import ipywidgets as w  # ImportError here lets progress.auto_display fall back

        self.pipeline = pipeline
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

    # --- observer hooks ---------------------------------------------------------------

    def run_started(self, run: RunInfo) -> None:
        self.pipeline = run.pipeline
        self.board.run_started(run)
        self.errors.clear()
        self._t0 = time.perf_counter()
        self.progress.max = max(len(run.stages), 1)
        self.progress.value = 0
        self.progress.bar_style = "info"
        self.status.value = f"running {len(run.stages)} stages on {html.escape(run.executor)}"
        self._redraw(force=True)
        if self.display and not self._shown:
            self._show()

    def stage_changed(self, event: StageEvent) -> None:
        self.board.stage_changed(event)
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
        self.status.value = html.escape(f"{counts} in {seconds:.2f}s")
        self.progress.bar_style = "success" if result.ok else "danger"
        self._redraw(force=True)

    def run_interrupted(self, run: RunInfo, error: BaseException) -> None:
        self.status.value = html.escape(f"run interrupted ({type(error).__name__})")
        self.progress.bar_style = "warning"
        self._redraw(force=True)

    # --- state ------------------------------------------------------------------------

    def rows(self) -> list[tuple[str, str, float | None, str]]:
        """The stage table as data: (stage, state, seconds so far or taken, note)."""
        return [
            (
                name,
                state,
                self.board.elapsed(name),
                self.errors.get(name) or self.board.reason.get(name, ""),
            )
            for name, state in self.board.state.items()
        ]

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
        if self.pipeline is not None:
            self.graph.value = _dag_html(self.pipeline, self.board.state, self.board.reason)

    def _show(self) -> None:
        from .progress import in_notebook

        if in_notebook():  # a plain script has no frontend to show widgets in
            from IPython.display import display

            display(self.widget)
        self._shown = True

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def _dag_html(
    pipeline: Pipeline,
    status: Mapping[str, State] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> str:
    """The drawn DAG for an HTML widget (no XML prolog, fit to the output width); without
    Graphviz, why not and how to install it (the table and the bar still work)."""
    from .errors import GraphvizNotFoundError
    from .viz import render

    try:
        svg = str(render(pipeline, "svg", status, reasons))
    except GraphvizNotFoundError as exc:
        return f"<pre>{html.escape(str(exc))}</pre>"
    body = svg[svg.find("<svg") :] if "<svg" in svg else svg
    return f'<div class="pipekit-dag" style="max-width:100%">{body}</div>'


def _table(rows: Sequence[tuple[str, str, float | None, str]]) -> str:
    from .viz import STATE_COLORS, STATE_STYLE

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


# --- the parameter panel -------------------------------------------------------------------


class Panel:
    """Edit stage params, run, see the live DAG and the metrics; shows the matching CLI line.

    `widgets` maps `"stage.param"` to its input widget; `run()` is what the Run button
    calls. Errors (a failing stage, a bad value) appear in `message`, never as exceptions.
    """

    def __init__(self, pipeline: Pipeline, **run_options: Any):
        import ipywidgets as w

        self.pipeline = pipeline
        self.run_options = run_options
        self.widgets: dict[str, Any] = {}
        self.initial: dict[str, Any] = {}
        self.last_result: RunResult | None = None
        self.last_error: BaseException | None = None
        self.live = LiveRun(pipeline, display=False)
        self.board = self.live.board

        sections, titles = [], []
        for name, stage in pipeline.stages.items():
            rows = []
            for param, value in stage.params.items():
                widget = _param_widget(w, param, value, _choices(stage.target, param))
                if widget is None:
                    continue
                key = f"{name}.{param}"
                self.widgets[key] = widget
                self.initial[key] = value
                widget.observe(self._changed, names="value")
                rows.append(widget)
            if rows:
                sections.append(w.VBox(rows))
                titles.append(name)
        self.params = w.Accordion(children=sections, titles=tuple(titles))
        self.button = w.Button(description="Run", button_style="primary", icon="play")
        self.button.on_click(lambda _button: self.run())
        self.message = w.HTML()
        self.cli = w.HTML()
        self.results = w.HTML()
        self.widget = w.VBox(
            [
                w.HTML(f"<b>{html.escape(pipeline.name)}</b>: edit params, then Run"),
                self.params,
                w.HBox([self.button, self.message]),
                self.cli,
                self.live.widget,
                self.results,
            ]
        )
        self.live.graph.value = _dag_html(pipeline)
        self._changed()

    def changed(self) -> dict[str, Any]:
        """`"stage.param" -> value` for every widget the user changed."""
        return {k: w.value for k, w in self.widgets.items() if w.value != self.initial[k]}

    def overrides(self) -> list[str]:
        """Hydra overrides of the changed params, e.g. `stages.train.params.C=0.5`."""
        out = []
        for key, value in self.changed().items():
            stage, param = key.split(".", 1)
            out.append(f"stages.{stage}.params.{param}={hydra_value(value)}")
        return out

    def command_line(self) -> str:
        """The `pipekit run` command that runs what the panel would run."""
        from .config import merge_overrides, override_key

        merged = merge_overrides(self.pipeline.overrides, self.overrides())
        if not any(override_key(o) == "pipeline" for o in merged):
            merged.insert(0, f"pipeline={self.pipeline.name}")
        return " ".join(["pipekit", "run", *(_shell_quote(o) for o in merged)])

    def run(self) -> RunResult | None:
        """Run with the current values (what the Run button does); errors go to `message`."""
        self.button.disabled = True
        self.message.value = "running…"
        self.last_error = None
        try:
            overrides = self.overrides()
            pipeline = self.pipeline.with_overrides(overrides) if overrides else self.pipeline
            result = pipeline.run(
                observers=[self.live],
                progress=False,
                raise_on_failure=False,
                **self.run_options,
            )
        except Exception as exc:  # a bad value or config: say so, keep the kernel alive
            self.last_error = exc
            self._error(f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.button.disabled = False
        self.last_result = result
        self.results.value = _results_table(result)
        if result.errors:
            first = result.errors[result.failed[0]]
            self.last_error = first
            self._error(str(first))
        else:
            self.message.value = '<span style="color:#2e7d32">done</span>'
        return result

    def _error(self, text: str) -> None:
        first = text.strip().splitlines()[0] if text.strip() else "error"
        self.message.value = (
            f'<span class="pipekit-error" style="color:#c62828">{html.escape(first)}</span>'
        )

    def _changed(self, _change: Any = None) -> None:
        self.cli.value = f"<code>{html.escape(self.command_line())}</code>"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def panel(pipeline: Pipeline, **run_options: Any) -> Panel:
    """A parameter panel for `pipeline`: edit params, run, compare (display it in Jupyter)."""
    return Panel(pipeline, **run_options)


def _param_widget(w: Any, name: str, value: Any, choices: tuple[Any, ...] | None) -> Any:
    """The input widget for one param value, or None for values a widget cannot edit."""
    style = {"description_width": "initial"}
    if choices and value in choices:
        return w.Dropdown(options=list(choices), value=value, description=name, style=style)
    if isinstance(value, bool):
        return w.Checkbox(value=value, description=name, indent=False)
    if isinstance(value, int):
        return w.IntText(value=value, description=name, style=style)
    if isinstance(value, float):
        return w.FloatText(value=value, description=name, style=style)
    if isinstance(value, str):
        return w.Text(value=value, description=name, style=style)
    return None


def _choices(target: str, param: str) -> tuple[Any, ...] | None:
    """The values of a `Literal[...]` annotation on the stage callable's `param`, if any."""
    import typing

    from .targets import import_target

    try:
        func = import_target(target)
        hint = typing.get_type_hints(func).get(param)
    except Exception:  # unresolvable annotations: no dropdown, a text box does
        return None
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return None


_PLAIN = re.compile(r"[A-Za-z_][\w./-]*")


def hydra_value(value: Any) -> str:
    """A Python value written as a Hydra override value (`true`, `0.5`, `'a b'`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in ("true", "false", "null", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _shell_quote(override: str) -> str:
    import shlex

    return override if re.fullmatch(r"[\w.=/,:+~@-]+", override) else shlex.quote(override)


def _results_table(result: RunResult) -> str:
    metrics = result.metrics()
    rows = []
    for name, state in result.status.items():
        seconds = result.durations.get(name)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.get(name, {}).items())
        rows.append(
            f'<tr class="{state}"><td>{html.escape(name)}</td><td>{state}</td>'
            f'<td style="text-align:right">{"" if seconds is None else f"{seconds:.2f}"}</td>'
            f"<td>{html.escape(shown)}</td></tr>"
        )
    return (
        '<table class="pipekit-results" style="font-size:12px">'
        "<tr><th>stage</th><th>state</th><th>seconds</th><th>metrics</th></tr>"
        + "".join(rows)
        + "</table>"
    )
