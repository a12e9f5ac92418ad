"""Graphviz drawings of a pipeline: the DAG, optionally coloured by stage status.

`dot_source()` is pure Python and needs no Graphviz at all; `render()` pipes it through
Graphviz. Live displays re-render on every status change, so the layout (the slow part of
`dot`) is computed once per pipeline shape and kept: colours are applied to the laid-out
graph, which `neato -n2` draws at the given positions.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from .errors import GraphvizNotFoundError

if TYPE_CHECKING:
    from .events import State
    from .pipeline import Pipeline
    from .spec import Stage

Format = Literal["svg", "png", "dot"]

INSTALL_HINT = (
    "install Graphviz: `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` "
    "(macOS) or `conda install graphviz`; `dot_source()` and `pipekit show --format dot` "
    "work without it"
)

#: Node attributes per stage state: fill, border and text colours, border style.
STATE_STYLE: dict[str, dict[str, str]] = {
    "pending": {"fillcolor": "#ffffff", "color": "#9e9e9e", "fontcolor": "#616161"},
    "running": {"fillcolor": "#fff3c4", "color": "#f9a825", "fontcolor": "#212121"},
    "done": {"fillcolor": "#c8e6c9", "color": "#2e7d32", "fontcolor": "#1b5e20"},
    "cached": {"fillcolor": "#eeeeee", "color": "#bdbdbd", "fontcolor": "#9e9e9e"},
    "failed": {"fillcolor": "#ffcdd2", "color": "#c62828", "fontcolor": "#b71c1c"},
    "skipped": {"fillcolor": "#fafafa", "color": "#bdbdbd", "fontcolor": "#bdbdbd"},
}
_STATE_BORDER = {"running": "bold", "cached": "dashed", "failed": "bold", "skipped": "dotted"}

#: The fill colour of each state, for tables and legends outside Graphviz.
STATE_COLORS: dict[str, str] = {state: s["fillcolor"] for state, s in STATE_STYLE.items()}


def dot_source(
    pipeline: Pipeline,
    status: Mapping[str, State] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> str:
    """The DAG in the DOT language; with `status`, nodes are coloured and a legend drawn.

    Works without Graphviz installed: paste it into any DOT viewer.
    """
    static = _static_source(pipeline, legend=status is not None)
    return _with_status(static, pipeline, status, reasons)


def render(
    pipeline: Pipeline,
    format: Format = "svg",
    status: Mapping[str, State] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> str | bytes:
    """The DAG drawn by Graphviz: SVG text, PNG bytes, or DOT text.

    Raises GraphvizNotFoundError (with install instructions) when `dot` is missing.
    """
    if format == "dot":
        return dot_source(pipeline, status, reasons)
    if format not in ("svg", "png"):
        raise ValueError(f"format must be 'svg', 'png' or 'dot', got {format!r}")
    static = _static_source(pipeline, legend=status is not None)
    if status is None:
        data = pipe("dot", format, static, 0)
    else:
        try:  # colour the cached layout; neato -n2 keeps its positions
            layout = _layout(static)
            data = pipe("neato", format, _with_status(layout, pipeline, status, reasons), 2)
        except GraphvizNotFoundError:
            raise
        except Exception:  # a Graphviz that cannot re-read its own layout: lay out again
            data = pipe("dot", format, _with_status(static, pipeline, status, reasons), 0)
    return data.decode("utf-8") if format == "svg" else data


def mimebundle(
    pipeline: Pipeline,
    include: Any = None,
    exclude: Any = None,
) -> dict[str, str]:
    """Jupyter's rich display of a pipeline: the SVG drawing, or the DOT text without `dot`."""
    bundle = {"text/plain": repr(pipeline)}
    try:
        bundle["image/svg+xml"] = str(render(pipeline, "svg"))
    except GraphvizNotFoundError as exc:
        bundle["text/plain"] = f"{pipeline!r}\n# cannot draw: {exc}\n{dot_source(pipeline)}"
    if include:
        bundle = {k: v for k, v in bundle.items() if k in include}
    if exclude:
        bundle = {k: v for k, v in bundle.items() if k not in exclude}
    return bundle


# --- DOT text -----------------------------------------------------------------------------


def quote(text: object) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as `\\n`.

    `&` becomes `&amp;` because Graphviz decodes entities such as `&lt;` in every string.
    """
    escaped = str(text).replace("&", "&amp;").replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


def short_target(target: str) -> str:
    """`pipekit.examples.cancer.train` -> `cancer.train`: enough to recognise it in a node."""
    return ".".join(target.split(".")[-2:])


def _tooltip(pipeline: Pipeline, stage: Stage) -> str:
    lines = [stage.name, stage.target]
    if stage.description:
        lines.append(stage.description)
    if stage.params:
        lines.append("params:")
        lines.extend(f"  {key} = {value!r}" for key, value in stage.params.items())
    if stage.model:
        lines.append(f"model: registered as {pipeline.name}.{stage.name}")
    return "\n".join(lines)


def _attrs(**attrs: object) -> str:
    return "[" + ", ".join(f"{key}={quote(value)}" for key, value in attrs.items()) + "]"


def _static_source(pipeline: Pipeline, legend: bool) -> str:
    """The uncoloured graph (cheap to build: the layout, not this, is what gets cached)."""
    out = [
        f"digraph {quote(pipeline.name)} {{",
        "  graph "
        + _attrs(
            rankdir="TB",
            ranksep="0.3",
            nodesep="0.25",
            fontname="Helvetica",
            tooltip=f"pipeline {pipeline.name}",
        )
        + ";",
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", color="#424242", '
        'fontname="Helvetica", fontsize=11, margin="0.12,0.04", height=0.4];',
        '  edge [fontname="Helvetica", fontsize=9, color="#757575", fontcolor="#616161", '
        "arrowsize=0.7];",
    ]
    for name, stage in pipeline.stages.items():
        label = (
            f"<<b>{html.escape(name)}</b><br/>"
            f'<font point-size="9" color="#757575">{html.escape(short_target(stage.target))}'
            "</font>>"
        )
        extra = ", peripheries=2" if stage.model else ""
        attrs = _attrs(tooltip=_tooltip(pipeline, stage), id=f"stage-{name}", **{"class": "stage"})
        out.append(f"  {quote(name)} [label={label}{extra}, {attrs[1:]};")
    for name, stage in pipeline.stages.items():
        for arg, ref in stage.inputs.items():
            label = arg if not ref.key or ref.key == arg else f"{arg}←{ref.key}"
            tip = f"{ref} -> {name}({arg})"
            out.append(f"  {quote(ref.stage)} -> {quote(name)} {_attrs(label=label, tooltip=tip)};")
        for dep in stage.after:
            tip = f"{name} runs after {dep} (order only)"
            out.append(f"  {quote(dep)} -> {quote(name)} [style=dashed, tooltip={quote(tip)}];")
    if legend:
        cells = "".join(
            f'<td bgcolor="{s["fillcolor"]}" color="{s["color"]}" border="1">'
            f'<font color="{s["fontcolor"]}">{state}</font></td>'
            for state, s in STATE_STYLE.items()
        )
        out.append(
            '  "pipekit:legend" [shape=plain, fontsize=9, tooltip="stage states", '
            f'label=<<table border="0" cellspacing="3" cellpadding="2"><tr>{cells}</tr></table>>];'
        )
        out.append('  { rank=sink; "pipekit:legend" }')
    out.append("}")
    return "\n".join(out) + "\n"


def _with_status(
    graph: str,
    pipeline: Pipeline,
    status: Mapping[str, State] | None,
    reasons: Mapping[str, str] | None,
) -> str:
    """Append per-stage colour attributes to `graph` (DOT merges repeated node statements)."""
    if not status:
        return graph
    reasons = reasons or {}
    lines = ["  // stage status"]
    for name, state in status.items():
        stage = pipeline.stages.get(name)
        if stage is None or state not in STATE_STYLE:
            continue
        tip = f"{_tooltip(pipeline, stage)}\nstate: {state}"
        if reasons.get(name):
            tip += f" ({reasons[name]})"
        style = "rounded,filled" + (f",{_STATE_BORDER[state]}" if state in _STATE_BORDER else "")
        attrs = _attrs(
            style=style, tooltip=tip, **STATE_STYLE[state], **{"class": f"stage {state}"}
        )
        lines.append(f"  {quote(name)} {attrs};")
    end = graph.rstrip().rfind("}")
    return graph[:end] + "\n".join(lines) + "\n}\n"


# --- Graphviz ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _layout(static: str) -> str:
    """The graph with positions (`dot -Tdot`): computed once per pipeline shape."""
    return pipe("dot", "dot", static, 0).decode("utf-8")


def graphviz_module() -> Any:
    """The `graphviz` package, or GraphvizNotFoundError saying how to install it."""
    try:
        import graphviz
    except ImportError as exc:
        raise GraphvizNotFoundError(
            "drawing needs the graphviz Python package: pip install 'pipekit[notebook]'; "
            "`dot_source()` and `pipekit show --format dot` work without it"
        ) from exc
    return graphviz


@functools.lru_cache(maxsize=32)
def pipe(engine: str, format: str, source: str, no_op: int = 0) -> bytes:
    """Run a Graphviz engine on DOT `source`; identical drawings are not drawn twice.

    Raises GraphvizNotFoundError (with install instructions) when `dot` is missing.
    """
    graphviz = graphviz_module()
    try:
        return graphviz.pipe(
            engine, format, source.encode("utf-8"), neato_no_op=no_op or None, quiet=True
        )
    except graphviz.ExecutableNotFound as exc:
        raise GraphvizNotFoundError(
            f"cannot draw the pipeline: Graphviz's `dot` program is not on PATH; {INSTALL_HINT}"
        ) from exc
