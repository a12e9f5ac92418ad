"""The DAG in the DOT language, optionally coloured by stage status: pure Python.

Needs no Graphviz at all (paste the text into any DOT viewer); `render.py` draws it.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

from ..core.matrix import FOREACH_PARAM
from ..core.serving import REQUEST, parse_serve
from ..core.spec import PipelineSpec, Stage
from ..core.states import State
from ..errors import ConfigError

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
    node = _matrix_nodes(spec)  # a matrix member -> its matrix's one stacked node
    for name, stage in spec.stages.items():
        if name in node:
            if name == _matrices(spec)[node[name]][0]:
                out.append(_matrix_node(spec, node[name], stage))
            continue
        label = (
            f"<<b>{html.escape(name)}</b><br/>"
            f'<font point-size="9" color="#757575">{html.escape(short_target(stage.target))}'
            "</font>>"
        )
        extra = ", peripheries=2" if stage.model else ""
        attrs = _attrs(tooltip=_tooltip(spec, stage), id=f"stage-{name}", **{"class": "stage"})
        out.append(f"  {quote(name)} [label={label}{extra}, {attrs[1:]};")
    drawn: set[tuple[str, str, str]] = set()
    keyed = _keyed_inputs(spec)
    for name, stage in spec.stages.items():
        head = node.get(name, name)
        for arg, ref in stage.inputs.items():
            tail = node.get(ref.sources[0], ref.sources[0])
            label = arg if not ref.key or ref.key == arg else f"{arg}←{ref.key}"
            if (head, arg) in keyed:
                label = f"{arg}←each key"
            if (tail, head, label) in drawn:  # members of one matrix share their edges
                continue
            drawn.add((tail, head, label))
            if (head, arg) in keyed:
                tip = f"{tail}.<key> -> {head}[<key>]({arg}), one member per key"
            elif head == name:
                tip = f"{ref} -> {name}({arg})"
            else:  # drawn once for every member of the matrix `head`
                tip = f"{tail} -> {head}({arg}), one edge per member"
            bold = ", style=bold" if ref.members else ""
            out.append(
                f"  {quote(tail)} -> {quote(head)} {_attrs(label=label, tooltip=tip)[:-1]}{bold}];"
            )
        for dep in stage.after:
            tail = node.get(dep, dep)
            if (tail, head, "") in drawn:
                continue
            drawn.add((tail, head, ""))
            tip = f"{head} runs after {tail} (order only)"
            out.append(f"  {quote(tail)} -> {quote(head)} [style=dashed, tooltip={quote(tip)}];")
    out.extend(_serve_lines(spec))
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


def _matrices(spec: PipelineSpec) -> dict[str, tuple[str, ...]]:
    """Matrix name -> members (a `Pipeline` is drawn too: it has `stages`, maybe no matrices)."""
    return getattr(spec, "matrices", None) or {}


def _keyed_inputs(spec: PipelineSpec) -> set[tuple[str, str]]:
    """(matrix, argument) pairs where each member reads its own key of one upstream output
    (`foreach: {keys_of: split}`): drawn as one edge, not one per key."""
    found = set()
    for base, members in _matrices(spec).items():
        stages = [spec.stages[m] for m in members]
        for arg, ref in stages[0].inputs.items():
            if ref.key is None or ref.members or len(stages) < 2:
                continue
            if all(s.inputs[arg].key == s.matrix.get(FOREACH_PARAM) for s in stages):
                found.add((base, arg))
    return found


def _matrix_nodes(spec: PipelineSpec) -> dict[str, str]:
    """Member name -> the name of its matrix (drawn as one node)."""
    return {member: base for base, members in _matrices(spec).items() for member in members}


def _matrix_node(spec: PipelineSpec, base: str, first: Stage) -> str:
    """A matrix as one stacked node: its name, the member count and the axes."""
    members = _matrices(spec)[base]
    axes = " &times; ".join(html.escape(axis) for axis in first.matrix) or "members"
    label = (
        f"<<b>{html.escape(base)}</b> &times;{len(members)}<br/>"
        f'<font point-size="9" color="#757575">{html.escape(short_target(first.target))}'
        f"<br/>{axes}</font>>"
    )
    shown = [*members[:8], f"... {len(members) - 8} more"] if len(members) > 8 else members
    tip = "\n".join([f"{base}: matrix of {len(members)} members", first.target, *shown])
    attrs = _attrs(tooltip=tip, id=f"stage-{base}", **{"class": "stage matrix"})
    extra = ", peripheries=2" if first.model else ""
    return f'  {quote(base)} [label={label}, shape=box3d, style="filled"{extra}, {attrs[1:]};'


def matrix_state(states: list[str]) -> str:
    """One state for a matrix node from its members' states (worst and busiest first)."""
    present = set(states)
    for state in ("failed", "running"):
        if state in present:
            return state
    if present <= {"done", "cached"}:
        return "done" if "done" in present else "cached"
    if present == {"skipped"}:
        return "skipped"
    if present & {"done", "cached"}:
        return "running"  # some members finished, others not yet started
    return "pending"


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
    if _matrices(spec):
        status, reasons = _matrix_status(spec, status, reasons)
    for name, state in status.items():
        stage = spec.stages.get(name)
        group = _matrices(spec).get(name)
        if group:  # a matrix node: described by its first member, drawn as a stack
            stage = spec.stages[group[0]]
        if stage is None or state not in STATE_STYLE:
            continue
        tip = f"{_tooltip(spec, stage)}\nstate: {state}"
        if group:
            tip = f"{name}: matrix of {len(group)} members\nstate: {state}"
        if reasons.get(name):
            tip += f" ({reasons[name]})"
        style = "filled" if group else "rounded,filled"
        style += f",{_STATE_BORDER[state]}" if state in _STATE_BORDER else ""
        attrs = _attrs(
            style=style, tooltip=tip, **STATE_STYLE[state], **{"class": f"stage {state}"}
        )
        lines.append(f"  {quote(name)} {attrs};")
    end = graph.rstrip().rfind("}")
    return graph[:end] + "\n".join(lines) + "\n}\n"


def _matrix_status(
    spec: PipelineSpec, status: Mapping[str, State], reasons: Mapping[str, str]
) -> tuple[dict[str, State], dict[str, str]]:
    """Member states folded into one state per matrix node, with counts as its reason."""
    node = _matrix_nodes(spec)
    folded: dict[str, State] = {}
    grouped: dict[str, list[str]] = {}
    for name, state in status.items():
        if name in node:
            grouped.setdefault(node[name], []).append(state)
        else:
            folded[name] = state
    why = {k: v for k, v in reasons.items() if k not in node}
    for base, states in grouped.items():
        folded[base] = matrix_state(states)  # type: ignore[assignment]
        counts = {s: states.count(s) for s in dict.fromkeys(states)}
        why[base] = ", ".join(f"{n} {s}" for s, n in counts.items())
    return folded, why


def _serve_lines(spec: PipelineSpec) -> list[str]:
    """The inference DAG of the `serve` section beside the training DAG: its stages in a
    dashed box fed by the request, and a dotted edge from each training stage whose
    registered model a serve stage applies. Drawn once the section is valid."""
    if not spec.config.get("serve"):
        return []
    try:
        serve = parse_serve(spec.name, spec.config["serve"])
    except ConfigError:  # `pipekit validate` names the fault; the drawing leaves it out
        return []
    if serve is None:
        return []
    node = {name: f"serve:{name}" for name in serve.stages}
    node[REQUEST] = "serve:request"
    lines = [
        '  subgraph "cluster_serve" {',
        '    label="serve"; style="rounded,dashed"; color="#9e9e9e"; fontname="Helvetica";',
        f'    {quote(node[REQUEST])} [label="request", shape=oval, id="serve-request"];',
    ]
    for name, stage in serve.stages.items():
        what = f"{stage.model}.{stage.method}" if stage.model else short_target(stage.target or "")
        label = (
            f"<<b>{html.escape(name)}</b><br/>"
            f'<font point-size="9" color="#757575">{html.escape(what)}</font>>'
        )
        lines.append(f"    {quote(node[name])} [label={label}, id={quote('serve-' + name)}];")
    lines.append("  }")
    for name, stage in serve.stages.items():
        for arg, ref in stage.inputs.items():
            lines.append(f"  {quote(node[ref.stage])} -> {quote(node[name])} {_attrs(label=arg)};")
        if stage.model:
            tip = f"serve stage {name} applies the registered model of {stage.model}"
            lines.append(
                f"  {quote(stage.model)} -> {quote(node[name])} "
                f"[style=dotted, constraint=false, tooltip={quote(tip)}];"
            )
    return lines
