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
    """`pk.lineage` and `pk.panel` load their modules on first access, and the heavy
    libraries behind them (MLflow, ipywidgets) only when called."""
    code = (
        "import sys, pipekit\n"
        "mods = lambda: [m in sys.modules for m in "
        "('pipekit.tracking.lineage', 'pipekit.panel', 'mlflow', 'ipywidgets')]\n"
        "print(*mods())\n"
        "assert callable(pipekit.lineage) and callable(pipekit.panel)\n"
        "print(*mods())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, after = (line.split() for line in proc.stdout.strip().splitlines())
    assert before == ["False", "False", "False", "False"]
    assert after == ["True", "True", "False", "False"]


def test_the_cli_starts_without_heavy_libraries():
    """`pipekit --help` and an unknown command answer without Dask, MLflow or Hydra."""
    code = (
        "import sys\n"
        "from pipekit.cli import main\n"
        "main(['--help'])\n"
        f"print('LOADED', ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "LOADED"
