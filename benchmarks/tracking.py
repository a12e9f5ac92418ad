"""Cost of MLflow tracking: a 50-stage pipeline with tracking off vs `local`, one process.

    .venv/bin/python benchmarks/tracking.py [--stages 50] [--models 10] [--executor sync]

Prints the milliseconds tracking adds per stage (target <= 12 ms) and per model stage,
model logging and registration included (target <= 50 ms), with ratios to the targets.
Stages are trivial, so the figures are tracking's own cost, not hidden behind work.
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
MODULE = "tracking_benchmark"


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=50)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--executor", default="sync", choices=["sync", "threads"])
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
        f"{per_stage / TARGET_STAGE_MS:.2f}x the target)"
    )
    print(
        f"baseline, MlflowClient alone on the same store: {bare['empty']:.1f} ms per empty "
        f"nested run, {bare['batched']:.1f} ms with one log_batch; pipekit's per-stage cost = "
        f"{per_stage / bare['batched']:.2f}x the batched baseline"
    )
    print(
        f"tracking per model stage: {per_model:6.1f} ms  (target <= {TARGET_MODEL_MS:.0f} ms; "
        f"{per_model / TARGET_MODEL_MS:.2f}x the target; run + model files + registration)"
    )


if __name__ == "__main__":
    sys.modules[MODULE] = sys.modules["__main__"]  # stage targets resolve to this file
    main()
