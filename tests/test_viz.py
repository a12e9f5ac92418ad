"""Drawing the DAG with the real Graphviz: DOT content, SVG/PNG, `pipekit show`, no `dot`."""

from __future__ import annotations

import re

import pytest
from conftest import make, run_pipekit

from pipekit.display import dot, render
from pipekit.errors import GraphvizNotFoundError, PipekitError

STAGES = {
    "load": {"_target_": "split", "params": {"value": 10, "parts": 2}},
    "left": {"_target_": "add", "inputs": {"a": "load.head"}, "params": {"b": 1}},
    "right": {"_target_": "add", "inputs": {"a": "load.tail"}},
    "join": {
        "_target_": "needs_two",
        "inputs": {"x": "left", "y": "right"},
        "after": ["load"],
        "model": True,
        "description": 'joins "both" sides\\ <b>&amp;</b>\nsecond line',
    },
}


@pytest.fixture
def pipeline():
    return make(STAGES, name="viz_demo")


def node_line(source: str, name: str) -> str:
    return next(line for line in source.splitlines() if line.strip().startswith(f'"{name}" ['))


def test_dot_source_draws_edges_labels_after_and_models(pipeline):
    source = dot.dot_source(pipeline.spec)
    assert source.startswith('digraph "viz_demo" {')
    assert '"load" -> "left" [label="a←head"' in source
    assert '"load" -> "right" [label="a←tail"' in source
    assert '"left" -> "join" [label="x"' in source
    assert '"load" -> "join" [style=dashed' in source  # the order-only edge
    assert "peripheries=2" in node_line(source, "join")
    assert "peripheries" not in node_line(source, "left")
    # name and short target in the label, params in the tooltip
    assert "<b>left</b>" in node_line(source, "left") and "core_stages.add" in source
    assert 'tooltip="left\\ncore_stages.add\\nparams:\\n  b = 1"' in node_line(source, "left")
    assert "fillcolor" not in source.split("// stage status")[0].split("edge [")[1]


def test_dot_source_escapes_quotes_backslashes_and_newlines(pipeline):
    line = node_line(dot.dot_source(pipeline.spec), "join")
    assert 'joins \\"both\\" sides\\\\ <b>&amp;amp;</b>\\nsecond line' in line
    svg = render.render(pipeline.spec, "svg")  # Graphviz parses it and escapes for XML
    assert "joins &quot;both&quot; sides\\ &lt;b&gt;&amp;amp;&lt;/b&gt;&#10;second line" in svg


def test_status_colours_classes_reasons_and_legend(pipeline):
    status = {"load": "cached", "left": "done", "right": "failed", "join": "skipped"}
    source = dot.dot_source(pipeline.spec, status, reasons={"load": "inputs unchanged"})
    status_part = source.split("// stage status")[1]
    for name, state in status.items():
        line = node_line(status_part, name)
        assert f'fillcolor="{dot.STATE_COLORS[state]}"' in line
        assert f'class="stage {state}"' in line
    assert "state: cached (inputs unchanged)" in node_line(status_part, "load")
    assert "dashed" in node_line(status_part, "load")  # cached looks greyed and dashed
    assert "pipekit:legend" in source
    assert len(set(dot.STATE_COLORS.values())) == len(dot.STATE_COLORS)

    svg = render.render(pipeline.spec, "svg", status=status)
    for name, state in status.items():
        assert re.search(rf'<g id="stage&#45;{name}" class="node stage {state}">', svg), name
    assert f'fill="{dot.STATE_COLORS["failed"]}"' in svg
    for state in dot.STATE_COLORS:
        assert f">{state}</text>" in svg  # the legend


def test_render_svg_png_and_dot(pipeline):
    svg = render.render(pipeline.spec, "svg")
    assert isinstance(svg, str) and svg.lstrip().startswith("<?xml")
    for name in STAGES:
        assert f"<title>{name}</title>" in svg
    assert "a←head" in svg
    png = render.render(pipeline.spec, "png")
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert render.render(pipeline.spec, "dot") == dot.dot_source(pipeline.spec)
    with pytest.raises(ValueError, match="format must be"):
        render.render(pipeline.spec, "gif")  # type: ignore[arg-type]


def test_live_renders_keep_the_layout(pipeline):
    """Colouring re-uses the cached layout: nodes stay where they were as states change."""

    def positions(svg: str) -> dict[str, str]:
        found = re.findall(
            r"<title>(\w+)</title>\s*<g [^>]*><a [^>]*>\s*<path[^>]* d=\"([^\"]+)\"", svg
        )
        return dict(found)

    names = list(STAGES)
    first = positions(
        str(render.render(pipeline.spec, "svg", status=dict.fromkeys(names, "pending")))
    )
    later = positions(
        str(
            render.render(
                pipeline.spec, "svg", status={**dict.fromkeys(names, "done"), "join": "running"}
            )
        )
    )
    assert set(first) == set(names) and first == later


def test_pipeline_displays_as_svg_in_jupyter(pipeline):
    bundle = pipeline._repr_mimebundle_()
    assert set(bundle) == {"image/svg+xml", "text/plain"}
    assert bundle["text/plain"] == "<Pipeline 'viz_demo': 4 stages>"
    assert all(f"<title>{name}</title>" in bundle["image/svg+xml"] for name in STAGES)
    assert set(pipeline._repr_mimebundle_(include=["text/plain"])) == {"text/plain"}
    assert set(pipeline._repr_mimebundle_(exclude=["image/svg+xml"])) == {"text/plain"}


def test_missing_dot_names_the_install_commands(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    fresh = make(STAGES, name="no_dot_here")
    render.pipe.cache_clear()  # drawings are memoised: start from none, whatever ran before
    render.render(fresh.spec, "dot")  # DOT text needs no Graphviz
    with pytest.raises(GraphvizNotFoundError) as info:
        render.render(fresh.spec, "svg")
    message = str(info.value)
    for hint in ("apt-get install graphviz", "brew install graphviz", "conda install graphviz"):
        assert hint in message
    assert "dot_source()" in message and "pipekit show --format dot" in message
    assert isinstance(info.value, PipekitError) and info.value.exit_code == 1
    assert '"load" -> "join" [style=dashed' in dot.dot_source(fresh.spec)  # still works
    bundle = fresh._repr_mimebundle_()  # Jupyter shows the DOT text instead of raising
    assert "image/svg+xml" not in bundle
    assert "apt-get install graphviz" in bundle["text/plain"]
    assert 'digraph "no_dot_here"' in bundle["text/plain"]


def pipekit(*args, env, cwd):
    return run_pipekit("show", *args, "tracking=off", env=env, cwd=cwd, timeout=120, text=False)


def test_show_writes_svg_and_png_files(cli_env, tmp_path):
    proc = pipekit("--format", "svg", "-o", "dag.svg", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    svg = (tmp_path / "dag.svg").read_text()
    for name in ("collect_a", "combine", "train", "evaluate", "publish"):
        assert f"<title>{name}</title>" in svg
    proc = pipekit("--format", "png", env=cli_env, cwd=tmp_path)  # stdout is a pipe: bytes ok
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"\x89PNG")


def test_show_dot_works_and_svg_fails_in_one_line_without_dot(cli_env, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {**cli_env, "PATH": str(empty)}
    proc = pipekit("--format", "dot", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b'digraph "cancer" {')
    assert b'"train" -> "evaluate" [label="model"' in proc.stdout
    proc = pipekit("--format", "svg", "-o", "dag.svg", env=env, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipekit: error: cannot draw the pipeline")
    assert "apt-get install graphviz" in lines[0]
    assert not (tmp_path / "dag.svg").exists()
