"""Graphviz drawings of a pipeline: the DOT text of `dot.py` piped through `dot`.

Live displays re-render on every status change, so the layout (the slow part of `dot`)
is computed once per pipeline shape and kept: colours are applied to the laid-out
graph, which `neato -n2` draws at the given positions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal

from ..core.spec import PipelineSpec
from ..core.states import State
from ..errors import GraphvizNotFoundError
from .dot import dot_source, static_source, with_status

Format = Literal["svg", "png", "dot"]

INSTALL_HINT = (
    "install Graphviz: `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` "
    "(macOS) or `conda install graphviz`; `dot_source()` and `pipekit show --format dot` "
    "work without it"
)


def render(
    spec: PipelineSpec,
    format: Format = "svg",
    status: Mapping[str, State] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> str | bytes:
    """The DAG drawn by Graphviz: SVG text, PNG bytes, or DOT text.

    Raises GraphvizNotFoundError (with install instructions) when `dot` is missing.
    """
    if format == "dot":
        return dot_source(spec, status, reasons)
    if format not in ("svg", "png"):
        raise ValueError(f"format must be 'svg', 'png' or 'dot', got {format!r}")
    static = static_source(spec, legend=status is not None)
    if status is None:
        data = pipe("dot", format, static, 0)
    else:
        try:  # colour the cached layout; neato -n2 keeps its positions
            layout = _layout(static)
            data = pipe("neato", format, with_status(layout, spec, status, reasons), 2)
        except GraphvizNotFoundError:
            raise
        except Exception:  # a Graphviz that cannot re-read its own layout: lay out again
            data = pipe("dot", format, with_status(static, spec, status, reasons), 0)
    return data.decode("utf-8") if format == "svg" else data


def mimebundle(
    spec: PipelineSpec, title: str, include: Any = None, exclude: Any = None
) -> dict[str, str]:
    """Jupyter's rich display of a pipeline: the SVG drawing, or the DOT text without `dot`."""
    bundle = {"text/plain": title}
    try:
        bundle["image/svg+xml"] = str(render(spec, "svg"))
    except GraphvizNotFoundError as exc:
        bundle["text/plain"] = f"{title}\n# cannot draw: {exc}\n{dot_source(spec)}"
    if include:
        bundle = {k: v for k, v in bundle.items() if k in include}
    if exclude:
        bundle = {k: v for k, v in bundle.items() if k not in exclude}
    return bundle


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
