"""Stage-cache overhead: a no-op re-run against validation, and value fingerprinting speed.

    .venv/bin/python benchmarks/cache.py [--width 10 --depth 100] [--repeat 5] [--frame-mb 200]

A no-op re-run of a layered pipeline (see `overhead.py`) whose every stage is cached
fingerprints each stage (code, params, upstream keys), lists the store once and
returns lazily loaded outputs: target <= 2x `validate()` of the same pipeline. The
second figure is `fingerprint.value_token` (dask's tokenize) on a pandas DataFrame, the
path a non-config value (e.g. a frame passed as a param from Python) takes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--frame-mb", type=int, default=200)
    opts = parser.parse_args()

    import overhead

    import pipekit as pk

    sys.modules.setdefault("overhead", overhead)
    n = opts.width * opts.depth
    config = overhead.pipeline_config(opts.width, opts.depth)
    config["stages"] = {
        name: {**stage, "_target_": "overhead.node"} for name, stage in config["stages"].items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        config["cache"] = {"backend": "local", "path": os.path.join(tmp, "cache")}
        config["executor"] = {"scheduler": "sync"}

        t0 = time.perf_counter()
        first = pk.Pipeline.from_config(config).run(progress=False)
        t_first = time.perf_counter() - t0
        assert set(first.status.values()) == {"done"}

        def validate() -> None:
            pk.Pipeline.from_config(config).validate()

        p = pk.Pipeline.from_config(config).validate()
        p.run(progress=False)  # warm the per-Pipeline key parts

        def rerun() -> None:
            result = p.run(progress=False)
            assert len(result.status) == n and result.status[f"s0_{0}"] == "cached"

        def fresh_rerun() -> None:
            pk.Pipeline.from_config(config).run(progress=False)

        def explain() -> None:
            p.explain()

        t_parse_validate = best(validate, opts.repeat)
        fresh = [pk.Pipeline.from_config(config) for _ in range(opts.repeat)]
        t_validate = best(lambda: fresh.pop().validate(), opts.repeat)
        t_rerun = best(rerun, opts.repeat)
        t_fresh = best(fresh_rerun, opts.repeat)
        t_explain = best(explain, opts.repeat)
        p.run(progress=False)["s0_0"]  # a lazy output loads on access

    print(f"{n}-stage layered pipeline, sync scheduler, local cache")
    print(f"  first run (computes and writes {n} entries): {t_first * 1e3:8.1f} ms")
    print(f"  validate() alone:                          {t_validate * 1e3:8.1f} ms")
    print(
        f"  no-op re-run, same Pipeline:               {t_rerun * 1e3:8.1f} ms  "
        f"= {t_rerun / t_validate:.2f}x validate (target <= 2x)"
    )
    print(
        f"  no-op re-run, fresh Pipeline (parse+validate+run): {t_fresh * 1e3:.1f} ms  "
        f"= {t_fresh / t_parse_validate:.2f}x parse+validate"
    )
    print(f"  explain() (reads every manifest):          {t_explain * 1e3:8.1f} ms")

    import numpy as np
    import pandas as pd

    from pipekit.cache.fingerprint import value_token

    rows = opts.frame_mb * (1 << 20) // (8 * 4)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.random((rows, 4)), columns=list("abcd"))
    megabytes = frame.memory_usage(deep=True).sum() / (1 << 20)
    t_token = best(lambda: value_token(frame), 3)
    print(
        f"fingerprint (dask tokenize) of a {megabytes:.0f} MB DataFrame: {t_token:.3f} s "
        f"= {megabytes / t_token:,.0f} MB/s"
    )


if __name__ == "__main__":
    main()
