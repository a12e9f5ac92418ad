"""`import pipekit` stays light: heavy libraries load only where they are used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = [
    "dask",
    "distributed",
    "mlflow",
    "graphviz",
    "ipywidgets",
    "hydra",
    "sklearn",
    "pandas",
    "fsspec",
    "IPython",
]


def test_import_pipekit_loads_no_heavy_library():
    code = f"import sys, pipekit\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_optional_parts_load_on_first_use():
    code = "import pipekit, sys; pipekit.lineage; print('mlflow' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
