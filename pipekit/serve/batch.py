"""`pipekit predict input=<csv|parquet> output=<parquet>`: batch scoring by Dask partitions.

One low-level Dask graph with one task per partition: the task reads its partition (a
byte range of the CSV, aligned to line ends, parsed with the signature's dtypes as the
server parses `text/csv`; or a run of Parquet row groups), scores it with the same
exported pyfunc the server answers with, and writes it as its own Parquet part
(`part-00000.parquet`, ...). Only row counts travel back to this process, so no process
holds the whole input, and the parts in file order are the rows in input order: batch
equals online row for row.

Each worker loads the model once: threads share it; with `executor=processes` the pool
is forked from this process after the model is loaded (on POSIX), so workers start with
it in memory instead of importing MLflow and loading it again. A CSV field holding a
quoted line break would be cut at a partition edge: such files should be Parquet.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.serving import ServeSpec
from ..core.spec import PipelineSpec
from ..errors import ServeConfigError, ServingError

#: The file that marks an output directory as pipekit's (`--overwrite` replaces only those).
MARKER = "_pipekit_predict.json"
#: Schedulers batch prediction runs on.
SCHEDULERS = ("sync", "threads", "processes")
#: The models loaded in this process, by local path (shared by threads, inherited by forks).
_MODELS: dict[str, Any] = {}


@dataclass(frozen=True)
class Scored:
    """What a batch prediction wrote: rows, parts, the model version, the time taken."""

    output: str
    rows: int
    parts: int
    name: str
    version: str
    chosen: str
    seconds: float

    def __str__(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        return (
            f"scored {self.rows} rows with {self.name} v{self.version} ({self.chosen}) into "
            f"{self.output} ({self.parts} parts, {self.seconds:.1f} s, {rate:,.0f} rows/s)"
        )


@dataclass(frozen=True)
class Part:
    """One partition: a byte range of a CSV file, or row groups of a Parquet file."""

    path: str
    start: int = 0
    length: int = 0
    row_groups: tuple[int, ...] = ()


def score(
    spec: PipelineSpec,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    **options: Any,
) -> Scored:
    """`predict` for a pipeline: its `serve` section, tracking store and executor.

    `options` are `predict`'s (version, alias, keep, overwrite, partition_size, and
    scheduler/num_workers, which default to the `executor` section).
    """
    from ..core.serving import check_serve
    from .registry import tracking_uri

    serve = check_serve(spec)
    if serve is None:
        raise ServeConfigError(
            f"pipeline '{spec.name}': has no 'serve' section; declare the inference DAG "
            f"under serve.stages (see docs/serving.md)"
        )
    executor = spec.section("executor")
    options.setdefault("scheduler", executor.get("scheduler") or "threads")
    options.setdefault("num_workers", executor.get("num_workers"))
    return predict(tracking_uri(spec), serve, input, output, **options)


def predict(
    uri: str,
    serve: ServeSpec,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    version: str | None = None,
    alias: str | None = None,
    scheduler: str = "threads",
    num_workers: int | None = None,
    keep: Sequence[str] = (),
    overwrite: bool = False,
    partition_size: int | None = None,
) -> Scored:
    """Score file `input` into the Parquet directory `output` with `<pipeline>.serving`
    at `version`, or where `alias` (default `serve.alias`) points, else the latest.

    `keep` names input columns copied beside the predictions (ids, keys).
    """
    if scheduler not in SCHEDULERS:
        raise ServeConfigError(
            f"pipeline '{serve.pipeline}': executor.scheduler '{scheduler}' cannot score a "
            f"file; batch prediction runs on {', '.join(SCHEDULERS)}"
        )
    source, target = Path(input), Path(output)
    workers = num_workers or os.cpu_count() or 1
    parts, columns, kind = _partitions(source, partition_size, workers)
    absent = [c for c in keep if c not in columns]
    if absent:
        raise ServingError(
            f"--keep column '{absent[0]}' is not in {source} (columns: "
            f"{', '.join(map(str, columns[:20]))})"
        )
    _check_output(target, overwrite)
    started = time.perf_counter()
    from ..tracking.client import http_limits
    from .registry import open_client, serving_version

    with http_limits():
        client = open_client(uri)
        if version:
            chosen = f"version {version}"
        else:
            version, chosen = serving_version(client, serve.model_name, alias or serve.alias)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:  # written beside the target, then moved into place: no half output is left
        with tempfile.TemporaryDirectory(prefix="pipekit-predict-") as tmp:
            path, model = _download(client, uri, serve.model_name, str(version), tmp)
            schema = model.metadata.get_input_schema()
            named = schema is not None and schema.has_input_names()
            names = tuple(schema.input_names()) if named else ()
            dtypes = dict(zip(names, schema.pandas_types(), strict=True)) if named else {}
            job = Job(path, kind, columns, dtypes, names, tuple(keep), str(staging))
            try:
                rows = _compute(job, parts, scheduler, workers)
            except (ServingError, KeyboardInterrupt):
                raise
            except Exception as exc:  # a partition MLflow's schema or the model rejects
                from .model import reason

                raise ServingError(
                    f"scoring {source} with {serve.model_name} v{version} failed: {reason(exc)}"
                ) from exc
            finally:
                _MODELS.pop(path, None)
        seconds = time.perf_counter() - started
        done = Scored(
            str(target), rows, len(parts), serve.model_name, str(version), chosen, seconds
        )
        record = {**done.__dict__, "input": str(source.resolve()), "written": _now()}
        (staging / MARKER).write_text(json.dumps(record, indent=2))
        if target.exists():
            shutil.rmtree(target)  # a previous output of ours, and --overwrite (checked)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return done


# --- partitions -------------------------------------------------------------------------------


def _partitions(
    source: Path, partition_size: int | None, workers: int
) -> tuple[list[Part], list[str], str]:
    """The partitions of `source`, its column names, and its kind (csv or parquet)."""
    if not source.exists():
        raise ServingError(f"input {source} does not exist")
    name = source.name.lower()
    if source.is_file() and name.endswith((".csv", ".txt")):
        return _csv_partitions(source, partition_size, workers)
    if source.is_dir() or name.endswith((".parquet", ".pq", ".parq")):
        return _parquet_partitions(source, partition_size, workers)
    raise ServingError(
        f"input {source}: cannot tell its format from '{source.suffix}'; use a .csv or "
        f".parquet file (or a directory of Parquet files)"
    )


def _blocksize(size: int, workers: int) -> int:
    """About 4 partitions per worker, each at least 1 MiB and at most 64 MiB."""
    return int(min(64 * 2**20, max(2**20, size // (4 * workers) + 1)))


def _csv_partitions(
    source: Path, partition_size: int | None, workers: int
) -> tuple[list[Part], list[str], str]:
    import csv

    size = source.stat().st_size
    with source.open("rb") as f:
        header = f.readline()
    try:
        columns = next(csv.reader([header.decode("utf-8")]))
    except (UnicodeDecodeError, StopIteration, csv.Error) as exc:
        raise ServingError(f"input {source} has no readable CSV header line: {exc}") from exc
    block = partition_size or _blocksize(size, workers)
    parts = [Part(str(source), start, min(block, size - start)) for start in range(0, size, block)]
    return parts, columns, "csv"  # the first part holds the header line too


def _parquet_partitions(
    source: Path, partition_size: int | None, workers: int
) -> tuple[list[Part], list[str], str]:
    import pyarrow.parquet as pq

    files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    files = [f for f in files if not f.name.startswith(("_", "."))]
    if not files:
        raise ServingError(f"input {source} holds no .parquet files")
    try:
        metas = [pq.read_metadata(f) for f in files]
    except Exception as exc:
        raise ServingError(f"input {source} cannot be read as Parquet: {exc}") from exc
    total = sum(m.row_group(i).total_byte_size for m in metas for i in range(m.num_row_groups))
    block = partition_size or _blocksize(total, workers)
    parts = []
    for path, meta in zip(files, metas, strict=True):
        group: list[int] = []
        size = 0
        for i in range(meta.num_row_groups):
            group.append(i)
            size += meta.row_group(i).total_byte_size
            if size >= block:
                parts.append(Part(str(path), row_groups=tuple(group)))
                group, size = [], 0
        if group or not parts:
            parts.append(Part(str(path), row_groups=tuple(group)))
    return parts, list(metas[0].schema.to_arrow_schema().names), "parquet"


# --- scoring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What every partition task needs (small and picklable: it travels to the workers)."""

    model: str
    kind: str
    columns: list[str]
    dtypes: dict[str, Any]
    names: tuple[str, ...]
    keep: tuple[str, ...]
    out: str


def _score_part(job: Job, index: int, part: Part) -> int:
    """Read, score and write partition `index`; its row count (0: no part file)."""
    import pandas as pd

    from .model import as_frame

    frame = _read(job, part)
    if frame.empty:
        return 0
    model = _MODELS.get(job.model)
    if model is None:
        import mlflow.pyfunc

        model = _MODELS[job.model] = mlflow.pyfunc.load_model(job.model)
    rows = frame[[c for c in frame.columns if c in job.names]] if job.names else frame
    out = as_frame(model.predict(rows))
    if job.keep:
        out = pd.concat([frame[list(job.keep)].reset_index(drop=True), out], axis=1)
    out.to_parquet(os.path.join(job.out, f"part-{index:05d}.parquet"), index=False)
    return len(out)


def _read(job: Job, part: Part) -> Any:
    import pandas as pd

    if job.kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(part.path).read_row_groups(list(part.row_groups)).to_pandas()
    from fsspec.utils import read_block

    with open(part.path, "rb") as f:  # whole lines: a block starts after a newline
        data = read_block(f, part.start, part.length, delimiter=b"\n")
    if part.start == 0:
        data = data.partition(b"\n")[2]  # the header line
    if not data.strip():
        return pd.DataFrame(columns=job.columns)
    dtypes = {c: t for c, t in job.dtypes.items() if c in job.columns}
    return pd.read_csv(io.BytesIO(data), header=None, names=job.columns, dtype=dtypes or None)


def _download(client: Any, uri: str, name: str, version: str, tmp: str) -> tuple[str, Any]:
    import mlflow.pyfunc

    from .registry import download

    try:
        path = download(client, uri, name, version, tmp)
    except Exception as exc:
        raise ServingError(f"{name} v{version} cannot be downloaded from {uri}: {exc}") from exc
    model = mlflow.pyfunc.load_model(path)
    try:  # warm up here: what the first predict imports, forked workers then inherit
        example = model.input_example
    except Exception:
        example = None
    if example is not None:
        model.predict(example)
    _MODELS[path] = model
    return path, model


def _compute(job: Job, parts: list[Part], scheduler: str, workers: int) -> int:
    """One task per partition in one low-level graph, on Dask's local scheduler; rows."""
    import dask

    dsk: dict[Any, Any] = {
        ("score", i): (_score_part, job, i, part) for i, part in enumerate(parts)
    }
    keys = list(dsk)
    if scheduler == "sync":
        counts = dask.get(dsk, keys)
    elif scheduler == "threads":
        from dask.threaded import get

        counts = get(dsk, keys, num_workers=workers)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from dask.multiprocessing import get

        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        if "fork" in methods:  # what the tasks import, imported once here, not per worker
            import fsspec.utils  # noqa: F401
            import pyarrow.parquet  # noqa: F401

            from . import model  # noqa: F401
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            counts = get(dsk, keys, pool=pool, chunksize=1)
    return int(sum(counts))


# --- writing ------------------------------------------------------------------------------------


def _check_output(target: Path, overwrite: bool) -> None:
    """Refuse to write over anything that is not a previous batch output of pipekit."""
    if not target.exists():
        return
    ours = target.is_dir() and (target / MARKER).is_file()
    if ours and overwrite:
        return
    if ours:
        raise ServingError(
            f"output {target} exists (an earlier `pipekit predict`); pass --overwrite to "
            f"replace it, or choose another path"
        )
    raise ServingError(
        f"output {target} exists and is not a pipekit prediction directory; choose another "
        f"path (pipekit replaces only its own outputs, with --overwrite)"
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
