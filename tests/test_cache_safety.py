"""The stage cache never gives a wrong result and never deletes what is not its own.

Each test pins one case of issue 9 (and issue 8 section 4): constants of every kind in
the code fingerprint, values that cannot be fingerprinted, a code walk cut off at
MAX_OBJECTS, checksums of stored values, clear/prune only in pipekit's own cache
directory, cached outputs loaded only when needed, and fsspec errors as config errors.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from conftest import make, run_pipekit

import pipekit.cache.fingerprint as fingerprint
from pipekit.cache.store import FOLDERS, MARKER, CacheStore, open_store
from pipekit.core.events import Observer
from pipekit.core.text import human_size
from pipekit.errors import CacheConfigError, CacheEntryError, CacheWarning

LOCAL = {"backend": "local", "path": ".pipekit/cache"}


def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, stem: str) -> str:
    """Write a module of the user's project (unique name per test) and make it importable."""
    name = f"{stem}_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source).replace("NAME", name))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return name


def rewrite(tmp_path: Path, name: str, old: str, new: str) -> None:
    """Edit the module's file and reload it, as `%autoreload` would after an edit."""
    path = tmp_path / f"{name}.py"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    importlib.invalidate_caches()
    importlib.reload(sys.modules[name])


def stage_entries(store: CacheStore, stage: str) -> list[dict]:
    return [m for m in store.entries() if m.get("stage") == stage]


# --- 1. every constant a stage reads is part of its key ---------------------------------

CONSTANTS = {
    "list": (
        'FEATURES = ["a", "b"]\n\ndef stage():\n    return list(FEATURES)\n',
        '"b"]',
        '"c"]',
        "FEATURES",
    ),
    "nested dict with a frozenset": (
        'SPEC = {"cols": ["a", ("b", 1)], "opts": {"keep": frozenset({"x", "y"})}}\n\n'
        'def stage():\n    return sorted(SPEC["opts"]["keep"])\n',
        '"y"}',
        '"z"}',
        "SPEC",
    ),
    "enum member": (
        "import enum\n\nclass Mode(enum.Enum):\n    FAST = 1\n    SLOW = 2\n\nMODE = Mode.FAST\n\n"
        "def stage():\n    return MODE.value\n",
        "FAST = 1",
        "FAST = 3",
        "MODE",
    ),
    "dataclass instance": (
        "import dataclasses\n\n@dataclasses.dataclass(frozen=True)\nclass Cfg:\n    n: int\n"
        '    tags: tuple\n\nCFG = Cfg(3, ("a",))\n\ndef stage():\n    return list(CFG.tags)\n',
        '("a",)',
        '("b",)',
        "CFG",
    ),
    "class attribute": (
        'class Settings:\n    COLUMNS = ["a"]\n\ndef stage():\n    return list(Settings.COLUMNS)\n',
        '["a"]',
        '["a", "b"]',
        "COLUMNS",
    ),
    "closure": (
        'def make():\n    cols = ["a"]\n\n    def stage():\n        return list(cols)\n\n'
        "    return stage\n\nstage = make()\n",
        None,  # mutated in place: reloading would make a new function, not a new closure
        "q",
        "<closure cols>",
    ),
    "constant of an imported project module": (
        "import NAME_helpers as helpers\n\ndef stage():\n    return list(helpers.FEATURES)\n",
        None,
        None,
        "FEATURES",
    ),
}


@pytest.mark.parametrize("kind", list(CONSTANTS))
def test_a_changed_constant_of_any_kind_changes_the_key(tmp_path, monkeypatch, kind):
    source, old, new, shown = CONSTANTS[kind]
    helpers = None
    if old is None and new is None:  # the constant lives in a second module the stage imports
        helpers = module(tmp_path, monkeypatch, 'FEATURES = ["a", "b"]\n', "consts")
        source = source.replace("NAME_helpers", helpers)
    name = module(tmp_path, monkeypatch, source, "stages")
    stages = {"s": {"_target_": f"{name}.stage"}}
    first = make(stages, cache=LOCAL).run(progress=False)
    assert make(stages, cache=LOCAL).explain()["s"].action == "cached"

    if helpers is not None:
        rewrite(tmp_path, helpers, '"b"]', '"c"]')
    elif old is None:
        sys.modules[name].stage.__closure__[0].cell_contents.append(new)
    else:
        rewrite(tmp_path, name, old, new)
    plan = make(stages, cache=LOCAL).explain()["s"]
    assert plan.action == "run", f"{kind}: a changed constant left the stage cached"
    assert plan.reason.startswith("code changed:") and shown in plan.reason
    again = make(stages, cache=LOCAL).run(progress=False)
    assert again.status["s"] == "done" and again["s"] != first["s"]


def test_a_constant_mutated_in_place_is_noticed_and_tokens_are_stable(tmp_path, monkeypatch):
    """A notebook appends to a list: the next plan sees it. The token of a set does not
    depend on string hashing, so another process (another PYTHONHASHSEED) gets a hit."""
    name = module(
        tmp_path,
        monkeypatch,
        'WORDS = frozenset({"alpha", "beta", "gamma", "delta"})\nCOLS = ["a"]\n\n'
        "def stage():\n    return sorted(WORDS) + COLS\n",
        "inplace",
    )
    stages = {"s": {"_target_": f"{name}.stage"}}
    make(stages, cache=LOCAL).run(progress=False)
    for seed in ("1", "2"):
        script = (
            f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import pipekit as pk\n"
            f"p = pk.Pipeline.from_config({{'name': 't', 'cache': {LOCAL!r}, "
            f"'stages': {{'s': {{'_target_': '{name}.stage'}}}}}})\n"
            f"print(p.explain()['s'].action)\n"
        )
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert proc.stdout.strip() == "cached", proc.stderr
    sys.modules[name].COLS.append("b")
    plan = make(stages, cache=LOCAL).explain()["s"]
    assert (plan.action, plan.reason) == ("run", "code changed: COLS")


def test_a_helper_behind_functools_cache_is_walked(tmp_path, monkeypatch):
    """A decorator's wrapper object (`@functools.cache`) hides no code from the key."""
    name = module(
        tmp_path,
        monkeypatch,
        "import functools\n\n@functools.cache\ndef helper(x):\n    return x + 1\n\n"
        "def stage():\n    return helper(1)\n",
        "memo",
    )
    stages = {"s": {"_target_": f"{name}.stage"}}
    assert make(stages, cache=LOCAL).run(progress=False)["s"] == 2
    rewrite(tmp_path, name, "x + 1", "x + 5")
    plan = make(stages, cache=LOCAL).explain()["s"]
    assert (plan.action, plan.reason) == ("run", "code changed: helper")
    assert make(stages, cache=LOCAL).run(progress=False)["s"] == 6


# --- 1b. a value that cannot be fingerprinted: not cacheable, said once -----------------

OPAQUE = {
    "lock": ("import threading\nSTATE = threading.Lock()\n", "STATE is a _thread.lock"),
    "open file": ("STATE = open(__file__)\n", "STATE is a _io.TextIOWrapper"),
    "object holding a lock": (
        "import threading\n\nclass Holder:\n    def __init__(self):\n"
        "        self.guard = threading.RLock()\n\nSTATE = Holder()\n",
        "STATE is a _thread.RLock at ['guard']",
    ),
}


@pytest.mark.parametrize("kind", list(OPAQUE))
def test_a_value_without_a_token_makes_the_stage_run_every_time(tmp_path, monkeypatch, kind):
    setup, problem = OPAQUE[kind]
    name = module(
        tmp_path, monkeypatch, setup + "\ndef stage(x=1):\n    assert STATE\n    return x\n", "op"
    )
    stages = {
        "s": {"_target_": f"{name}.stage"},
        "after": {"_target_": "add", "inputs": {"a": "s"}},
    }
    reason = f"not cacheable: {name}.{problem}"
    with pytest.warns(CacheWarning) as caught:
        first = make(stages, cache=LOCAL).run(executor="sync", progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1 and f"stage 's' is {reason}" in messages[0]
    assert "stages.s.cache=false" in messages[0]
    assert first.status == {"s": "done", "after": "done"} and first["after"] == 1

    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # said once per process, not per run
        again = make(stages, cache=LOCAL).run(executor="sync", progress=False)
        plan = make(stages, cache=LOCAL).explain()
    assert again.status == {"s": "done", "after": "done"}
    assert again.reasons == {"s": reason, "after": "upstream not cached: s"}
    assert [(p.stage, p.action, p.reason) for p in plan] == [
        ("s", "run", reason),
        ("after", "run", "upstream not cached: s"),
    ]
    assert stage_entries(make(stages, cache=LOCAL).cache_store(), "s") == []


# --- 2. a code walk cut off at MAX_OBJECTS ----------------------------------------------

CHAIN = """
def h4(x):
    return x + 4


def h3(x):
    return h4(x) + 3


def h2(x):
    return h3(x) + 2


def h1(x):
    return h2(x) + 1


def stage(x=0):
    return h1(x)
"""


def test_a_code_walk_cut_off_at_max_objects_is_never_cached(tmp_path, monkeypatch):
    name = module(tmp_path, monkeypatch, CHAIN, "chain")
    stages = {"s": {"_target_": f"{name}.stage"}}
    monkeypatch.setattr(fingerprint, "MAX_OBJECTS", 3)  # stage, h1, h2: h3 and h4 unseen
    with pytest.warns(
        CacheWarning,
        match=r"stage 's' is not cacheable: code walk stopped at "
        r"MAX_OBJECTS=3 .*raise pipekit\.cache\.fingerprint\.MAX_OBJECTS",
    ):
        assert make(stages, cache=LOCAL).run(progress=False)["s"] == 10
    rewrite(tmp_path, name, "x + 4", "x + 40")  # a helper beyond the limit changes
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # said once
        result = make(stages, cache=LOCAL).run(progress=False)
        plan = make(stages, cache=LOCAL).explain()["s"]
    assert result.status["s"] == "done" and result["s"] == 46
    assert plan.action == "run" and plan.reason.startswith(
        "not cacheable: code walk stopped at MAX_OBJECTS=3 functions and classes"
    )

    monkeypatch.setattr(fingerprint, "MAX_OBJECTS", 5)  # exactly enough: cacheable again
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        make(stages, cache=LOCAL).run(progress=False)
        assert make(stages, cache=LOCAL).run(progress=False).status["s"] == "cached"


# --- 3. stored values are verified on load ----------------------------------------------


def test_value_files_swapped_on_disk_are_never_loaded_as_each_others_output(tmp_path):
    stages = {
        "a": {"_target_": "const", "params": {"value": 1}},
        "b": {"_target_": "const", "params": {"value": 2}},
        "use_a": {"_target_": "add", "inputs": {"a": "a"}},
    }
    make(stages, cache=LOCAL).run(progress=False)
    store = make(stages, cache=LOCAL).cache_store()
    (a,), (b,) = stage_entries(store, "a"), stage_entries(store, "b")
    path_a = Path(store.values_dir, f"{a['key']}.pkl")
    path_b = Path(store.values_dir, f"{b['key']}.pkl")
    data_a, data_b = path_a.read_bytes(), path_b.read_bytes()
    assert len(data_a) == len(data_b) and data_a != data_b  # same size: sizes cannot tell
    path_a.write_bytes(data_b)
    path_b.write_bytes(data_a)

    # `a` is needed as an input: found out while loading, recomputed and replaced
    with pytest.warns(CacheWarning, match="stage 'a': cache entry .* fails its blake2b checksum"):
        result = make(stages, cache=LOCAL).run(force=["use_a"], progress=False)
    assert result.status["a"] == "done" and result.reasons["a"] == "corrupt entry replaced"
    assert result["use_a"] == 1 and result["a"] == 1
    # `b` is read by the caller after the run: an error naming it, never a's value
    with pytest.raises(CacheEntryError, match="stage 'b': its cached output is unusable"):
        result["b"]
    again = make(stages, cache=LOCAL).run(progress=False)
    assert again.status["b"] == "done" and again["b"] == 2 and again["a"] == 1
    digest = hashlib.blake2b(path_a.read_bytes(), digest_size=32).hexdigest()
    assert store.manifest(a["key"])["checksum"] == f"blake2b:{digest}"


def test_an_entry_without_a_checksum_is_recomputed(tmp_path):
    stages = {"a": {"_target_": "const", "params": {"value": 7}}}
    make(stages, cache=LOCAL).run(progress=False)
    store = make(stages, cache=LOCAL).cache_store()
    (entry,) = stage_entries(store, "a")
    manifest = Path(store.entries_dir, f"{entry['key']}.json")
    manifest.write_text(manifest.read_text().replace('"checksum"', '"was_checksum"'))
    with pytest.warns(CacheWarning, match="has no blake2b checksum"):
        result = make(stages, cache=LOCAL).run(observers=[_Wants()], progress=False)
    assert result.status["a"] == "done" and result["a"] == 7
    assert store.manifest(entry["key"])["checksum"].startswith("blake2b:")


class _Wants(Observer):
    """An observer that wants outputs, so cached outputs load during the run."""

    wants_outputs = True


# --- 4. clear and prune touch only pipekit's own files ----------------------------------


def cache_dir(tmp_path: Path) -> Path:
    """A real cache made by a run: 3 entries, the marker file, last pointers."""
    stages = {
        "a": {"_target_": "const", "params": {"value": 1}},
        "b": {"_target_": "add", "inputs": {"a": "a"}},
        "c": {"_target_": "add", "inputs": {"a": "b"}},
    }
    make(stages, cache={"backend": "local", "path": str(tmp_path / "cache")}).run(progress=False)
    return tmp_path / "cache"


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("pipekit: error: ")
    return lines[0]


def test_clear_and_prune_refuse_a_cache_with_a_file_pipekit_did_not_write(tmp_path, cli_env):
    cache = cache_dir(tmp_path)
    thesis = cache / "values" / "thesis.tex"
    thesis.write_text("\\chapter{Five years of work}\n")
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    for action in (["clear", "--yes"], ["prune", "--max-size", "1"]):
        proc = run_pipekit("cache", *action, "--path", str(cache), env=cli_env, cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        line = one_error_line(proc)
        assert f"refusing to {action[0]} {cache}" in line and "values/thesis.tex" in line
        assert "nothing was removed" in line
    assert thesis.read_text() == "\\chapter{Five years of work}\n"
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before


def test_clear_refuses_root_home_and_directories_that_are_not_a_pipekit_cache(tmp_path, cli_env):
    home = tmp_path / "home"
    cache = cache_dir(home)  # even a real cache right in the home directory
    (home / MARKER).write_text("pipekit cache\nformat 2\n")
    for folder in ("entries", "values"):
        (home / folder).mkdir()
    env = {**cli_env, "HOME": str(home)}
    for path in ("/", "~", str(home)):
        proc = run_pipekit("cache", "clear", "--yes", "--path", path, env=env, cwd=tmp_path)
        assert proc.returncode == 2 and "root or home directory" in one_error_line(proc)

    # pipekit-looking file names, but no marker and no pipekit manifest: not ours
    stranger = tmp_path / "stranger"
    (stranger / "values").mkdir(parents=True)
    (stranger / "values" / f"{'ab' * 16}.pkl").write_bytes(b"someone's data")
    proc = run_pipekit("cache", "clear", "--yes", "--path", str(stranger), env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"it is not a pipekit cache (no {MARKER} file)" in one_error_line(proc)
    assert (stranger / "values" / f"{'ab' * 16}.pkl").read_bytes() == b"someone's data"

    proc = run_pipekit("cache", "prune", "--path", str(tmp_path / "nowhere"), env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "there is no cache at" in one_error_line(proc)
    assert len(CacheStore(str(cache)).keys()) == 3  # nothing was touched


def test_clear_removes_only_pipekit_files_and_says_what_it_removed(tmp_path, cli_env):
    cache = cache_dir(tmp_path)
    (cache / "README.txt").write_text("notes beside the cache folders are not touched\n")
    files = [p for folder in FOLDERS for p in (cache / folder).rglob("*") if p.is_file()]
    others = sorted(p for p in cache.rglob("*") if p.is_file() and p not in files)
    assert cache / "README.txt" in others and cache / MARKER in others
    size = sum(p.stat().st_size for p in files)
    proc = run_pipekit("cache", "clear", "--yes", "--path", str(cache), env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"cache {cache}: removed 3 entries, {len(files)} files ({human_size(size)})"
    )
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == others  # e.g. run locks stay
    assert not any((cache / folder).exists() for folder in FOLDERS)


def test_a_cache_from_before_the_marker_file_is_adopted(tmp_path, cli_env):
    cache = cache_dir(tmp_path)
    (cache / MARKER).unlink()  # as written by an older pipekit
    proc = run_pipekit(
        "cache", "prune", "--max-size", "0", "--path", str(cache), env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "is a cache from an older pipekit (no marker file); adopted it" in proc.stderr
    assert "removed 3 entries, 6 files" in proc.stdout
    assert (cache / MARKER).read_text() == "pipekit cache\nformat 2\n"


# --- 5. a cached re-run loads only the outputs something needs --------------------------

HEAVY = """
import os


def _loaded(payload):
    with open(os.environ["HEAVY_LOADS"], "a") as log:
        log.write("load\\n")
    return Heavy(payload)


class Heavy:
    '''A big output that records every unpickling in the file $HEAVY_LOADS.'''

    def __init__(self, payload):
        self.payload = payload

    def __reduce__(self):
        return (_loaded, (self.payload,))


def big(megabytes=50):
    return Heavy(b"x" * (megabytes << 20))


def size(h):
    return {"megabytes": len(h.payload) / (1 << 20)}
"""


def test_a_cached_rerun_with_tracking_does_not_unpickle_a_big_output(
    tmp_path, cli_env, monkeypatch
):
    pytest.importorskip("mlflow")
    (tmp_path / "heavy_stages.py").write_text(HEAVY)
    conf = tmp_path / "conf" / "pipeline"
    conf.mkdir(parents=True)
    (conf / "heavy.yaml").write_text(
        "# @package _global_\nname: heavy\nstages:\n"
        "  big:\n    _target_: heavy_stages.big\n    model: true\n"
        "  size:\n    _target_: heavy_stages.size\n    inputs: {h: big}\n"
    )
    loads = tmp_path / "loads.log"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**cli_env, "HEAVY_LOADS": str(loads)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["run", "-cd", "conf", "pipeline=heavy", "tracking=local", f"tracking.uri={uri}"]

    # the run that computes hands the model to the MLflow writer process, which loads it
    # once to log it; the cached run loads nothing (its version is found by cache key)
    def loaded() -> int:
        return len(loads.read_text().split()) if loads.exists() else 0

    for attempt, allowed in (("computes", 1), ("cached", 0)):
        before = loaded()
        proc = run_pipekit(*args, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "size: megabytes=50" in proc.stdout  # metrics printed, also when cached
        assert loaded() - before <= allowed, f"the run that {attempt} unpickled the output"
    loads.unlink(missing_ok=True)
    assert "2 cached" in proc.stderr and "tracked in MLflow run" in proc.stderr

    # the Python door: nothing loaded by the run, exactly one load when the caller reads it
    monkeypatch.setenv("HEAVY_LOADS", str(loads))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import pipekit as pk

    result = pk.load(
        "heavy", overrides=["tracking=local", f"tracking.uri={uri}"], config_dir=tmp_path / "conf"
    ).run(progress=False)
    assert set(result.status.values()) == {"cached"} and not loads.exists()
    assert len(result["big"].payload) == 50 << 20
    assert loads.read_text().split() == ["load"]


# --- 6. fsspec failures are config errors naming cache.url ------------------------------


def test_an_fsspec_url_that_cannot_open_is_a_config_error(tmp_path, cli_env):
    url = f"zip://inner::file://{tmp_path}/missing.zip"
    with pytest.raises(CacheConfigError, match=r"cache\.url 'zip://inner::file://.*FileNotFound"):
        open_store({"backend": "fsspec", "url": url})
    for bad in (url, "nosuch://x"):
        proc = run_pipekit("cache", "ls", "--url", bad, env=cli_env, cwd=tmp_path)
        assert proc.returncode == 2 and "cache.url" in one_error_line(proc)
