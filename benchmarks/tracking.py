"""Cost of MLflow tracking: a 50-stage pipeline with tracking off vs `local`, one process.

    .venv/bin/python benchmarks/tracking.py [--stages 50] [--models 10] [--executor sync]
        [--cli-repeat 5]   # 0: skip the end-to-end `pipekit run` ratios

Prints the milliseconds tracking adds per stage (target <= 12 ms) and per model stage,
model logging and registration included (target <= 50 ms), with ratios to the targets.
Stages are trivial, so the figures are tracking's own cost, not hidden behind work.

Then the end-to-end ratio a user sees: wall time of `pipekit run` (a whole process) with
tracking `local` vs `off`, same pipeline, same store, runs alternating after a warm-up that
creates the store: a 7-stage pipeline with 3 model stages (`cache=off`, target <= 1.25x)
and the shipped `cancer` example fully cached (target <= 1.5x). The runs' MLflow writers
are forks of a fork server (`pipekit/tracking/forkserver.py`) in a directory of the
benchmark's own, which the warm-up run starts; the timed runs start once it has warmed
up. One more tracked run per case, after retiring that server, shows the cold start
(MLflow imported during the run).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from typing import Any

TARGET_STAGE_MS, TARGET_MODEL_MS = 12.0, 50.0
TARGET_CLI_RATIO = {"p7 cache=off": 1.25, "cancer cached": 1.5}
MODULE = "tracking_benchmark"

#: The 7-stage pipeline (3 model stages) of the end-to-end figure, as a user would write it.
P7_STAGES = '''"""7 stages, 3 of them models: the end-to-end tracking benchmark's pipeline."""
def load(n: int = 400):
    from sklearn.datasets import make_classification
    X, y = make_classification(n_samples=n, n_features=8, random_state=0)
    return {"X": X, "y": y}
def split(data, frac: float = 0.25):
    k = int(len(data["y"]) * (1 - frac))
    train = {"X": data["X"][:k], "y": data["y"][:k]}
    return {"train": train, "test": {"X": data["X"][k:], "y": data["y"][k:]}}
def scaler(data):
    from sklearn.preprocessing import StandardScaler
    return StandardScaler().fit(data["train"]["X"])
def logreg(data, scaler, C: float = 1.0):
    from sklearn.linear_model import LogisticRegression
    X = scaler.transform(data["train"]["X"])
    return LogisticRegression(C=C).fit(X, data["train"]["y"])
def tree(data, scaler, depth: int = 3):
    from sklearn.tree import DecisionTreeClassifier
    X = scaler.transform(data["train"]["X"])
    return DecisionTreeClassifier(max_depth=depth).fit(X, data["train"]["y"])
def evaluate(data, scaler, a, b):
    X, y = scaler.transform(data["test"]["X"]), data["test"]["y"]
    return {"acc_a": float((a.predict(X) == y).mean()), "acc_b": float((b.predict(X) == y).mean())}
def report(scores):
    return {"best": max(scores.values())}
'''
P7_CONFIG = """# @package _global_
name: p7
stages:
  load: {_target_: p7stages.load, params: {n: 400}}
  split: {_target_: p7stages.split, inputs: {data: load}}
  scaler: {_target_: p7stages.scaler, inputs: {data: split}, model: true}
  logreg: {_target_: p7stages.logreg, inputs: {data: split, scaler: scaler}, model: true}
  tree: {_target_: p7stages.tree, inputs: {data: split, scaler: scaler}, model: true}
  evaluate: {_target_: p7stages.evaluate, inputs: {data: split, scaler: scaler, a: logreg, b: tree}}
  report: {_target_: p7stages.report, inputs: {scores: evaluate}}
"""


def step(x: Any = None, a: int = 1, b: float = 0.5, label: str = "") -> dict[str, float]:
    """A trivial stage with params and two numeric outputs (logged as metrics)."""
    base = x["value"] if isinstance(x, dict) else 0.0
    return {"value": base + a, "score": b}


def fit(x: Any = None, C: float = 1.0) -> Any:
    """A model stage: a tiny fitted scikit-learn estimator."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C).fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])


def config(
    stages: int, models: int, tracking: dict[str, Any], executor: str, *, register: bool
) -> dict[str, Any]:
    """A binary-tree DAG: stage i consumes stage (i-1)//2; every k-th stage fits a model.

    The fitting stages are the same with `register` false or true; only `model:` differs.
    """
    every = max(1, stages // models) if models else 0
    body: dict[str, Any] = {}
    for i in range(stages):
        fits = bool(every) and i % every == every - 1 and i < every * models
        entry: dict[str, Any] = {
            "_target_": f"{MODULE}.{'fit' if fits else 'step'}",
            "params": {"C": 0.5} if fits else {"a": i, "b": i / 10, "label": f"s{i}"},
        }
        if fits and register:
            entry["model"] = True
        if i:
            entry["inputs"] = {"x": f"s{(i - 1) // 2}"}
        body[f"s{i}"] = entry
    return {
        "name": f"bench{stages}",
        "stages": body,
        "executor": {"scheduler": executor},
        "tracking": tracking,
    }


def timed(configs: dict[str, dict[str, Any]], repeat: int) -> dict[str, float]:
    """Median seconds per config; runs interleave so load drift hits all of them alike."""
    import pipekit as pk

    pipelines = {label: pk.Pipeline.from_config(cfg).validate() for label, cfg in configs.items()}
    for pipeline in pipelines.values():  # warm-up: imports, store creation, first versions
        pipeline.run(progress=False)
    times: dict[str, list[float]] = {label: [] for label in configs}
    for _ in range(repeat):
        for label, pipeline in pipelines.items():
            start = time.perf_counter()
            pipeline.run(progress=False)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def bare_mlflow(uri: str, stages: int, repeat: int) -> dict[str, float]:
    """The baseline, same store and process: ms per nested run made with MlflowClient alone.

    `empty`: create + terminate; `batched`: the same with the params, metrics and tags of a
    stage sent in one `log_batch` (what pipekit sends for a non-model stage).
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"baseline-{time.time_ns()}")
    out: dict[str, list[float]] = {"empty": [], "batched": []}
    for _ in range(repeat):
        for label in out:
            parent = client.create_run(experiment).info.run_id
            start = time.perf_counter()
            for i in range(stages):
                run = client.create_run(experiment, tags={"mlflow.parentRunId": parent})
                run_id = run.info.run_id
                if label == "batched":
                    now = int(time.time() * 1000)
                    client.log_batch(
                        run_id,
                        metrics=[Metric("value", float(i), now, 0), Metric("score", 0.5, now, 0)],
                        params=[
                            Param(f"s{i}.{k}", str(v)) for k, v in {"a": i, "b": i / 10}.items()
                        ],
                        tags=[RunTag("pipekit.stage", f"s{i}")],
                    )
                client.set_terminated(run_id, "FINISHED")
            out[label].append((time.perf_counter() - start) / stages * 1000)
            client.set_terminated(parent, "FINISHED")
    return {label: statistics.median(values) for label, values in out.items()}


def cli_ratios(repeat: int) -> dict[str, dict[str, float]]:
    """Per case, from alternating whole-process runs in one working directory (one store,
    one cache): median wall seconds of `pipekit run` tracked (`local`) and `off`, the
    median of the per-pair wall ratios (robust to the machine's speed drifting between
    pairs), and one cold tracked run (no fork server running: MLflow imported meanwhile)."""
    import os
    from pathlib import Path

    from pipekit.tracking import forkserver

    cases = {
        "p7 cache=off": ["-cd", "conf", "pipeline=p7", "cache=off"],
        "cancer cached": [],  # the shipped example; its warm-up run fills the cache
    }
    out: dict[str, dict[str, float]] = {}
    for label, args in cases.items():
        with tempfile.TemporaryDirectory(prefix="pipekit-bench-") as tmp:
            root = Path(tmp)
            (root / "conf" / "pipeline").mkdir(parents=True)
            (root / "conf" / "pipeline" / "p7.yaml").write_text(P7_CONFIG)
            (root / "p7stages.py").write_text(P7_STAGES)
            runtime = root / "runtime"
            runtime.mkdir(mode=0o700)
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]),
                forkserver.DIR_ENV: str(runtime),
            }

            command = [sys.executable, "-m", "pipekit.cli", "run", "-q", *args]
            off = [*command, "tracking=off"]
            _wall(command, tmp, env), _wall(off, tmp, env)  # warm-up: store and cache exist
            _warm(runtime)  # the steady state: the fork server warm, the store opened ahead
            times: dict[str, list[float]] = {"local": [], "off": []}
            for _ in range(repeat):
                times["local"].append(_wall(command, tmp, env))
                times["off"].append(_wall(off, tmp, env))
            pairs = [t / o for t, o in zip(times["local"], times["off"], strict=True)]
            for sock in runtime.glob("*.sock"):
                forkserver.retire(sock)
            _gone(runtime)
            out[label] = {
                "tracked": statistics.median(times["local"]),
                "off": statistics.median(times["off"]),
                "ratio": statistics.median(pairs),
                "cold": _wall(command, tmp, env),
            }
            for sock in runtime.glob("*.sock"):
                forkserver.retire(sock)
    return out


def _warm(runtime: Any, seconds: float = 120.0) -> None:
    """Until the fork server's warm successor took over (bounded; it logs that)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any("takes over" in log.read_text() for log in runtime.glob("*.log")):
            return
        time.sleep(0.1)
    raise SystemExit("the fork server did not warm up in time; see its log in " + str(runtime))


def _gone(runtime: Any, seconds: float = 30.0) -> None:
    """Until the retired servers removed their sockets (bounded)."""
    deadline = time.monotonic() + seconds
    while any(runtime.glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.05)


def _wall(command: list[str], cwd: str, env: dict[str, str]) -> float:
    """Wall seconds of one whole `pipekit` process, which must succeed. The run waits
    for its MLflow writer to finish, so the writer's work is counted."""
    import subprocess

    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr.decode()[-2000:]}")
    return seconds


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=50)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--executor", default="sync", choices=["sync", "threads"])
    parser.add_argument("--cli-repeat", type=int, default=5, help="0: no end-to-end figures")
    args = parser.parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    n, m, ex = args.stages, max(1, args.models), args.executor
    t0 = time.perf_counter()
    import mlflow  # noqa: F401  (the one-off import is reported, not counted)

    import_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        local = {"backend": "local", "uri": f"sqlite:///{tmp}/mlflow.db"}
        off = {"backend": "off"}
        t = timed(
            {
                "off": config(n, m, off, ex, register=False),
                "local": config(n, m, local, ex, register=False),
                "local+models": config(n, m, local, ex, register=True),
            },
            args.repeat,
        )
        bare = bare_mlflow(local["uri"], n, args.repeat)
    per_stage = (t["local"] - t["off"]) / n * 1000
    per_model = per_stage + (t["local+models"] - t["local"]) / m * 1000
    print(
        f"{n} stages ({m} fit a tiny scikit-learn model), executor={ex}, median of "
        f"{args.repeat} interleaved runs; mlflow import {import_s:.2f} s (once, not counted)"
    )
    for label, seconds in t.items():
        print(f"  tracking {label:<13} {seconds * 1000:8.1f} ms   ({seconds / t['off']:6.1f}x off)")
    print(
        f"tracking per stage:       {per_stage:6.1f} ms  (target <= {TARGET_STAGE_MS:.0f} ms; "
        f"{per_stage / TARGET_STAGE_MS:.2f}x the target: {verdict(per_stage, TARGET_STAGE_MS)})"
    )
    print(
        f"baseline, MlflowClient alone on the same store: {bare['empty']:.1f} ms per empty "
        f"nested run, {bare['batched']:.1f} ms with one log_batch; pipekit's per-stage cost = "
        f"{per_stage / bare['batched']:.2f}x the batched baseline"
    )
    print(
        f"tracking per model stage: {per_model:6.1f} ms  (target <= {TARGET_MODEL_MS:.0f} ms; "
        f"{per_model / TARGET_MODEL_MS:.2f}x the target: {verdict(per_model, TARGET_MODEL_MS)}; "
        f"run + model files + registration)"
    )
    if args.cli_repeat > 0:
        print(
            f"end to end, `pipekit run` as a whole process (MLflow written by a fork of the "
            f"fork server), median of {args.cli_repeat} alternating runs into an existing "
            f"store:"
        )
        for label, got in cli_ratios(args.cli_repeat).items():
            ratio, target = got["ratio"], TARGET_CLI_RATIO[label]
            print(
                f"  {label:<14} tracked {got['tracked']:6.2f} s, off {got['off']:6.2f} s: "
                f"{ratio:.2f}x  (target <= {target:.2f}x: {verdict(ratio, target)}); "
                f"cold start (no fork server yet) {got['cold']:.2f} s = "
                f"{got['cold'] / got['off']:.2f}x"
            )


if __name__ == "__main__":
    sys.modules[MODULE] = sys.modules["__main__"]  # stage targets resolve to this file
    main()
