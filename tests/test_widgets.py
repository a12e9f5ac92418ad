"""The live run view and the parameter panel, driven by real runs and real Graphviz."""

from __future__ import annotations

import re
import time
from typing import Literal

import ipywidgets
from conftest import make

from pipekit import Observer, RunInfo, StageEvent
from pipekit.display.dot import STATE_COLORS
from pipekit.display.live import LiveRun, auto_display
from pipekit.panel import Panel, hydra_value, panel


def choose(kind: Literal["fast", "slow"] = "fast", flag: bool = False, label: str = "x") -> str:
    """A stage with a `Literal` param: the panel offers its values in a dropdown."""
    return f"{kind}:{flag}:{label}"


def node_states(live: LiveRun) -> dict[str, str]:
    """Stage -> state as drawn in the live SVG (the node's CSS class)."""
    found = re.findall(r'<g id="stage&#45;(\w+)" class="node stage (\w+)">', live.graph.value)
    return dict(found)


class Snapshots(Observer):
    """Records what the LiveRun shows after every event it handled (it is listed first)."""

    def __init__(self, live: LiveRun):
        self.live = live
        self.seen: list[tuple[str, str, dict[str, str], int, dict[str, str]]] = []

    def stage_changed(self, event: StageEvent) -> None:
        rows = {name: state for name, state, _, _ in self.live.rows()}
        drawn = node_states(self.live)
        self.seen.append((event.stage, event.state, rows, self.live.progress.value, drawn))


def test_live_run_follows_a_run_pending_running_done_failed_skipped():
    p = make(
        {
            "a": {"_target_": "const", "params": {"value": 2}},
            "bad": {"_target_": "boom", "inputs": {"x": "a"}},
            "after_bad": {"_target_": "add", "inputs": {"a": "bad"}},
        }
    )
    live = LiveRun(p.spec, min_interval=0)
    snaps = Snapshots(live)
    result = p.run(executor="sync", observers=[live, snaps], progress=False, raise_on_failure=False)
    history: dict[str, list[str]] = {}
    for stage, state, rows, finished, drawn in snaps.seen:
        assert rows[stage] == state  # the table shows the event just handled
        assert drawn[stage] == state  # and so does the drawing (min_interval=0: every event)
        assert finished == sum(s in ("done", "cached", "failed", "skipped") for s in rows.values())
        history.setdefault(stage, []).append(state)
    assert history["a"] == ["pending", "running", "done"]
    assert history["bad"] == ["pending", "running", "failed"]
    assert history["after_bad"] == ["pending", "skipped"]  # it never starts
    assert result.status == {"a": "done", "bad": "failed", "after_bad": "skipped"}
    assert (live.progress.value, live.progress.max) == (3, 3)
    assert live.progress.bar_style == "danger"
    assert node_states(live) == result.status
    notes = {name: note for name, _, _, note in live.rows()}
    assert notes["bad"] == "ValueError: boom" and notes["after_bad"] == "'bad' failed"
    assert f"background:{STATE_COLORS['failed']}" in live.table.value
    assert "1 done, 1 failed, 1 skipped" in live.status.value
    assert isinstance(live.widget, ipywidgets.VBox)


def test_live_run_success_fills_the_bar():
    p = make({"a": {"_target_": "const"}, "b": {"_target_": "add", "inputs": {"a": "a"}}})
    live = LiveRun(p.spec, min_interval=0)
    p.run(executor="threads", observers=[live], progress=False)
    assert live.progress.value == live.progress.max == 2
    assert live.progress.bar_style == "success"
    assert node_states(live) == {"a": "done", "b": "done"}
    assert all(seconds is not None for _, _, seconds, _ in live.rows())


def test_cached_stage_is_greyed_with_its_reason():
    p = make({"a": {"_target_": "const"}, "b": {"_target_": "add", "inputs": {"a": "a"}}})
    live = LiveRun(p.spec, min_interval=0)
    run = RunInfo(p.spec, p.graph, ("a", "b"), "sync", "r1", time.time())
    live.run_started(run)
    assert node_states(live) == {"a": "pending", "b": "pending"} and live.progress.value == 0
    live.stage_changed(StageEvent("a", "cached", time.perf_counter(), 0.0, reason="unchanged"))
    assert node_states(live)["a"] == "cached" and live.progress.value == 1
    assert "state: cached (unchanged)" in live.graph.value  # the node tooltip
    assert f'fill="{STATE_COLORS["cached"]}"' in live.graph.value
    assert ("a", "cached", 0.0, "unchanged") in live.rows()
    live.stage_changed(StageEvent("b", "running", time.perf_counter()))
    assert node_states(live) == {"a": "cached", "b": "running"} and live.progress.value == 1


def test_redraws_are_throttled_and_the_final_state_always_drawn():
    p = make({f"s{i}": {"_target_": "const", "params": {"value": i}} for i in range(6)})
    live = LiveRun(p.spec, min_interval=3600)  # nothing but the forced draws can happen
    p.run(executor="sync", observers=[live], progress=False)
    assert live.draws == 2  # run_started and run_finished; 12 events in between coalesced
    assert set(node_states(live).values()) == {"done"}
    assert live.progress.value == 6  # the bar itself is never throttled
    assert live._timer is None  # the pending redraw was cancelled, nothing fires later


def test_plain_script_gets_no_widget_and_runs():
    p = make({"a": {"_target_": "const"}})
    assert not isinstance(auto_display(p.spec), LiveRun)
    live = LiveRun(p.spec)  # used explicitly without a frontend: keeps state, displays nothing
    assert p.run(observers=[live], progress=False)["a"] == 1
    assert live.progress.value == 1


# --- the panel ------------------------------------------------------------------------------


def small() -> Panel:
    p = make(
        {
            "a": {"_target_": "const", "params": {"value": 1}},
            "b": {"_target_": "add", "inputs": {"a": "a"}, "params": {"b": 10.5}},
            "c": {"_target_": "test_widgets.choose", "params": {"flag": False, "label": "x"}},
            "d": {"_target_": "kwargs_ok", "params": {"items": [1, 2]}},
        },
        name="small",
        executor={"scheduler": "sync"},
    )
    return panel(p)


def test_panel_builds_a_widget_per_param_by_type():
    pn = small()
    kinds = {key: type(widget).__name__ for key, widget in pn.widgets.items()}
    assert kinds == {
        "a.value": "IntText",
        "b.b": "FloatText",
        "c.flag": "Checkbox",
        "c.label": "Text",
    }  # the list param has no widget; it passes through unchanged
    assert pn.command_line() is None  # built from a dict: no command line composes it
    assert "no <code>pipekit</code> command" in pn.cli.value


def test_panel_dropdown_for_literal_params():
    p = make({"c": {"_target_": "test_widgets.choose", "params": {"kind": "slow"}}})
    pn = Panel(p)
    dropdown = pn.widgets["c.kind"]
    assert type(dropdown).__name__ == "Dropdown" and list(dropdown.options) == ["fast", "slow"]
    dropdown.value = "fast"
    assert pn.overrides() == ["stages.c.params.kind=fast"]


def test_command_line_holds_exactly_the_changed_params():
    pn = small()
    pn.widgets["b.b"].value = 0.25
    assert pn.overrides() == ["stages.b.params.b=0.25"]
    pn.widgets["c.flag"].value = True
    pn.widgets["c.label"].value = "it's two words"
    assert pn.overrides() == [
        "stages.b.params.b=0.25",
        "stages.c.params.flag=true",
        "stages.c.params.label='it\\'s two words'",
    ]
    pn.widgets["b.b"].value = 10.5  # back to the config's value: no override
    assert not any("stages.b" in o for o in pn.overrides())


def test_command_line_keeps_the_pipelines_own_overrides():
    import pipekit as pk

    p = pk.load("cancer", overrides=["tracking=off", "stages.train.params.C=0.5"])
    pn = Panel(p)
    assert pn.widgets["train.C"].value == 0.5
    pn.widgets["train.C"].value = 2.0
    pn.widgets["validate.min_rows"].value = 50
    assert pn.command_line() == (
        "pipekit run pipeline=cancer tracking=off stages.validate.params.min_rows=50 "
        "stages.train.params.C=2.0"  # C replaces the pipeline's own C=0.5
    )
    assert "stages.train.params.C=2.0" in pn.cli.value  # the line shown under the button


def test_panel_runs_again_with_new_values():
    pn = small()
    pn.widgets["a.value"].value = 5
    first = pn.run()
    assert first is not None and first["b"] == 15.5 and pn.last_result is first
    pn.widgets["a.value"].value = 7
    pn.widgets["c.label"].value = "it's two words"
    second = pn.run()
    assert second is not None and second["b"] == 17.5
    assert second["c"] == "fast:False:it's two words"  # the quoted override arrives intact
    assert pn.board.state == dict.fromkeys("abcd", "done")
    assert node_states(pn.live) == dict.fromkeys("abcd", "done")
    assert "pipekit-error" not in pn.message.value
    assert "<td>b</td><td>done</td>" in pn.results.value
    assert not pn.button.disabled


def test_failing_stage_shows_in_the_panel():
    p = make(
        {
            "a": {"_target_": "const", "params": {"value": 1}},
            "bad": {"_target_": "boom", "inputs": {"x": "a"}, "params": {"message": "ok"}},
        },
        name="failing",
    )
    pn = Panel(p, executor="sync")
    pn.widgets["bad.message"].value = "no good value"
    result = pn.run()  # no exception: the kernel lives on
    assert result is not None and result.status == {"a": "done", "bad": "failed"}
    assert "pipekit-error" in pn.message.value
    assert "stage &#x27;bad&#x27; failed: ValueError: no good value" in pn.message.value
    assert node_states(pn.live)["bad"] == "failed"
    assert pn.live.progress.bar_style == "danger"
    assert not pn.button.disabled


def test_bad_run_setting_shows_in_the_panel():
    pn = Panel(make({"a": {"_target_": "const"}}), executor="nowhere")
    assert pn.run() is None
    assert "ConfigError" in pn.message.value and "nowhere" in pn.message.value
    assert not pn.button.disabled


def test_hydra_values():
    assert [hydra_value(v) for v in (True, 3, 0.5, 1e-5, "abc", "a b", "1.0", "null")] == [
        "true",
        "3",
        "0.5",
        "1e-05",
        "abc",
        "'a b'",
        "'1.0'",
        "'null'",
    ]
