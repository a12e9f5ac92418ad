"""Per-stage overhead of pipekit against raw Dask, on layered DAGs of trivial stages.

    .venv/bin/python benchmarks/overhead.py [--depths 100 1000 10000] [--repeat 3]

Each DAG has `width` stages per layer; every stage takes two stages of the previous
layer as inputs. pipekit starts from an already-composed config (a DictConfig): its
time covers converting it once, parsing, validating, compiling and running. The
baseline is the same DAG as a raw Dask task-graph dict computed with the same
scheduler's `get`, in the same process. Hydra/OmegaConf composition is reported
separately, because it is paid once per config, not per run.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from collections.abc import Callable


def node(a: int = 0, b: int = 0) -> int:
    """A trivial stage."""
    return 1


def names(width: int, depth: int) -> list[list[str]]:
    return [[f"s{layer}_{i}" for i in range(width)] for layer in range(depth)]


def pipeline_config(width: int, depth: int) -> dict:
    stages = {}
    layers = names(width, depth)
    for layer, row in enumerate(layers):
        for i, name in enumerate(row):
            stage: dict = {"_target_": f"{__name__}.node"}
            if layer:
                prev = layers[layer - 1]
                stage["inputs"] = {"a": prev[i], "b": prev[(i + 1) % width]}
            stages[name] = stage
    return {"name": f"layered_{width}x{depth}", "stages": stages}


def raw_graph(width: int, depth: int) -> tuple[dict, list[str]]:
    dsk: dict = {}
    layers = names(width, depth)
    for layer, row in enumerate(layers):
        for i, name in enumerate(row):
            if layer:
                prev = layers[layer - 1]
                dsk[name] = (node, prev[i], prev[(i + 1) % width])
            else:
                dsk[name] = (node,)
    return dsk, [k for row in layers for k in row]


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--depths", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compose-stages", type=int, default=1000)
    opts = parser.parse_args()

    import dask
    import dask.threaded
    import yaml
    from omegaconf import OmegaConf

    import pipekit as pk

    sys.modules.setdefault("overhead", sys.modules[__name__])
    getters = {"sync": dask.get, "threads": dask.threaded.get}

    # composition: OmegaConf loads YAML per stage (paid once per config, not per run)
    text = yaml.safe_dump(pipeline_config(opts.width, opts.compose_stages // opts.width))
    t_compose = best(lambda: OmegaConf.create(text), opts.repeat)
    print(
        f"OmegaConf.create from YAML, {opts.compose_stages} stages: "
        f"{t_compose * 1e3:.0f} ms ({t_compose / opts.compose_stages * 1e3:.3f} ms/stage)\n"
    )

    print(
        f"{'stages':>7} {'sched':>7} {'raw dask':>10} {'run':>10} {'ratio':>6} "
        f"{'end-to-end':>11} {'ratio':>6}   phases ms: omegaconf / parse / validate / run"
    )
    per_stage: dict[tuple[str, int], float] = {}
    for depth in opts.depths:
        n = opts.width * depth
        cfg = OmegaConf.create(pipeline_config(opts.width, depth))
        t_convert = best(lambda cfg=cfg: OmegaConf.to_container(cfg, resolve=True), 1)
        dsk, keys = raw_graph(opts.width, depth)
        for scheduler, get in getters.items():
            t_raw = best(lambda get=get, dsk=dsk, keys=keys: get(dsk, keys), opts.repeat)
            phases: dict[str, list[float]] = {"parse": [], "validate": [], "run": []}

            def run_pipekit(scheduler=scheduler, phases=phases, cfg=cfg, n=n):
                t0 = time.perf_counter()
                p = pk.Pipeline.from_config(cfg)
                t1 = time.perf_counter()
                p.validate()
                t2 = time.perf_counter()
                result = p.run(executor=scheduler, progress=False)
                t3 = time.perf_counter()
                assert result.ok and len(result) == n
                phases["parse"].append(t1 - t0)
                phases["validate"].append(t2 - t1)
                phases["run"].append(t3 - t2)

            t_total = best(run_pipekit, opts.repeat)
            t_run = min(phases["run"])
            per_stage[(scheduler, n)] = t_total / n
            us = 1e6 / n
            print(
                f"{n:>7} {scheduler:>7} {t_raw * us:>7.1f} µs {t_run * us:>7.1f} µs "
                f"{t_run / t_raw:>5.2f}x {t_total * us:>8.1f} µs {t_total / t_raw:>5.2f}x   "
                f"{t_convert * 1e3:.0f} / {(min(phases['parse']) - t_convert) * 1e3:.0f} / "
                f"{min(phases['validate']) * 1e3:.0f} / {t_run * 1e3:.0f}"
            )
    print()
    for scheduler in getters:
        sizes = sorted(n for s, n in per_stage if s == scheduler)
        for small, big in itertools.pairwise(sizes):
            ratio = per_stage[(scheduler, big)] / per_stage[(scheduler, small)]
            print(
                f"{scheduler}: per-stage cost at {big} stages = {ratio:.2f}x the {small} figure "
                f"(target <= 1.3)"
            )
    largest = max(n for _, n in per_stage)
    print(
        f"largest: {largest} stages, sync, {per_stage[('sync', largest)] * largest:.2f} s "
        f"from a composed config (convert + parse + validate + compile + run)"
    )
    print(
        "run = compile + execute from a validated pipeline; end-to-end adds converting the "
        "DictConfig once (OmegaConf), parsing and validating"
    )


if __name__ == "__main__":
    main()
