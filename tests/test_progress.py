"""The text progress display, driven by real stage events."""

from __future__ import annotations

import io

from conftest import make

from pipekit.display.live import auto_display
from pipekit.display.progress import TextProgress


def test_text_progress_reports_each_stage_and_the_total():
    stream = io.StringIO()
    p = make(
        {
            "a": {"_target_": "const"},
            "bad": {"_target_": "boom", "inputs": {"x": "a"}},
            "c": {"_target_": "add", "inputs": {"a": "bad"}},
        }
    )
    p.run(
        executor="sync",
        observers=[TextProgress(stream, live=False)],
        progress=False,
        raise_on_failure=False,
    )
    lines = stream.getvalue().splitlines()
    assert lines[0] == "pipekit: running 3 stages of 't' on sync"
    assert lines[1].startswith("[1/3] a done ")
    assert lines[2].startswith("[2/3] bad failed ") and lines[2].endswith("ValueError: boom")
    assert lines[3].startswith("[3/3] c skipped") and "'bad' failed" in lines[3]
    assert lines[4].startswith("pipekit: 1 done, 1 failed, 1 skipped in ")


def test_live_bar_redraws_in_place():
    stream = io.StringIO()
    make({"a": {"_target_": "const"}, "b": {"_target_": "add", "inputs": {"a": "a"}}}).run(
        executor="sync", observers=[TextProgress(stream, live=True)], progress=False
    )
    text = stream.getvalue()
    assert "\r[" in text and "] 2/2" in text and "\x1b[K" in text


def test_no_display_in_a_plain_script(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal, no Jupyter kernel
    assert auto_display(make({"a": {"_target_": "const"}}).spec) is None
