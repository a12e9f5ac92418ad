"""The shipped notebooks execute top to bottom on a real kernel and show what they promise."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
STAGES = [
    "collect_a",
    "collect_b",
    "combine",
    "validate",
    "split",
    "features",
    "train",
    "evaluate",
    "publish",
]


def execute(name: str, cwd: Path) -> Any:
    """Run notebook `name` in a fresh `python3` kernel whose working directory is `cwd`."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells), f"{name} is stored with outputs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MPLBACKEND"] = "agg"
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=240,
        resources={"metadata": {"path": str(cwd)}},
        store_widget_state=True,
    )
    client.execute(env=env, cwd=str(cwd))
    return nb


def cell(nb: Any, startswith: str) -> Any:
    found = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(startswith)]
    assert len(found) == 1, startswith
    return found[0]


def outputs(code_cell: Any, mime: str) -> list[Any]:
    found = []
    for out in code_cell.outputs:
        assert out.output_type != "error", "".join(out.get("traceback", []))
        if out.output_type == "stream" and mime == "stream":
            found.append(out.text)
        elif mime in out.get("data", {}):
            found.append(out.data[mime])
    return found


def value(code_cell: Any) -> Any:
    """The cell's result (its text/plain repr) as a Python value."""
    outputs(code_cell, "any")  # asserts the cell did not raise
    [text] = [o.data["text/plain"] for o in code_cell.outputs if o.output_type == "execute_result"]
    return ast.literal_eval(text)


def widget_values(nb: Any) -> list[str]:
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return [str(w["state"].get("value", "")) for w in state.values()]


def test_quickstart_notebook(tmp_path):
    nb = execute("01-quickstart.ipynb", tmp_path)
    for code_cell in nb.cells:
        if code_cell.cell_type == "code":
            outputs(code_cell, "no such type")  # asserts no cell raised

    [svg] = outputs(cell(nb, "p = pk.load"), "image/svg+xml")
    for stage in STAGES:
        assert f"<title>{stage}</title>" in svg
    assert value(cell(nb, "p.validate()")) == STAGES

    # the live run: one widget per run, whose drawing ends with every stage done
    run_cell = cell(nb, "result = p.run()")
    assert len(outputs(run_cell, "application/vnd.jupyter.widget-view+json")) == 1
    drawings = [v for v in widget_values(nb) if "pipekit-dag" in v]
    finals = [
        dict(re.findall(r'id="stage&#45;(\w+)" class="node stage (\w+)"', d)) for d in drawings
    ]
    assert dict.fromkeys(STAGES, "done") in finals
    assert any("9 done in" in v for v in widget_values(nb))

    assert value(cell(nb, "result.status")) == dict.fromkeys(STAGES, "done")
    scores = value(cell(nb, 'result["evaluate"]'))
    assert set(scores) == {"accuracy", "f1", "roc_auc"} and scores["roc_auc"] > 0.9
    assert value(cell(nb, "result.metrics()"))["evaluate"] == scores
    weak = value(cell(nb, "weaker = p.with_overrides"))
    assert set(weak) == set(scores) and weak != scores  # C changed, so did the model

    assert outputs(cell(nb, "pk.panel(p)"), "application/vnd.jupyter.widget-view+json")
    assert any(
        "pipekit run pipeline=cancer tracking=off" in v for v in widget_values(nb)
    )  # the panel's command line, with nothing changed yet


def test_tracking_notebook(tmp_path):
    nb = execute("02-tracking.ipynb", tmp_path)
    assert (tmp_path / "mlflow.db").exists()  # tracking wrote into the working directory
    assert value(cell(nb, 'p = pk.load("cancer"')) == dict.fromkeys(STAGES, "done")

    status, roc_auc = value(cell(nb, "client = mlflow.MlflowClient"))
    assert status == "FINISHED" and 0.9 < roc_auc <= 1.0
    assert value(cell(nb, "stage_runs = ")) == sorted((s, "FINISHED") for s in STAGES)
    versions = value(cell(nb, "versions = "))
    assert versions == [("cancer.train", 1, "cancer.features/1")]

    lineage_cell = cell(nb, "lineage = pk.lineage")
    [printed] = outputs(lineage_cell, "stream")
    assert "cancer.train v1" in printed and "cancer.features v1" in printed
    [svg] = outputs(lineage_cell, "image/svg+xml")
    assert "cancer.train" in svg and "cancer.features" in svg
    json.dumps(nb)  # the executed notebook is still plain JSON


def test_serving_notebook(tmp_path):
    nb = execute("03-serving.ipynb", tmp_path)
    for code_cell in nb.cells:
        if code_cell.cell_type == "code":
            outputs(code_cell, "no such type")  # asserts no cell raised
    assert value(cell(nb, "exported = p.export()")) == ("cancer.serving", "1", "champion")
    status, version, predictions = value(cell(nb, "rows = request_example"))
    assert (status, version, len(predictions)) == (200, "1", 3)
    assert set(predictions[0]) == {"diagnosis", "probability"}
    status, message = value(cell(nb, "broken = "))
    assert status == 400 and "missing inputs ['mean radius'" in message
    assert value(cell(nb, "retrain = p.with_overrides")) == "cancer.serving/2"
    seen, stages = value(cell(nb, "import time"))
    assert seen == ["1", "2"]  # the server swapped to the retrained version, no restart
    assert stages["train"] == "cancer.train/2"
    assert value(cell(nb, "from pipekit.serve.batch import score")) is True  # batch == online
    assert (tmp_path / "scores.parquet" / "part-00001.parquet").exists()  # by partitions
