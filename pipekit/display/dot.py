"""The DAG in the DOT language, optionally coloured by stage status: pure Python.

Needs no Graphviz at all (paste the text into any DOT viewer); `render.py` draws it.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

from ..core.spec import PipelineSpec, Stage
from ..core.states import State

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
    spec: PipelineSpec,
    status: Mapping[str, State] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> str:
    """The DAG in the DOT language; with `status`, nodes are coloured and a legend drawn.

    Works without Graphviz installed: paste it into any DOT viewer.
    """
    static = static_source(spec, legend=status is not None)
    return with_status(static, spec, status, reasons)


def quote(text: object) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as `\\n`.

    `&` becomes `&amp;` because Graphviz decodes entities such as `&lt;` in every string.
    """
    escaped = str(text).replace("&", "&amp;").replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


def short_target(target: str) -> str:
    """`pipekit.examples.cancer.train` -> `cancer.train`: enough to recognise it in a node."""
    return ".".join(target.split(".")[-2:])


def _tooltip(spec: PipelineSpec, stage: Stage) -> str:
    lines = [stage.name, stage.target]
    if stage.description:
        lines.append(stage.description)
    if stage.params:
        lines.append("params:")
        lines.extend(f"  {key} = {value!r}" for key, value in stage.params.items())
    if stage.model:
        lines.append(f"model: registered as {spec.name}.{stage.name}")
    return "\n".join(lines)


def _attrs(**attrs: object) -> str:
    return "[" + ", ".join(f"{key}={quote(value)}" for key, value in attrs.items()) + "]"


def static_source(spec: PipelineSpec, legend: bool) -> str:
    """The uncoloured graph (cheap to build: the layout, not this, is what gets cached)."""
    out = [
        f"digraph {quote(spec.name)} {{",
        "  graph "
        + _attrs(
            rankdir="TB",
            ranksep="0.3",
            nodesep="0.25",
            fontname="Helvetica",
            tooltip=f"pipeline {spec.name}",
        )
        + ";",
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", color="#424242", '
        'fontname="Helvetica", fontsize=11, margin="0.12,0.04", height=0.4];',
        '  edge [fontname="Helvetica", fontsize=9, color="#757575", fontcolor="#616161", '
        "arrowsize=0.7];",
    ]
    for name, stage in spec.stages.items():
        label = (
            f"<<b>{html.escape(name)}</b><br/>"
            f'<font point-size="9" color="#757575">{html.escape(short_target(stage.target))}'
            "</font>>"
        )
        extra = ", peripheries=2" if stage.model else ""
        attrs = _attrs(tooltip=_tooltip(spec, stage), id=f"stage-{name}", **{"class": "stage"})
        out.append(f"  {quote(name)} [label={label}{extra}, {attrs[1:]};")
    for name, stage in spec.stages.items():
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


def with_status(
    graph: str,
    spec: PipelineSpec,
    status: Mapping[str, State] | None,
    reasons: Mapping[str, str] | None,
) -> str:
    """Append per-stage colour attributes to `graph` (DOT merges repeated node statements)."""
    if not status:
        return graph
    reasons = reasons or {}
    lines = ["  // stage status"]
    for name, state in status.items():
        stage = spec.stages.get(name)
        if stage is None or state not in STATE_STYLE:
            continue
        tip = f"{_tooltip(spec, stage)}\nstate: {state}"
        if reasons.get(name):
            tip += f" ({reasons[name]})"
        style = "rounded,filled" + (f",{_STATE_BORDER[state]}" if state in _STATE_BORDER else "")
        attrs = _attrs(
            style=style, tooltip=tip, **STATE_STYLE[state], **{"class": f"stage {state}"}
        )
        lines.append(f"  {quote(name)} {attrs};")
    end = graph.rstrip().rfind("}")
    return graph[:end] + "\n".join(lines) + "\n}\n"
