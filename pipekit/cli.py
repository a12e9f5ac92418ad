"""The `pipekit` command: subcommands over Hydra.

`pipekit <command> [options] [hydra overrides and flags]`. Hydra commands compose the
config exactly as Hydra apps do (`-m` sweeps, `-cd/--config-dir`, `-cn/--config-name`,
`--cfg job`, `hydra/launcher=...`); errors print as one line unless `--verbose` or
`HYDRA_FULL_ERROR=1`. Exit codes: 0 ok, 1 a stage failed, 2 a config or usage error,
130/143 interrupted by SIGINT/SIGTERM (the run stopped cleanly: see `_Signals`).

Other modules add subcommands with `@command(...)`; handlers of Hydra commands receive
the composed `Pipeline`, the others only their parsed options.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import PipekitError, RunSkipped, did_you_mean

if TYPE_CHECKING:
    from .pipeline import Pipeline

EXIT_OK, EXIT_STAGE_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass
class Command:
    """A subcommand: its handler, its own options, and whether it composes a Hydra config."""

    name: str
    help: str
    handler: Callable[..., int]
    hydra: bool = True
    options: list[Callable[[argparse.ArgumentParser], None]] = field(default_factory=list)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *, hydra: bool = True) -> Callable[[Callable], Callable]:
    """Register a subcommand. Hydra handlers: `(pipeline, args) -> int`; others: `(args) -> int`."""

    def register(handler: Callable[..., int]) -> Callable[..., int]:
        COMMANDS[name] = Command(name, help, handler, hydra)
        return handler

    return register


def option(name: str) -> Callable[[Callable], Callable]:
    """Add options to subcommand `name`: the decorated function receives its parser."""

    def register(add: Callable[[argparse.ArgumentParser], None]) -> Callable:
        COMMANDS[name].options.append(add)
        return add

    return register


# --- the commands ------------------------------------------------------------------------


@command("run", "run the pipeline (all stages, or --targets and what they need)")
def _run(pipeline: Pipeline, args: argparse.Namespace) -> int:
    from .core.redact import scrub  # URL passwords stay out of terminals and CI logs
    from .display.progress import TextProgress

    if getattr(args, "explain", False):
        return _explain(pipeline, args)
    targets = _split(args.targets)
    progress = TextProgress(sys.stderr, report_interrupt=False)  # `main` reports it, once
    try:
        result = pipeline.run(
            targets=targets or None,
            observers=[] if args.quiet else [progress],
            progress=False,
            raise_on_failure=False,
            **_run_options(args),
        )
    except RunSkipped as skipped:  # `concurrency: skip` and the previous run still going
        sys.stderr.write(f"pipekit: {skipped}\n")
        return EXIT_OK
    for stage, metrics in result.metrics().items():  # cached ones from their manifests
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        print(f"{stage}: {shown}")
    tracking = result.tracking
    if "mlflow_run_id" in tracking and not args.quiet:
        sys.stderr.write(f"pipekit: {scrub(_tracked_where(tracking))}\n")
    tracking_error = tracking.get("tracking_error")
    if tracking_error:  # even with --quiet: a run missing from MLflow is never silent
        missing = (
            f"the run's results are incomplete in MLflow run {tracking['mlflow_run_id']}"
            if "mlflow_run_id" in tracking
            else "the run's results are not in MLflow"
        )
        sys.stderr.write(f"pipekit: tracking failed: {scrub(tracking_error)}; {missing}\n")
    if result.errors:
        first = result.errors[result.failed[0]]
        if args.verbose and first.traceback:
            sys.stderr.write(first.traceback)
        _error(str(first))
        return EXIT_STAGE_FAILED
    if tracking_error and tracking.get("on_error") == "fail":
        return EXIT_STAGE_FAILED  # tracking.on_error=fail
    return EXIT_OK


def _tracked_where(tracking: dict[str, str]) -> str:
    """Where the MLflow run is and how to open it: links to the parent run and to the
    experiment in the UI's "Model training" view, or the `mlflow ui` command first."""
    from .tracking.client import LOCAL_UI, ui_base, ui_links

    uri, experiment, run = (
        tracking["mlflow_uri"],
        tracking["mlflow_experiment_id"],
        tracking["mlflow_run_id"],
    )
    base = ui_base(uri)
    if base is not None:
        experiment_url, run_url = ui_links(base, experiment, run)
        return f"tracked in MLflow run {run}: {run_url} (experiment: {experiment_url})"
    _, run_url = ui_links(LOCAL_UI, experiment, run)  # `mlflow ui`'s address
    return (
        f"tracked in MLflow run {run} ({uri}) at {run_url}; "
        f"browse: mlflow ui --backend-store-uri {uri}"
    )


@option("run")
def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-t", "--targets", help="comma-separated stages to run (with their upstream)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--best",
        metavar="METRIC",
        help="with -m: rank sweep jobs by stage.key (evaluate.accuracy; :min for lowest)",
    )


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """Extra keyword arguments for Pipeline.run that other modules' options add."""
    return dict(getattr(args, "run_options", {}) or {})


# --- the stage cache: --force, --explain, `explain`, `cache ls|prune|clear` ----------------


class _Force(argparse.Action):
    """`--force` (every stage), `--force train,evaluate` or `--force=train`.

    A Hydra override right after a bare `--force` (`--force stages.x=1`) is handed back
    to Hydra instead of being read as stage names.
    """

    def __call__(self, parser: Any, namespace: Any, value: Any, option: Any = None) -> None:
        force: bool | list[str] = True
        if isinstance(value, str):
            if "=" in value or value[:1] in "+~" or "/" in value:
                namespace.hydra_extra = [*getattr(namespace, "hydra_extra", []), value]
            else:
                force = _split(value)
        options = dict(getattr(namespace, "run_options", None) or {})
        options["force"] = force
        namespace.run_options = options


def _cache_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        nargs="?",
        const=True,
        action=_Force,
        metavar="STAGES",
        help="recompute these comma-separated stages (and what depends on them); all if none",
    )


@option("run")
def _run_cache_arguments(parser: argparse.ArgumentParser) -> None:
    _cache_flags(parser)
    parser.add_argument(
        "--explain", action="store_true", help="print what would run and why; run nothing"
    )


@command("explain", "what a run would compute or take from the cache, and why")
def _explain(pipeline: Pipeline, args: argparse.Namespace) -> int:
    targets = _split(args.targets)
    print(pipeline.explain(targets or None, force=_run_options(args).get("force")))
    return EXIT_OK


@option("explain")
def _explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-t", "--targets", help="comma-separated stages (with their upstream)")
    _cache_flags(parser)


@command("cache", "list, prune or clear the stage cache (cache ls|prune|clear)", hydra=False)
def _cache(args: argparse.Namespace) -> int:
    from .cache.store import CacheStore, listing, open_store
    from .core.text import human_size, parse_duration, parse_size

    if args.url:
        store = open_store({"backend": "fsspec", "url": args.url})
    else:
        store = open_store({"backend": "local", "path": args.path})
    assert isinstance(store, CacheStore)
    if args.action == "ls":
        print(listing(store, _model_versions(store, args.uri)))
        return EXIT_OK
    if args.action == "prune":
        try:
            older = parse_duration(args.older_than) if args.older_than else None
            size = parse_size(args.max_size) if args.max_size else None
        except ValueError as exc:
            _error(str(exc))
            return EXIT_USAGE
        _adopted(store, args.action)
        removed = store.prune(older, size)
        left = store.entries()
        print(
            f"cache {store.display}: removed {removed.entries} entries, {removed.files} files "
            f"({human_size(removed.bytes)}); {len(left)} left "
            f"({human_size(sum(int(e.get('size') or 0) for e in left))})"
        )
        return EXIT_OK
    _adopted(store, args.action)  # not pipekit's directory: exit 2 before asking anything
    count = len(store.keys())
    if not args.yes:
        if not sys.stdin.isatty():
            _error(
                f"this removes all {count} entries of cache {store.display}; pass --yes to confirm"
            )
            return EXIT_USAGE
        answer = input(f"remove all {count} entries of cache {store.display}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return EXIT_OK
    removed = store.clear()
    print(
        f"cache {store.display}: removed {removed.entries} entries, {removed.files} files "
        f"({human_size(removed.bytes)})"
    )
    return EXIT_OK


def _adopted(store: Any, action: str) -> None:
    """`store.claim` for clear/prune, saying so when a cache from before the marker file
    was adopted (CacheNotOursError when the directory is not pipekit's)."""
    if store.claim(action):
        sys.stderr.write(
            f"pipekit: {store.display} is a cache from an older pipekit (no marker file); "
            f"adopted it\n"
        )


@option("cache")
def _cache_arguments(parser: argparse.ArgumentParser) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--path", default=".pipekit/cache", help="cache directory (default: .pipekit/cache)"
    )
    where.add_argument("--url", help="an fsspec URL instead of --path, e.g. s3://bucket/cache")
    actions = parser.add_subparsers(dest="action", metavar="{ls,prune,clear}", required=True)
    ls = actions.add_parser("ls", parents=[where], help="list entries: stage, key, size, age")
    ls.add_argument(
        "--uri",
        help="MLflow store whose model versions to show beside entries "
        "(default: $MLFLOW_TRACKING_URI, or ./mlflow.db when it exists)",
    )
    prune = actions.add_parser("prune", parents=[where], help="remove old entries")
    prune.add_argument("--older-than", metavar="AGE", help="e.g. 7d, 12h, 30m")
    prune.add_argument(
        "--max-size", metavar="SIZE", help="remove the oldest until at most SIZE, e.g. 1GB"
    )
    clear = actions.add_parser("clear", parents=[where], help="remove every entry")
    clear.add_argument("-y", "--yes", action="store_true", help="do not ask")


def _model_versions(store: Any, uri: str | None) -> dict[str, str]:
    """Cache key -> the model version it produced, read from MLflow's tags (when a store
    is there to read: nothing is created)."""
    from .tracking.settings import default_uri, sqlite_file

    uri = uri or default_uri()
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        return {}
    from .tracking.client import client_for, versions_by_cache_key

    return versions_by_cache_key(client_for(uri))


@command("validate", "check the whole config, edges, targets and signatures without running")
def _validate(pipeline: Pipeline, args: argparse.Namespace) -> int:
    pipeline.validate()
    print(f"pipeline '{pipeline.name}': {len(pipeline.stages)} stages, valid{_from(pipeline)}")
    return EXIT_OK


def _from(pipeline: Pipeline) -> str:
    return f" (from {pipeline.source})" if pipeline.source else ""


@command("show", "print the pipeline's DAG (text, or drawn: --format dot|svg|png)")
def _show(pipeline: Pipeline, args: argparse.Namespace) -> int:
    fmt = getattr(args, "format", "text")
    output = getattr(args, "output", None)
    if fmt == "text":
        drawn: str | bytes = describe(pipeline.validate()) + "\n"
    else:
        from .display.render import render

        drawn = render(pipeline.validate().spec, format=fmt)
    data = drawn.encode() if isinstance(drawn, str) else drawn
    if output and output != "-":
        with open(output, "wb") as out:
            out.write(data)
        return EXIT_OK
    if fmt == "png" and sys.stdout.isatty():
        _error(f"refusing to write {fmt} bytes to a terminal; use -o FILE or redirect stdout")
        return EXIT_USAGE
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return EXIT_OK


@option("show")
def _show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=("text", "dot", "svg", "png"),
        default="text",
        help="text (default), DOT source, or drawn by Graphviz as svg/png",
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")


def describe(pipeline: Pipeline) -> str:
    """The DAG as text, in run order: stage, target, and where each input comes from."""
    lines = [f"pipeline '{pipeline.name}' ({len(pipeline.stages)} stages){_from(pipeline)}"]
    width = max(len(name) for name in pipeline.stages)
    for name in pipeline.graph.order():
        stage = pipeline.stages[name]
        mark = " [model]" if stage.model else ""
        lines.append(f"  {name:<{width}}  {stage.target}{mark}")
        for arg, ref in stage.inputs.items():
            lines.append(f"  {'':<{width}}    {arg} <- {ref}")
        for dep in stage.after:
            lines.append(f"  {'':<{width}}    after {dep}")
    from .core.serving import check_serve

    serve = check_serve(pipeline.spec)
    if serve is not None:  # the inference DAG, beside the training DAG
        lines.append(f"serve '{serve.model_name}' ({len(serve.stages)} stages)")
        width = max(len(name) for name in serve.stages)
        for name in serve.order:
            stage = serve.stages[name]
            what = f"model of {stage.model}.{stage.method}" if stage.model else stage.target
            lines.append(f"  {name:<{width}}  {what}")
            for arg, ref in stage.inputs.items():
                lines.append(f"  {'':<{width}}    {arg} <- {ref}")
    return "\n".join(lines)


@command("lineage", "the upstream model versions and runs behind a model version", hydra=False)
def _lineage(args: argparse.Namespace) -> int:
    import json

    from .tracking.lineage import lineage

    found = lineage(args.model, args.version, uri=args.uri)
    print(json.dumps(found.to_dict(), indent=2) if args.json else found)
    if args.svg:
        with open(args.svg, "wb") as out:
            out.write(found.svg())
    return EXIT_OK


@option("lineage")
def _lineage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="registered model <pipeline>.<stage> (or model@alias)")
    parser.add_argument("version", nargs="?", help="version number or alias (default: latest)")
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--json", action="store_true", help="print the lineage as JSON")
    parser.add_argument("--svg", metavar="FILE", help="also draw it into FILE (graphviz)")


# --- export: the pipeline for another system (`export airflow`, `export mlflow`) ----------

#: `pipekit export <target>`: target -> handler `(pipeline, args) -> exit code`. A target
#: adds its row here and its own options with `@option("export")`; `-o` is shared.
EXPORTS: dict[str, Callable[..., int]] = {}


@command("export", "write the pipeline for another system: export airflow -o dags/")
def _export(pipeline: Pipeline, args: argparse.Namespace) -> int:
    from hydra.core.hydra_config import HydraConfig

    known = ", ".join(sorted(EXPORTS))
    handler = EXPORTS.get(args.target or "")
    if handler is None:
        given = args.target or ""
        _error(
            f"unknown export target '{given}'{did_you_mean(given, EXPORTS)}; use one of {known}"
            if given
            else f"name what to export to: pipekit export {{{known.replace(', ', ',')}}} ..."
        )
        return EXIT_USAGE
    if HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN":
        _error("export writes one config, not a -m sweep; drop -m and pick one value per key")
        return EXIT_USAGE
    return handler(pipeline, args)


@option("export")
def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", nargs="?", metavar="{" + ",".join(sorted(EXPORTS)) + "}", help="export to"
    )
    parser.add_argument(
        "-o", "--output", metavar="PATH", help="airflow: a directory or .py file (default: dags/)"
    )


def _export_airflow(pipeline: Pipeline, args: argparse.Namespace) -> int:
    from .export.airflow import export_dag

    done = export_dag(
        pipeline,
        args.output or "dags",
        dag_id=args.dag_id,
        python=args.python,
        workdir=args.workdir,
    )
    schedule = f"schedule '{done.schedule}'" if done.schedule else "no schedule (manual runs)"
    print(f"wrote {done.path}: Airflow DAG '{done.dag_id}', {len(done.tasks)} tasks, {schedule}")
    return EXIT_OK


EXPORTS["airflow"] = _export_airflow


@option("export")
def _export_airflow_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("export airflow")
    group.add_argument("--dag-id", help="the Airflow DAG id (default: the pipeline name)")
    group.add_argument(
        "--python",
        metavar="PATH",
        help="the Python the tasks run pipekit with (default: the Airflow worker's own)",
    )
    group.add_argument(
        "--workdir",
        metavar="DIR",
        help="the directory the tasks run in; relative paths resolve there (default: here)",
    )


# --- serving: export mlflow, serve, predict (the `serve` section; docs/serving.md) --------


def _export_mlflow(pipeline: Pipeline, args: argparse.Namespace) -> int:
    if args.output:
        _error("export mlflow registers a model in MLflow's registry; -o is for export airflow")
        return EXIT_USAGE
    done = pipeline.export("mlflow", alias=False if args.no_alias else (args.alias or True))
    print(done)
    sys.stderr.write(
        f"pipekit: serve it with `pipekit serve` (follows the alias), or unchanged by MLflow: "
        f"MLFLOW_TRACKING_URI={done.uri} mlflow models serve -m {done.model_uri} "
        f"--env-manager local\n"
    )
    return EXIT_OK


EXPORTS["mlflow"] = _export_mlflow


@option("export")
def _export_mlflow_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("export mlflow")
    group.add_argument(
        "--alias",
        metavar="NAME",
        help="the alias to move to the new version (default: serve.alias)",
    )
    group.add_argument(
        "--no-alias", action="store_true", help="register the new version without moving an alias"
    )


@command("serve", "answer predictions over HTTP (MLflow's protocol), following serve.alias")
def _serve(pipeline: Pipeline, args: argparse.Namespace) -> int:
    from .serve.server import Server

    pipeline.validate()
    server = Server.for_pipeline(
        pipeline.spec,
        host=args.host,
        port=args.port,
        workers=args.workers,
        version=args.version,
        alias=args.alias,
        poll_interval=args.poll_interval,
        access_log=args.access_log or None,
    )
    server.run()
    return EXIT_OK


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}")
        return int(text)

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


@option("serve")
def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1)")
    parser.add_argument(
        "--port", type=_count(0, 65535), help="port (default: serve.port, 8000; 0: a free one)"
    )
    parser.add_argument(
        "--workers", type=_count(1, 256), help="worker processes (default: serve.workers, 1)"
    )
    parser.add_argument(
        "--alias", help="follow this alias of <pipeline>.serving (default: serve.alias)"
    )
    parser.add_argument("--version", help="serve this version, follow nothing")
    parser.add_argument(
        "--poll-interval",
        type=_seconds,
        metavar="SECONDS",
        help="how often the alias is checked (default: serve.poll_interval, 5)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")


@command("predict", "score a CSV or Parquet file in batch: predict input=FILE output=DIR")
def _predict(pipeline: Pipeline, args: argparse.Namespace) -> int:
    from .core.text import parse_size
    from .serve.batch import score

    given = getattr(args, "predict_io", None) or {}
    if not given.get("input") or not given.get("output"):
        _error(
            "pipekit predict needs input=<csv|parquet> and output=<directory>, e.g. "
            "pipekit predict input=new.csv output=scores.parquet"
        )
        return EXIT_USAGE
    try:
        size = parse_size(args.partition_size) if args.partition_size else None
    except ValueError as exc:
        _error(f"--partition-size: {exc}")
        return EXIT_USAGE
    pipeline.validate()
    done = score(
        pipeline.spec,
        given["input"],
        given["output"],
        version=args.version,
        alias=args.alias,
        keep=_split(args.keep),
        overwrite=args.overwrite,
        partition_size=size,
    )
    print(done)
    return EXIT_OK


class _PredictWords(argparse.Action):
    """`input=FILE` and `output=DIR` for predict; every other word goes on to Hydra."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        found = dict(getattr(namespace, "predict_io", None) or {})
        extra = list(getattr(namespace, "hydra_extra", []))
        for word in values or []:
            key, sep, value = word.partition("=")
            if sep and key in ("input", "output"):
                found[key] = value
            else:
                extra.append(word)
        namespace.predict_io, namespace.hydra_extra = found, extra


@option("predict")
def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "words",
        nargs="*",
        action=_PredictWords,
        metavar="input=FILE output=DIR [overrides]",
        help="the file to score (.csv or .parquet) and the Parquet directory to write",
    )
    parser.add_argument("--version", help="score with this version of <pipeline>.serving")
    parser.add_argument(
        "--alias", help="score with the version this alias names (default: serve.alias)"
    )
    parser.add_argument(
        "--keep", metavar="COLUMNS", help="input columns to copy beside the predictions"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier output of pipekit predict"
    )
    parser.add_argument(
        "--partition-size", metavar="SIZE", help="bytes of input per partition, e.g. 16MB"
    )


# --- plumbing ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pipekit` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return EXIT_OK
    if argv[0] == "--version":
        from . import __version__

        print(f"pipekit {__version__}")
        return EXIT_OK
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        _error(f"unknown command '{name}'{did_you_mean(name, COMMANDS)}; see `pipekit --help`")
        return EXIT_USAGE
    parser = argparse.ArgumentParser(
        prog=f"pipekit {name}", description=cmd.help, add_help=not cmd.hydra, allow_abbrev=False
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="full tracebacks on errors")
    if cmd.hydra:  # read here, not by Hydra: the user's directory goes *before* pipekit's
        parser.add_argument("-cd", "--config-dir", help="your config directory (searched first)")
        parser.add_argument("-cn", "--config-name", default="config", help="primary config name")
    for add in cmd.options:
        add(parser)
    if cmd.hydra:
        args, hydra_args = parser.parse_known_args(rest)
        hydra_args = [*getattr(args, "hydra_extra", []), *hydra_args]
        args.typed_options = _typed_options(rest, hydra_args)
        if any(a in ("-h", "--help") for a in hydra_args):
            parser.print_help()
            print("\nHydra options and overrides follow the command (see below).\n")
    else:
        args, hydra_args = parser.parse_args(rest), []
    verbose = args.verbose = args.verbose or os.environ.get("HYDRA_FULL_ERROR") == "1"
    _project_importable()
    signals = _Signals()
    try:
        if cmd.hydra:
            return _run_hydra(cmd, args, hydra_args)
        return cmd.handler(args)
    except PipekitError as exc:
        if verbose:
            raise
        _error(str(exc))
        return getattr(exc, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the run has been stopped cleanly
        return signals.report(exc)
    finally:
        signals.restore()


class _Signals:
    """SIGINT and SIGTERM while a command runs.

    The first raises `Interrupted` (a KeyboardInterrupt): the run stops its stages, ends its
    MLflow runs KILLED and the command exits 128 + the signal number (130, 143). Another
    signal during that cleanup (a few seconds) is ignored, so it is not cut short; a third
    ends the process at once. A SIGINT ignored by the parent shell stays ignored.
    """

    def __init__(self) -> None:
        import signal

        self.first: int | None = None
        self.extra = 0
        self.said = False
        self.previous: dict[int, Any] = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self)
            except ValueError:  # not the main thread: leave signals alone
                break

    def __call__(self, signum: int, frame: Any) -> None:
        if self.first is None:
            self.first = signum
            from .errors import Interrupted

            raise Interrupted(signum)
        self.extra += 1
        if self.extra >= 2:
            if not self.said:
                self.say(f"pipekit: interrupted ({_signame(self.first)}); exiting at once")
            _exit_now(128 + self.first)

    def say(self, line: str) -> None:
        self.said = True
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def report(self, exc: BaseException) -> int:
        """One line: the signal, the stages stopped, the MLflow run ended KILLED."""
        import signal

        signum = getattr(exc, "signum", self.first or signal.SIGINT)
        stopped = getattr(exc, "stopped", ())
        parts = [f"stopped {', '.join(stopped)}" if stopped else "no stage was running"]
        tracked = getattr(exc, "tracking", {}) or {}
        if tracked.get("mlflow_run_id"):
            parts.append(f"MLflow run {tracked['mlflow_run_id']} ended KILLED")
        self.say(f"pipekit: interrupted ({_signame(signum)}); {'; '.join(parts)}")
        return 128 + int(signum)

    def restore(self) -> None:
        """Put the previous handlers back, unless a signal came: then this handler stays
        for the rest of the process (a second Ctrl-C while exiting prints no traceback)."""
        import signal

        if self.first is not None:
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}


def _signame(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _exit_now(code: int) -> None:
    """End the process at once (no threads joined, no atexit): after the run was stopped."""
    from contextlib import suppress

    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):  # a closed or broken stream: exit anyway
            stream.flush()
    os._exit(code)


def _typed_options(rest: Sequence[str], hydra_args: Sequence[str]) -> list[str]:
    """The command's own options as the user typed them (`--targets evaluate`), without
    Hydra's arguments and `-cd/-cn`: what a printed command line repeats."""
    left = list(hydra_args)
    out: list[str] = []
    skip = False
    for token in rest:
        if skip:
            skip = False
        elif token in left:
            left.remove(token)
        elif token in ("-cd", "--config-dir", "-cn", "--config-name"):
            skip = True
        elif not token.startswith(("--config-dir=", "--config-name=")):
            out.append(token)
    return out


def _project_importable() -> None:
    """Stage modules of the project in the working directory import, as in a notebook."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)


def _run_hydra(cmd: Command, args: argparse.Namespace, hydra_args: list[str]) -> int:
    """Run `cmd` as a Hydra app so every Hydra flag and `-m` sweep works as usual."""
    import shutil
    import tempfile

    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import describe_hydra_error, hydra_output, sources

    flags, overrides = _hydra_split(hydra_args)
    if cmd.name == "run" and _merged_sweep(args, flags, overrides):  # one graph: sweep.py
        from .sweep import run_cli

        return run_cli(
            overrides,
            config_dir=args.config_dir,
            config_name=args.config_name,
            targets=_split(args.targets),
            force=_run_options(args).get("force"),
            best=args.best,
            quiet=args.quiet,
            flags=getattr(args, "typed_options", ()),
        )
    found = sources(overrides, args.config_dir, args.config_name)
    if cmd.name == "run" and not getattr(args, "explain", False):  # the MLflow writer process
        from .tracking.writer import start_if_tracked  # imports MLflow while Hydra composes

        start_if_tracked(flags, overrides, args.config_dir, args.config_name)
    multirun = any(f in ("-m", "--multirun") for f in flags) or "hydra.mode=MULTIRUN" in overrides
    scratch = tempfile.mkdtemp(prefix="pipekit-hydra-")  # a sweep's multirun.yaml, removed
    quiet = hydra_output(overrides, multirun=multirun, scratch=scratch)
    codes: list[int] = []

    @hydra.main(version_base=None, config_path=str(found.primary), config_name=found.config_name)
    def app(cfg: Any) -> None:
        codes.append(_job(cmd, args, cfg, found))

    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    # flags last: a bare `--info` must not take an override as its value
    sys.argv = [f"pipekit {cmd.name}", *found.overrides, *quiet, *flags]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us; we print them as one line
    try:
        app()
    except (HydraException, OmegaConfBaseException) as exc:
        if args.verbose:
            raise
        _error(
            describe_hydra_error(
                exc, overrides=overrides, config_dir=args.config_dir, config_name=args.config_name
            )
        )
        return EXIT_USAGE
    except ValueError as exc:  # Hydra's own usage check: `--cfg job -m`
        if args.verbose or "can be specified" not in str(exc):
            raise
        _error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # argparse inside Hydra (bad flag) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
        shutil.rmtree(scratch, ignore_errors=True)
    return max(codes, default=EXIT_OK)


#: Hydra's flags that take a value (`--cfg job`), and `--info`, whose value is optional.
_HYDRA_VALUED = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--experimental-rerun")
_HYDRA_INFO = ("--info", "-i")
_INFO_VALUES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def _merged_sweep(args: argparse.Namespace, flags: list[str], overrides: list[str]) -> bool:
    """`run -m` with Hydra's basic launcher and sweeper, no other Hydra flag and no other
    `hydra.*` setting (such as `hydra.sweep.dir`): pipekit runs the jobs as one merged
    graph. Another launcher, or Hydra's own outputs asked for, keep Hydra's multirun."""
    from .config import override_key

    if not set(flags) & {"-m", "--multirun"} or set(flags) - {"-m", "--multirun"}:
        return False
    if getattr(args, "explain", False):
        return False
    basic = {"hydra/launcher=basic", "hydra/sweeper=basic"}
    hydra = [o for o in overrides if override_key(o).startswith("hydra") and o not in basic]
    return not hydra  # e.g. hydra.sweep.dir: Hydra writes its output directory


def _hydra_split(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) and the overrides, in their order."""
    flags: list[str] = []
    overrides: list[str] = []
    takes: str | None = None
    for token in tokens:
        if takes == "value" or (takes == "info" and token in _INFO_VALUES):
            flags.append(token)
        elif token.startswith("-"):
            flags.append(token)
            takes = "value" if token in _HYDRA_VALUED else "info" if token in _HYDRA_INFO else None
            continue
        else:
            overrides.append(token)
        takes = None
    return flags, overrides


def _job(cmd: Command, args: argparse.Namespace, cfg: Any, found: Any) -> int:
    """One Hydra job (one per sweep point): build the pipeline and run the handler."""
    from hydra.core.hydra_config import HydraConfig

    from .config import command_line, override_key
    from .pipeline import Pipeline

    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not override_key(o).startswith("hydra")]
    if str(hydra_cfg.mode) == "RunMode.MULTIRUN":  # the command that runs this job alone
        again = command_line(
            cmd.name,
            overrides,
            config_dir=args.config_dir,
            config_name=args.config_name,
            flags=getattr(args, "typed_options", ()),
        )
        sys.stderr.write(f"pipekit: sweep job #{hydra_cfg.job.num}: {again}\n")
    if cmd.name == "run" and not getattr(args, "explain", False):  # MLflow's writer process
        # overlaps with validation and the stages (see tracking/writer.py); started already
        # unless tracking looked off before composing
        from .tracking.writer import ready_writer

        ready_writer(cfg.get("tracking"))
    try:
        pipeline = Pipeline.from_config(
            cfg,
            overrides=overrides,
            config_dir=args.config_dir,
            config_name=args.config_name,
            composed=True,
            source=found.pipeline_file(hydra_cfg.runtime.choices.get("pipeline")),
        )
        return cmd.handler(pipeline, args)
    except PipekitError as exc:
        if args.verbose:
            raise
        _error(str(exc))
        return getattr(exc, "exit_code", EXIT_USAGE)


def _overview() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: pipekit <command> [options] [hydra overrides...]",
        "",
        "Declarative ML pipelines: Hydra configs, Dask execution, MLflow tracking.",
        "",
        "commands:",
        *(f"  {c.name:<{width}}  {c.help}" for c in COMMANDS.values()),
        "",
        "examples:",
        "  pipekit run                                  # the default pipeline",
        "  pipekit run pipeline=wine model=forest       # pick a pipeline and a config group",
        "  pipekit run stages.train.params.C=0.5        # override a stage param",
        "  pipekit run -m stages.train.params.C=0.1,1   # a Hydra sweep",
        "  pipekit explain stages.train.params.C=0.5    # what would run, and why",
        "  pipekit run --force train                    # recompute train (and downstream)",
        "  pipekit run -cd my_conf pipeline=houses      # your config directory, searched first",
        "",
        "`pipekit <command> --help` shows the command's options and Hydra's.",
        "Exit codes: 0 ok, 1 a stage failed, 2 a config or usage error,",
        "130/143 interrupted by SIGINT/SIGTERM.",
    ]
    return "\n".join(lines)


def _split(value: str | None) -> list[str]:
    """`a,b` -> [a, b]; commas inside brackets belong to a matrix member (`train[a=1,b=2]`)."""
    if not value:
        return []
    parts, depth, start = [], 0, 0
    for index, char in enumerate(value):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(value[start:index])
            start = index + 1
    parts.append(value[start:])
    return [p.strip() for p in parts if p.strip()]


def _error(message: str) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "error"
    sys.stderr.write(f"pipekit: error: {first}\n")


def entry() -> None:
    """Console-script entry: exit with main()'s code.

    After an interrupt the run is already cleaned up (stages stopped, MLflow runs ended):
    the process ends at once, even if a stage left a thread running. A signal during a
    normal shutdown ends it at once too, without a traceback.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `pipekit cache ls | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    if code > 128:  # 130 SIGINT, 143 SIGTERM
        _exit_now(code)
    _quiet_shutdown()
    sys.exit(code)


def _quiet_shutdown() -> None:
    import signal

    def now(signum: int, frame: Any) -> None:
        _exit_now(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, now)


if __name__ == "__main__":  # pragma: no cover
    entry()
