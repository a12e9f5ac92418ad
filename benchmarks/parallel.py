"""Scale-out figures: executors vs the ideal, the distributed executor's overhead, a
100,000-member matrix, building from a plain mapping vs Apache Hamilton, and a sweep vs
separate runs. One run prints every figure with its target.

    .venv/bin/python benchmarks/parallel.py [--repeat 3] [--skip PART ...]

Parts: `executors`, `overhead`, `matrix`, `hamilton`, `sweep`. The `hamilton` part needs
Apache Hamilton in the venv, installed for this benchmark only:
`.venv/bin/pip install sf-hamilton` (it installs `apache-hamilton`); without it the part
says so and is skipped. Every stage function here lives in this module, imported as
`parallel` so that worker processes import it by name.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

from overhead import best  # the same timing rule as the overhead benchmark

HERE = Path(__file__).resolve().parent
NAP = 0.25  # seconds each independent stage releases the GIL for


# --- stage functions (imported by name in worker processes) ----------------------------------


def nap(i: int = 0, seconds: float = NAP) -> int:
    """Releases the GIL for `seconds` (like NumPy/IO work), returns `i`."""
    time.sleep(seconds)
    return i


def join(**parts: int) -> int:
    return sum(parts.values())


def leaf(i: int = 0) -> int:
    return i


def total(values: list) -> int:
    return sum(values)


def score(x: int = 0, value: int = 0) -> dict:
    return {"score": x + value}


# --- helpers ---------------------------------------------------------------------------------


def line(text: str) -> None:
    print(text, flush=True)


def naps_config(executor: dict) -> dict:
    stages: dict = {f"nap{i}": {"_target_": "parallel.nap", "params": {"i": i}} for i in range(8)}
    stages["join"] = {"_target_": "parallel.join", "inputs": {f"n{i}": f"nap{i}" for i in range(8)}}
    return {"name": "naps", "executor": executor, "stages": stages}


def fresh_naps() -> tuple[dict, list[str]]:
    """The 8 naps + join as a raw graph with new keys (a cluster still holding a key
    would hand back its old result)."""
    import uuid

    tag = uuid.uuid4().hex[:8]
    dsk: dict = {f"nap{i}-{tag}": (nap, i) for i in range(8)}
    dsk[f"join-{tag}"] = (sum, list(dsk))
    return dsk, list(dsk)


# --- 1. executors vs the ideal ----------------------------------------------------------------


def executors(repeat: int, cluster_for: Callable[[int], str]) -> None:
    import pipekit as pk

    line("1. 8 independent stages sleeping 0.25 s (GIL released) + a join: wall time of run()")
    line(
        f"   {'executor':<12} {'workers':>7} {'wall':>8} {'ideal':>7} {'ratio':>6}  target <= 1.15"
    )
    first = None
    for workers in (8, 2):
        ideal = NAP * math.ceil(8 / workers)
        for scheduler in ("threads", "processes", "distributed"):
            if scheduler == "distributed":
                executor = {
                    "scheduler": "distributed",
                    "address": cluster_for(workers),
                    "dashboard": False,
                }
            else:
                executor = {"scheduler": scheduler, "num_workers": workers}
            p = pk.Pipeline.from_config(naps_config(executor)).validate()
            if scheduler == "processes" and first is None:  # starts the fork server
                t0 = time.perf_counter()
                p.run(progress=False)
                first = time.perf_counter() - t0
            wall = best(lambda p=p: p.run(progress=False), repeat)
            line(
                f"   {scheduler:<12} {workers:>7} {wall:>7.3f}s {ideal:>6.2f}s "
                f"{wall / ideal:>5.2f}x"
            )
            if scheduler == "processes":  # what each run pays before its stages can start
                startup = min(pool_startup(workers) for _ in range(repeat))
                line(
                    f"   {'':<12} {'':>7} (of which starting and stopping {workers} workers: "
                    f"{startup:.3f}s)"
                )
            if scheduler == "distributed":  # Dask's own floor on the same cluster
                from distributed import Client

                with Client(executor["address"], set_as_default=False) as client:
                    raw = best(lambda c=client: c.get(*fresh_naps()), repeat)
                connect = min(connect_time(executor["address"]) for _ in range(repeat))
                line(
                    f"   {'':<12} {'':>7} (of which connecting a client: {connect:.3f}s; the "
                    f"run does not wait for its close)"
                )
                line(
                    f"   {'raw Client.get':<12} {workers:>7} {raw:>7.3f}s {ideal:>6.2f}s "
                    f"{raw / ideal:>5.2f}x"
                )
    line(
        "   processes: each run starts (and stops) its own workers, forks of a fork server "
        f"started by the first run in the process ({first:.2f}s for that first run); "
        "distributed: a running cluster, the client connects per run, raw Client.get uses "
        "one connected client"
    )


def pool_startup(workers: int) -> float:
    """Start a run's worker pool (every worker up, each with one 20 ms task) and stop it;
    the 20 ms, which keeps a worker busy so that the next task needs a new one, is not
    counted."""
    from pipekit.run.pools import process_pool

    t0 = time.perf_counter()
    pool = process_pool(workers)
    for future in [pool.submit(time.sleep, 0.02) for _ in range(workers)]:
        future.result()
    pool.shutdown(wait=True)
    return time.perf_counter() - t0 - 0.02


def connect_time(address: str) -> float:
    """Seconds to connect a client to the scheduler at `address` (then closed, untimed)."""
    from distributed import Client

    t0 = time.perf_counter()
    client = Client(address, set_as_default=False)
    elapsed = time.perf_counter() - t0
    client.close()
    return elapsed


def tagged(dsk: dict, keys: list[str]) -> tuple[dict, list[str]]:
    """The graph with fresh key names (the cluster must compute it again)."""
    import uuid

    tag = uuid.uuid4().hex[:8]
    new = {key: f"{key}-{tag}" for key in dsk}
    graph = {
        new[key]: (task[0], *(new.get(a, a) if isinstance(a, str) else a for a in task[1:]))
        for key, task in dsk.items()
    }
    return graph, [new[key] for key in keys]


# --- 2. distributed overhead vs raw Client.get ----------------------------------------------


def overhead(repeat: int, address: str) -> None:
    from distributed import Client
    from overhead import pipeline_config, raw_graph

    import pipekit as pk
    from pipekit.core.events import StatusBoard

    width, depth = 10, 100
    n = width * depth
    dsk, keys = raw_graph(width, depth)
    config = pipeline_config(width, depth)
    config["executor"] = {"scheduler": "distributed", "address": address, "dashboard": False}
    p = pk.Pipeline.from_config(config).validate()
    board = StatusBoard()  # an observer: stage events are produced and delivered
    raws, ours_ = [], []
    with Client(address, set_as_default=False) as client:
        for _ in range(repeat):  # interleaved, so that load from elsewhere hits both alike
            raws.append(best(lambda: client.get(*tagged(dsk, keys)), 1))
            ours_.append(best(lambda: p.run(progress=False, observers=[board]), 1))
    raw, ours = min(raws), min(ours_)
    line(f"\n2. {n}-stage layered DAG on a 2-worker LocalCluster (per stage)")
    line(
        f"   raw Client.get {raw / n * 1e3:.3f} ms/stage ({raw:.2f} s); pipekit run "
        f"{ours / n * 1e3:.3f} ms/stage ({ours:.2f} s): {ours / raw:.2f}x  target <= 1.3"
    )
    line("   pipekit: compile, connect a client, one `running` message per stage, batched gathers")


# --- 3. a 100,000-member matrix --------------------------------------------------------------


def matrix(members: int) -> None:
    import dask

    import pipekit as pk

    config = {
        "name": "wide",
        "stages": {
            "m": {"_target_": "parallel.leaf", "matrix": {"i": list(range(members))}},
            "sum": {"_target_": "parallel.total", "inputs": {"values": "m[:]"}},
        },
    }
    gc.collect()
    t0 = time.perf_counter()
    p = pk.Pipeline.from_config(config)
    t1 = time.perf_counter()
    p.validate()
    t2 = time.perf_counter()
    result = p.run(executor="sync", progress=False)
    t3 = time.perf_counter()
    assert result["sum"] == members * (members - 1) // 2
    names = [f"m[i={i}]" for i in range(members)]
    dsk: dict = {name: (leaf, i) for i, name in enumerate(names)}
    dsk["sum"] = (total, names)
    gc.collect()
    t4 = time.perf_counter()
    dask.get(dsk, [*names, "sum"])
    raw = time.perf_counter() - t4
    line(f"\n3. a {members:,}-member matrix + fan-in, sync")
    line(
        f"   expand+parse {t1 - t0:.2f} s, validate {t2 - t1:.2f} s, compile+run {t3 - t2:.2f} s: "
        f"{t3 - t0:.2f} s  target < 10 s"
    )
    line(
        f"   the same graph to raw dask.get: {raw:.2f} s ({raw / (members + 1) * 1e6:.0f} us/task: "
        f"Task conversion, dask.order, a future and a queue per task); pipekit {(t3 - t0) / raw:.2f}x"
    )
    line(
        f"   pipekit's own share: {(t3 - t0 - raw):.2f} s; the rest is Dask's sync scheduler, "
        "which pipekit uses as is (no scheduler of its own)"
    )


# --- 4. Pipeline.from_config(dict) vs Hamilton -----------------------------------------------


def hamilton_module(width: int, depth: int) -> types.ModuleType:
    """The layered DAG as Hamilton functions: `s3_4(s2_4, s2_5)`."""
    lines = []
    for layer in range(depth):
        for i in range(width):
            if layer:
                a, b = f"s{layer - 1}_{i}", f"s{layer - 1}_{(i + 1) % width}"
                lines.append(f"def s{layer}_{i}({a}: int, {b}: int) -> int:\n    return 1\n")
            else:
                lines.append(f"def s0_{i}() -> int:\n    return 1\n")
    module = types.ModuleType("layered_hamilton")
    exec(compile("\n".join(lines), "layered_hamilton", "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    return module


def hamilton(repeat: int) -> None:
    from overhead import pipeline_config

    import pipekit as pk

    width, depth = 10, 100
    n = width * depth
    config = pipeline_config(width, depth)

    def ours() -> None:
        p = pk.Pipeline.from_config(config)
        assert len(p.run(executor="sync", progress=False)) == n

    t_ours = best(ours, repeat)
    from omegaconf import OmegaConf

    dict_config = OmegaConf.create(config)
    t_plain = best(lambda: pk.Pipeline.from_config(config), repeat)
    t_omega = best(lambda: pk.Pipeline.from_config(dict_config), repeat)
    line(f"\n4. {n}-stage layered DAG from a plain mapping: build + run, sync, one process")
    line(f"   pipekit Pipeline.from_config(dict) + validate + compile + run: {t_ours * 1e3:.0f} ms")
    line(
        f"   (from_config alone: {t_plain * 1e3:.0f} ms from the dict, "
        f"{t_omega * 1e3:.0f} ms from an OmegaConf DictConfig, which resolves it)"
    )
    try:
        from hamilton import base, driver
    except ImportError:
        line("   Apache Hamilton is not installed: `.venv/bin/pip install sf-hamilton`; skipped")
        return
    module = hamilton_module(width, depth)
    outputs = [f"s{layer}_{i}" for layer in range(depth) for i in range(width)]

    def theirs() -> None:
        adapter = base.SimplePythonGraphAdapter(base.DictResult())
        dr = driver.Builder().with_modules(module).with_adapters(adapter).build()
        assert len(dr.execute(outputs)) == n

    t_theirs = best(theirs, repeat)
    line(
        f"   Hamilton driver build + execute: {t_theirs * 1e3:.0f} ms -> pipekit "
        f"{t_ours / t_theirs:.2f}x  target <= 1.5"
    )


# --- 5. a sweep of 10 vs 10 separate runs ---------------------------------------------------


SWEEP_PIPELINE = """# @package _global_
name: up
stages:
  u1: {_target_: parallel.nap, params: {i: 1, seconds: 0.3}}
  u2: {_target_: parallel.nap, inputs: {i: u1}, params: {seconds: 0.3}}
  u3: {_target_: parallel.nap, inputs: {i: u2}, params: {seconds: 0.3}}
  down: {_target_: parallel.score, inputs: {x: u3}, params: {value: 0}}
"""


def sweep(jobs: int) -> None:
    import pipekit as pk

    conf = Path(tempfile.mkdtemp(prefix="pipekit-bench-")) / "conf"
    (conf / "pipeline").mkdir(parents=True)
    (conf / "pipeline" / "up.yaml").write_text(SWEEP_PIPELINE)
    common = ["tracking=off", "cache=off", "executor=threads"]
    gc.collect()
    t0 = time.perf_counter()
    for value in range(jobs):
        p = pk.load("up", overrides=[*common, f"stages.down.params.value={value}"], config_dir=conf)
        p.run(progress=False)
    separate = time.perf_counter() - t0
    gc.collect()
    t0 = time.perf_counter()
    table = pk.sweep(
        "up",
        {"stages.down.params.value": list(range(jobs))},
        overrides=common,
        config_dir=conf,
        progress=False,
    )
    merged = time.perf_counter() - t0
    assert len(table) == jobs and table.ok
    line(f"\n5. a sweep of {jobs} over a downstream param (upstream: 3 x 0.3 s), cache off")
    line(
        f"   {jobs} separate pk.load + run: {separate:.2f} s; pk.sweep (one graph, "
        f"{table.tasks} tasks): {merged:.2f} s -> {separate / merged:.1f}x faster  target >= 3"
    )


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[])
    opts = parser.parse_args()
    skip = set(opts.skip)

    import logging

    from distributed import LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)  # cluster start/stop chatter

    clusters: dict[int, LocalCluster] = {}

    def cluster_for(workers: int) -> str:
        """A LocalCluster of 2 worker processes with `workers` slots in all (started once)."""
        if workers not in clusters:
            t0 = time.perf_counter()
            clusters[workers] = LocalCluster(
                n_workers=2,
                threads_per_worker=max(1, workers // 2),
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.ERROR,
            )
            line(
                f"   (LocalCluster of 2 processes x {max(1, workers // 2)} threads started in "
                f"{time.perf_counter() - t0:.1f} s, once)"
            )
        return clusters[workers].scheduler_address

    line(f"pipekit scale-out benchmark, {os.cpu_count()} cores, repeat {opts.repeat} (best)\n")
    try:
        if "executors" not in skip:
            executors(opts.repeat, cluster_for)
        if "overhead" not in skip:
            overhead(opts.repeat, cluster_for(2))
        if "matrix" not in skip:
            matrix(opts.members)
        if "hamilton" not in skip:
            hamilton(opts.repeat)
        if "sweep" not in skip:
            sweep(opts.jobs)
    finally:
        for cluster in clusters.values():
            cluster.close()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    import parallel  # this file under its own name: worker processes import it so

    parallel.main()
