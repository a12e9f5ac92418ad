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
    from .progress import TextProgress

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
    if result.errors:
        first = result.errors[result.failed[0]]
        if args.verbose and first.traceback:
            sys.stderr.write(first.traceback)
        _error(str(first))
        return EXIT_STAGE_FAILED
    return EXIT_OK


@option("run")
def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-t", "--targets", help="comma-separated stages to run (with their upstream)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """Extra keyword arguments for Pipeline.run that other modules' options add."""
    return dict(getattr(args, "run_options", {}) or {})


@command("validate", "check the config, edges, targets and signatures without running")
def _validate(pipeline: Pipeline, args: argparse.Namespace) -> int:
    pipeline.validate()
    print(f"pipeline '{pipeline.name}': {len(pipeline.stages)} stages, valid")
    return EXIT_OK


@command("show", "print the pipeline's DAG")
def _show(pipeline: Pipeline, args: argparse.Namespace) -> int:
    print(describe(pipeline.validate()))
    return EXIT_OK


def describe(pipeline: Pipeline) -> str:
    """The DAG as text, in run order: stage, target, and where each input comes from."""
    lines = [f"pipeline '{pipeline.name}' ({len(pipeline.stages)} stages)"]
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

    from .provenance import lineage

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
    for add in cmd.options:
        add(parser)
    if cmd.hydra:
        args, hydra_args = parser.parse_known_args(rest)
        if any(a in ("-h", "--help") for a in hydra_args):
            parser.print_help()
            print("\nHydra options and overrides follow the command (see below).\n")
    else:
        args, hydra_args = parser.parse_args(rest), []
    verbose = args.verbose = args.verbose or os.environ.get("HYDRA_FULL_ERROR") == "1"
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


def _run_hydra(cmd: Command, args: argparse.Namespace, hydra_args: list[str]) -> int:
    """Run `cmd` as a Hydra app so every Hydra flag and `-m` sweep works as usual."""
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import conf_dir, describe_hydra_error

    codes: list[int] = []

    @hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
    def app(cfg: Any) -> None:
        codes.append(_job(cmd, args, cfg))

    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"pipekit {cmd.name}", *hydra_args]
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


def _job(cmd: Command, args: argparse.Namespace, cfg: Any) -> int:
    """One Hydra job (one per sweep point): build the pipeline and run the handler."""
    from hydra.core.hydra_config import HydraConfig

    from .pipeline import Pipeline

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = []
    try:
        pipeline = Pipeline.from_config(cfg, overrides=overrides)
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
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
