"""The stage cache against real processes: kill -9 mid-write, two runs at once, sweeps."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_pipekit

from pipekit.cache.store import CacheStore

MEGABYTES = 48
STAGES = ("s1", "s2", "s3", "s4")

RUNNER = f"""
import json, sys, warnings
import pipekit as pk
from pipekit.errors import CacheWarning

warnings.simplefilter("error", CacheWarning)  # reading a corrupt entry fails the test
cache, force, paused, marker = sys.argv[1], sys.argv[2] == "force", sys.argv[3], sys.argv[4]
stages = {{}}
for i, name in enumerate({STAGES!r}, start=1):
    params = {{"megabytes": {MEGABYTES}, "fill": i}}
    if name == paused:
        params["marker"] = marker
    stage = {{"_target_": "core_stages.blob", "params": params}}
    if i > 1:
        stage["inputs"] = {{"x": f"s{{i - 1}}"}}
    stages[name] = stage
p = pk.Pipeline.from_config(
    {{"name": "big", "stages": stages, "cache": {{"backend": "local", "path": cache}},
     "executor": {{"scheduler": "threads"}}}}
)
p.validate()
print("ready", flush=True)
r = p.run(progress=False, force=force)
data = {{s: r[s][0] if isinstance(r[s], list) else r[s] for s in stages}}
print(json.dumps({{s: [r.status[s], len(v), v[:1].hex(), v[-1:].hex()] for s, v in data.items()}}))
"""


def expected_outputs() -> dict[str, list]:
    size = MEGABYTES << 20
    return {s: [size, f"{i:02x}", f"{i:02x}"] for i, s in enumerate(STAGES, start=1)}


def start(
    tmp_path: Path, env: dict, cache: Path, force: bool = False, paused: str = "", marker: str = ""
) -> subprocess.Popen:
    runner = tmp_path / "runner.py"
    if not runner.exists():
        runner.write_text(RUNNER)
    return subprocess.Popen(
        [sys.executable, str(runner), str(cache), "force" if force else "normal", paused, marker],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )


def finish(proc: subprocess.Popen) -> dict[str, list]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def assert_every_entry_whole(cache: Path) -> int:
    """Every committed entry has its whole value and the right content."""
    store = CacheStore(str(cache))
    keys = store.keys()
    for key in keys:
        manifest = store.manifest(key)
        assert manifest is not None, f"unreadable manifest {key}"
        assert store.check(key, manifest) is None, store.check(key, manifest)
        value = store.load(key, manifest)
        value = value[0] if isinstance(value, list) else value
        fill = STAGES.index(manifest["stage"]) + 1
        assert len(value) == MEGABYTES << 20 and value[:1] == value[-1:] == bytes([fill])
    return len(keys)


def test_kill_9_mid_write_never_leaves_a_readable_half_entry(tmp_path, cli_env):
    """Killed while each stage's value file is half written (the stage's output announces
    the moment: no timing luck), the cache holds only whole entries; the next run
    recomputes what is missing and never reads the leftovers."""
    cache = tmp_path / "cache"
    for attempt, stage in enumerate(STAGES[:3]):
        marker = tmp_path / f"writing-{stage}"
        proc = start(tmp_path, cli_env, cache, force=attempt > 0, paused=stage, marker=str(marker))
        deadline = time.monotonic() + 90
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=30)[1]
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        half = [p for p in (cache / "values").iterdir() if p.name.startswith(".tmp-")]
        assert half and max(p.stat().st_size for p in half) >= MEGABYTES << 20  # mid-write
        assert_every_entry_whole(cache)
        store = CacheStore(str(cache))
        keys = store.keys()
        committed = {store.manifest(key)["stage"] for key in keys}
        assert committed == set(STAGES[: STAGES.index(stage)])  # the paused stage: no entry
    leftovers = {p.name for p in (cache / "values").iterdir() if p.name.startswith(".tmp-")}
    result = finish(start(tmp_path, cli_env, cache))
    assert {s: v[1:] for s, v in result.items()} == expected_outputs()
    assert assert_every_entry_whole(cache) == len(STAGES)
    assert leftovers <= {p.name for p in (cache / "values").iterdir()}  # never read or moved


def test_two_processes_share_one_cache_directory(tmp_path, cli_env):
    cache = tmp_path / "cache"
    first, second = start(tmp_path, cli_env, cache), start(tmp_path, cli_env, cache)
    for result in (finish(first), finish(second)):
        assert {s: v[1:] for s, v in result.items()} == expected_outputs()
    assert assert_every_entry_whole(cache) == len(STAGES)
    third = finish(start(tmp_path, cli_env, cache))
    assert {v[0] for v in third.values()} == {"cached"}


def test_hydra_multirun_jobs_reuse_upstream_entries(tmp_path, cli_env):
    """With Hydra's own multirun (here chosen by asking for a sweep directory; merged
    sweeps share stages inside one graph instead) each job reuses the cache of the last."""
    proc = run_pipekit(
        "run",
        "-m",
        "stages.train.params.C=0.1,1",
        "tracking=off",
        "executor=sync",
        "hydra.sweep.dir=sweeps",
        env=cli_env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    jobs = proc.stderr.split("pipekit: running")[1:]
    assert len(jobs) == 2
    upstream = ("collect_a", "collect_b", "combine", "validate", "split", "features")
    for stage in upstream:
        assert f"{stage} done" in jobs[0]
        assert f"{stage} cached" in jobs[1]
    assert "train done" in jobs[1] and "(params changed: C 0.1 → 1)" in jobs[1]
    # the cache sits in the directory the sweep started in, not in Hydra's job dirs
    store = CacheStore(str(tmp_path / ".pipekit" / "cache"))
    trains = [m for m in store.entries() if m.get("stage") == "train"]
    assert sorted(m["params"]["C"] for m in trains) == [0.1, 1]
