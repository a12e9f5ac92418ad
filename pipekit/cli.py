"""The `pipekit` command: subcommands over Hydra.

`pipekit <command> [options] [hydra overrides and flags]`. Hydra commands compose the
config exactly as Hydra apps do (`-m` sweeps, `-cd/--config-dir`, `-cn/--config-name`,
`--cfg job`, `hydra/launcher=...`); errors print as one line unless `--verbose` or
`HYDRA_FULL_ERROR=1`. Exit codes: 0 ok, 1 a stage failed, 2 a config or usage error.

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

from .errors import PipekitError, did_you_mean

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
    from .display.progress import TextProgress

    if getattr(args, "explain", False):
        return _explain(pipeline, args)
    targets = _split(args.targets)
    result = pipeline.run(
        targets=targets or None,
        observers=[] if args.quiet else [TextProgress(sys.stderr)],
        progress=False,
        raise_on_failure=False,
        **_run_options(args),
    )
    for stage, metrics in result.metrics().items():
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        print(f"{stage}: {shown}")
    if result.tracking and not args.quiet:
        sys.stderr.write(f"pipekit: {_tracked_where(result.tracking)}\n")
    if result.errors:
        first = result.errors[result.failed[0]]
        if args.verbose and first.traceback:
            sys.stderr.write(first.traceback)
        _error(str(first))
        return EXIT_STAGE_FAILED
    return EXIT_OK


def _tracked_where(tracking: dict[str, str]) -> str:
    """Where the MLflow run is and how to open it: a UI link, or the `mlflow ui` command."""
    uri, experiment, run = (
        tracking["mlflow_uri"],
        tracking["mlflow_experiment_id"],
        tracking["mlflow_run_id"],
    )
    if uri.startswith(("http://", "https://")):
        return f"tracked in MLflow: {uri.rstrip('/')}/#/experiments/{experiment}/runs/{run}"
    return f"tracked in MLflow run {run} ({uri}); browse: mlflow ui --backend-store-uri {uri}"


@option("run")
def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-t", "--targets", help="comma-separated stages to run (with their upstream)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


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
        removed, freed = store.prune(older, size)
        left = store.entries()
        print(
            f"cache {store.display}: removed {removed} entries ({human_size(freed)}); "
            f"{len(left)} left ({human_size(sum(int(e.get('size') or 0) for e in left))})"
        )
        return EXIT_OK
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
    store.clear()
    print(f"cache {store.display}: removed {count} entries")
    return EXIT_OK


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

        drawn = render(pipeline.validate(), format=fmt)
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
        if any(a in ("-h", "--help") for a in hydra_args):
            parser.print_help()
            print("\nHydra options and overrides follow the command (see below).\n")
    else:
        args, hydra_args = parser.parse_args(rest), []
    verbose = args.verbose = args.verbose or os.environ.get("HYDRA_FULL_ERROR") == "1"
    _project_importable()
    try:
        if cmd.hydra:
            return _run_hydra(cmd, args, hydra_args)
        return cmd.handler(args)
    except PipekitError as exc:
        if verbose:
            raise
        _error(str(exc))
        return getattr(exc, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _project_importable() -> None:
    """Stage modules of the project in the working directory import, as in a notebook."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)


def _run_hydra(cmd: Command, args: argparse.Namespace, hydra_args: list[str]) -> int:
    """Run `cmd` as a Hydra app so every Hydra flag and `-m` sweep works as usual."""
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import QUIET_HYDRA, describe_hydra_error, override_key, sources

    flags = [a for a in hydra_args if a.startswith("-")]
    overrides = [a for a in hydra_args if not a.startswith("-")]
    found = sources(overrides, args.config_dir, args.config_name)
    given = {override_key(o) for o in found.overrides}
    quiet = [q for q in QUIET_HYDRA if override_key(q) not in given]
    codes: list[int] = []

    @hydra.main(version_base=None, config_path=str(found.primary), config_name=found.config_name)
    def app(cfg: Any) -> None:
        codes.append(_job(cmd, args, cfg, found))

    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"pipekit {cmd.name}", *flags, *found.overrides, *quiet]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us; we print them as one line
    try:
        app()
    except (HydraException, OmegaConfBaseException) as exc:
        if args.verbose:
            raise
        _error(describe_hydra_error(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # argparse inside Hydra (bad flag) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
    return max(codes, default=EXIT_OK)


def _job(cmd: Command, args: argparse.Namespace, cfg: Any, found: Any) -> int:
    """One Hydra job (one per sweep point): build the pipeline and run the handler."""
    from hydra.core.hydra_config import HydraConfig

    from .config import QUIET_HYDRA, override_key
    from .pipeline import Pipeline

    hydra_cfg = HydraConfig.get()
    quiet = {override_key(q) for q in QUIET_HYDRA}
    overrides = [
        o
        for o in hydra_cfg.overrides.task
        if override_key(o) not in quiet and not override_key(o).startswith("hydra.searchpath")
    ]
    if str(hydra_cfg.mode) == "RunMode.MULTIRUN":
        sys.stderr.write(f"pipekit: sweep job #{hydra_cfg.job.num}: {' '.join(overrides)}\n")
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
        "  pipekit run -cd my_conf -cn my_config        # your own config directory",
        "",
        "`pipekit <command> --help` shows the command's options and Hydra's.",
        "Exit codes: 0 ok, 1 a stage failed, 2 a config or usage error.",
    ]
    return "\n".join(lines)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _error(message: str) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "error"
    sys.stderr.write(f"pipekit: error: {first}\n")


def entry() -> None:
    """Console-script entry: exit with main()'s code."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `pipekit cache ls | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
