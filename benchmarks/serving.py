"""Serving cost: `pipekit serve` vs `mlflow models serve` of the same exported model vs a
hand-written single pyfunc doing the same steps; batch rows/s with Dask vs a pandas loop.

    .venv/bin/python benchmarks/serving.py [--requests 1500] [--rows 1000000] [--workers 2]

Online: the shipped `cancer` pipeline is trained into a temporary SQLite store and exported
(`cancer.serving` v1); the hand-written model loads the same two stage models and does the
same steps (scale, predict_proba, respond) in one `predict`. Each server runs in its own
process on 127.0.0.1; one-row `dataframe_split` requests go over a kept-alive connection,
interleaved in rounds across the servers so machine load hits all alike: p50/p99 latency
(sequential) and requests/s (4 concurrent clients). Target: pipekit p50 <= 1.2x the
hand-written pyfunc's.

Batch: a CSV of `--rows` rows scored end to end (model download and load included) by
`pipekit predict` on Dask's threads (the default executor) and processes schedulers with
`--workers` workers, vs one process reading the same CSV in chunks with pandas and calling
the same model on each chunk (best of `--repeat` interleaved runs).
Target: Dask >= 1.6x the pandas loop's rows/s on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

TARGET_P50, TARGET_BATCH = 1.2, 1.6


# --- setup -------------------------------------------------------------------------------------


def train_and_export(root: Path) -> tuple[Any, str]:
    """The cancer pipeline trained and exported into `root`; (pipeline, tracking URI)."""
    import pipekit as pk

    uri = f"sqlite:///{root}/mlflow.db"
    saved = os.getcwd()
    os.chdir(root)
    try:
        p = pk.load("cancer", overrides=["cache=off", f"tracking.uri={uri}"])
        p.run(progress=False)
        p.export()
    finally:
        os.chdir(saved)
    return p, uri


def hand_written(root: Path, uri: str) -> Path:
    """One PythonModel doing the inference DAG's steps by hand, saved with the same signature."""
    import mlflow
    from mlflow.models import infer_signature

    from pipekit.examples.cancer import request_example

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    stages = {}
    for stage in ("features", "train"):
        source = client.get_model_version_download_uri(f"cancer.{stage}", "1")
        stages[stage] = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(root / "hand" / stage)
        )
    model = HandWritten()
    example = request_example(rows=5)
    model.load_context(type("Context", (), {"artifacts": stages})())
    signature = infer_signature(example, model.predict(None, example))
    path = root / "hand" / "model"
    mlflow.pyfunc.save_model(
        str(path),
        python_model=model,
        artifacts=stages,
        signature=signature,
        input_example=example,
    )
    return path


class HandWritten(mlflow.pyfunc.PythonModel):
    """scaler.transform -> model.predict_proba -> (diagnosis, probability): one function."""

    def load_context(self, context: Any) -> None:
        import mlflow.sklearn

        self.scaler = mlflow.sklearn.load_model(context.artifacts["features"])
        self.model = mlflow.sklearn.load_model(context.artifacts["train"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> Any:
        probability = self.model.predict_proba(self.scaler.transform(model_input))[:, 1]
        return pd.DataFrame(
            {"diagnosis": (probability >= 0.5).astype("int64"), "probability": probability}
        )


# --- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Process:
    """A server subprocess in its own session (stopped with its children)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path, port: int):
        self.name, self.port, self.log = name, port, log
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/ping")
                if connection.getresponse().status == 200:
                    return
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not answer /ping in {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_servers(root: Path, uri: str, hand: Path) -> list[Process]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    mlflow_serve = [sys.executable, "-m", "mlflow", "models", "serve", "--env-manager", "local"]
    ports = [free_port() for _ in range(3)]
    servers = [
        Process(
            "pipekit serve",
            [
                sys.executable,
                "-m",
                "pipekit.cli",
                "serve",
                "cache=off",
                f"tracking.uri={uri}",
                f"serve.port={ports[0]}",
            ],
            env,
            root / "pipekit.log",
            ports[0],
        ),
        Process(
            "mlflow models serve (same export)",
            [*mlflow_serve, "-m", "models:/cancer.serving/1", "-p", str(ports[1])],
            env,
            root / "mlflow.log",
            ports[1],
        ),
        Process(
            "hand-written pyfunc (mlflow serve)",
            [*mlflow_serve, "-m", str(hand), "-p", str(ports[2])],
            env,
            root / "hand.log",
            ports[2],
        ),
    ]
    for server in servers:
        server.wait_ready()
    return servers


# --- online measurements ------------------------------------------------------------------------


def payload() -> bytes:
    from pipekit.examples.cancer import request_example

    row = request_example(rows=1)
    return json.dumps(
        {"dataframe_split": {"columns": list(row.columns), "data": row.values.tolist()}}
    ).encode()


def sequential(port: int, body: bytes, count: int) -> list[float]:
    """Seconds per request, one kept-alive connection, one request at a time."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    took = []
    for _ in range(count):
        start = time.perf_counter()
        connection.request("POST", "/invocations", body, headers)
        answer = connection.getresponse()
        answer.read()
        took.append(time.perf_counter() - start)
        if answer.status != 200:
            raise SystemExit(f"port {port} answered {answer.status}")
    connection.close()
    return took


def concurrent(port: int, body: bytes, count: int, clients: int = 4) -> float:
    """Requests per second with `clients` threads, each on its own kept-alive connection."""
    per_client = count // clients
    threads = [
        threading.Thread(target=sequential, args=(port, body, per_client)) for _ in range(clients)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return per_client * clients / (time.perf_counter() - start)


def online(servers: list[Process], requests: int, rounds: int = 5) -> dict[str, dict[str, float]]:
    body = payload()
    for server in servers:
        sequential(server.port, body, 50)  # warm-up
    took: dict[str, list[float]] = {s.name: [] for s in servers}
    rates: dict[str, list[float]] = {s.name: [] for s in servers}
    for _ in range(rounds):
        for server in servers:
            took[server.name] += sequential(server.port, body, requests // rounds)
        for server in servers:
            rates[server.name].append(concurrent(server.port, body, requests // rounds))
    figures = {}
    for server in servers:
        ms = sorted(t * 1000 for t in took[server.name])
        figures[server.name] = {
            "p50": statistics.median(ms),
            "p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            "rps": statistics.median(rates[server.name]),
        }
    return figures


# --- batch ----------------------------------------------------------------------------------------


def scoring_file(root: Path, rows: int) -> Path:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True).data
    frame = pd.concat([data] * (rows // len(data) + 1), ignore_index=True).head(rows)
    path = root / "rows.csv"
    frame.to_csv(path, index=False)
    return path


def pandas_loop(uri: str, source: Path, out: Path, chunk_rows: int) -> float:
    """One process: download and load the same model, read the CSV in chunks, score each,
    write each chunk's Parquet part. Seconds."""
    import mlflow

    from pipekit.serve.model import as_frame

    start = time.perf_counter()
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("cancer.serving", "1"),
        dst_path=str(out.parent / "loop-model"),
    )
    model = mlflow.pyfunc.load_model(local)
    schema = model.metadata.get_input_schema()
    dtypes = dict(zip(schema.input_names(), schema.pandas_types(), strict=True))
    out.mkdir()
    for index, chunk in enumerate(pd.read_csv(source, dtype=dtypes, chunksize=chunk_rows)):
        as_frame(model.predict(chunk)).to_parquet(out / f"part-{index:05d}.parquet", index=False)
    return time.perf_counter() - start


def batch(p: Any, uri: str, root: Path, rows: int, workers: int, repeat: int) -> dict[str, Any]:
    """Rows/s of each method, best of `repeat` interleaved runs (the least disturbed by
    other work on the machine), and the CPU load average meanwhile."""
    import shutil

    from pipekit.core.serving import check_serve
    from pipekit.serve.batch import predict

    source = scoring_file(root, rows)
    size = source.stat().st_size
    partition = max(2**20, size // (4 * workers))  # about 4 partitions per worker
    chunk_rows = max(1000, rows * partition // size)
    serve = check_serve(p.spec)
    figures: dict[str, Any] = {"size_mb": size / 2**20, "partitions": -(-size // partition)}
    runs: dict[str, list[tuple[float, float]]] = {
        "pandas loop": [],
        "dask processes": [],
        "dask threads": [],
    }
    for _ in range(repeat):
        out = root / "loop.parquet"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(root / "loop-model", ignore_errors=True)
        cpu, start = cpu_seconds(), time.perf_counter()
        pandas_loop(uri, source, out, chunk_rows)
        runs["pandas loop"].append((time.perf_counter() - start, cpu_seconds() - cpu))
        for scheduler in ("processes", "threads"):
            cpu, start = cpu_seconds(), time.perf_counter()
            predict(
                uri, serve, source, root / f"dask-{scheduler}.parquet", version="1",
                scheduler=scheduler, num_workers=workers, partition_size=partition,
                overwrite=True,
            )  # fmt: skip
            runs[f"dask {scheduler}"].append((time.perf_counter() - start, cpu_seconds() - cpu))
    for name, values in runs.items():
        wall, cpu = min(values)
        figures[name] = rows / wall
        figures[f"{name} cpu"] = cpu / wall  # cores busy on average during the best run
    figures["load"] = os.getloadavg()[0]
    return figures


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (forked workers)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="per server, sequential")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the batch file")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers for batch")
    parser.add_argument("--repeat", type=int, default=3, help="batch runs per method (best)")
    args = parser.parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="pipekit-bench-serving-") as tmp:
        root = Path(tmp)
        p, uri = train_and_export(root)
        hand = hand_written(root, uri)
        servers = start_servers(root, uri, hand)
        try:
            figures = online(servers, args.requests)
        finally:
            for server in servers:
                server.stop()
        for server in servers:
            if "Traceback" in server.log.read_text():
                print(f"warning: {server.name} logged a traceback", file=sys.stderr)
        print(
            f"online: one-row dataframe_split requests, {args.requests} sequential per server "
            f"(p50/p99 latency) and {args.requests} from 4 concurrent clients (requests/s), "
            f"interleaved in 5 rounds; load average {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} cores"
        )
        for name, f in figures.items():
            print(
                f"  {name:<36} p50 {f['p50']:6.2f} ms   p99 {f['p99']:6.2f} ms   {f['rps']:7.0f} req/s"
            )
        ours = figures["pipekit serve"]["p50"]
        hand_p50 = figures["hand-written pyfunc (mlflow serve)"]["p50"]
        print(
            f"pipekit serve p50 = {ours / hand_p50:.2f}x the hand-written pyfunc's "
            f"(target <= {TARGET_P50}x)"
        )
        b = batch(p, uri, root, args.rows, args.workers, args.repeat)
        print(
            f"batch: {args.rows} rows ({b['size_mb']:.0f} MB CSV, {b['partitions']} "
            f"partitions), end to end incl. model download and load, {args.workers} workers, "
            f"best of {args.repeat}; load average {b['load']:.1f} on {os.cpu_count()} cores"
        )
        for name in ("pandas loop", "dask processes", "dask threads"):
            print(
                f"  {name:<16} {b[name]:10,.0f} rows/s   ({b[name] / b['pandas loop']:.2f}x)   "
                f"{b[name + ' cpu']:.2f} cores busy"
            )
        print(
            f"dask vs the pandas loop: threads (the default executor) "
            f"{b['dask threads'] / b['pandas loop']:.2f}x, processes "
            f"{b['dask processes'] / b['pandas loop']:.2f}x (target >= {TARGET_BATCH}x)"
        )


if __name__ == "__main__":
    main()
