"""The parameter panel: edit stage params in Jupyter, re-run, and see the matching CLI line.

ipywidgets loads only when a panel is built, so `import pipekit` stays light.
"""

from __future__ import annotations

import html
import re
from typing import Any

from .core.result import RunResult
from .core.targets import import_target
from .display.live import LiveRun, dag_html
from .pipeline import Pipeline


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
        self.live = LiveRun(pipeline.spec, display=False)
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
        self.live.graph.value = dag_html(pipeline.spec)
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

    def command_line(self) -> str | None:
        """The `pipekit run` command that runs what the panel would run, as printed (None
        for a pipeline built from a mapping: no command line composes it)."""
        return self.pipeline.command_line("run", self.overrides())

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
        line = self.command_line()
        self.cli.value = (
            f"<code>{html.escape(line)}</code>"
            if line
            else "<i>built from a mapping: no <code>pipekit</code> command composes it</i>"
        )

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
