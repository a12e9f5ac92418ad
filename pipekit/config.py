"""Hydra composition for notebooks and the CLI: one search path for both doors.

A user's config directory is searched **before** pipekit's own `conf/`: a user file named
like a shipped one (`pipeline/wine.yaml`) wins. The user directory needs no `config.yaml`:
pipekit's primary config is registered in Hydra's ConfigStore (searched last), and the
groups a user's own `config.yaml` leaves out (`executor`, `tracking`, `cache`) get
pipekit's defaults, so the documented defaults hold whichever door composes. This
module returns configs, never pipelines.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OverrideError

#: pipekit's own config groups, filled in with pipekit's default when a user's primary
#: config does not name them.
GROUPS = ("executor", "tracking", "cache")


def hydra_output(overrides: Sequence[str], *, multirun: bool, scratch: str | Path) -> list[str]:
    """Hydra settings so that Hydra writes its output directory only where the user asks
    for it (`hydra.run.dir=...`, or `hydra.sweep.dir=...` for a sweep); a user's own
    setting of a key wins. Hydra always writes a sweep's `multirun.yaml`: without a
    `hydra.sweep.dir` it goes to `scratch` (the caller's temporary directory), not the
    working directory. Hydra's log handlers stay off: they print to stdout.
    """
    given = {override_key(o) for o in overrides}
    asked = ("hydra.sweep.dir" if multirun else "hydra.run.dir") in given
    wanted = {
        "hydra.run.dir": ".",
        "hydra.sweep.dir": _quoted(str(scratch)),
        "hydra/job_logging": "none",
        "hydra/hydra_logging": "none",
    }
    if not asked:
        wanted["hydra.output_subdir"] = "null"
    return [f"{key}={value}" for key, value in wanted.items() if key not in given]


def _quoted(text: str) -> str:
    """A quoted Hydra override value: spaces, brackets and commas in a path stay literal."""
    escaped = text.replace("'", "\\'")
    return f"'{escaped}'"


def conf_dir() -> Path:
    """pipekit's configs: `pipekit/conf` in a wheel, the repository's `conf/` in a checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parent / "conf"


@dataclass(frozen=True, slots=True)
class Sources:
    """Where Hydra composes from: the primary directory, the config name (the user's file,
    or one pipekit registered in Hydra's ConfigStore), the overrides to pass (the user's,
    then pipekit's search path), and the user's directory."""

    primary: Path
    config_name: str
    overrides: list[str] = field(default_factory=list)
    user_dir: Path | None = None

    def pipeline_file(self, choice: str | None) -> Path | None:
        """The file `pipeline=<choice>` came from: the user's directory first."""
        if not choice:
            return None
        for root in (self.user_dir, conf_dir()):
            if root is not None:
                path = root / "pipeline" / f"{choice}.yaml"
                if path.is_file():
                    return path
        return None


def sources(
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
    config_name: str = "config",
) -> Sources:
    """The search path both doors use: the user's directory, then pipekit's `conf/`.

    Without `config.yaml`, a user directory composes from pipekit's primary config; its
    pipeline is the user's when `pipeline/` holds exactly one (several: name one with
    `pipeline=`). A user's primary config that leaves out `executor`, `tracking` or
    `cache` gets pipekit's default for them, underneath its own values.
    """
    pipekit = conf_dir()
    if config_dir is None:
        return Sources(pipekit, config_name, list(overrides))
    user = Path(config_dir).expanduser().resolve()
    if not user.is_dir():
        raise OverrideError(
            f"config directory '{config_dir}' does not exist or is not a directory "
            f"(looked in {user}); pass an existing directory with -cd or config_dir="
        )
    _check_headers(user)
    own = user / f"{config_name}.yaml"
    if own.is_file():
        primary = _around(own, config_name)
    elif config_name == "config":
        primary = _fallback(user, config_dir, overrides)
    else:
        primary = config_name  # Hydra says it is missing, with the options it has
    searched = [*overrides, f"hydra.searchpath=[{_quoted(f'file://{pipekit}')}]"]
    return Sources(user, primary, searched, user)


_HEADER = re.compile(r"\s*#\s*@")


def _check_headers(user: Path) -> None:
    """A `# @package _global_` that is not in a pipeline file's leading lines: Hydra reads
    it only there and silently nests the whole file under `pipeline:` otherwise."""
    for path in sorted((user / "pipeline").rglob("*.yaml")):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        header = 0
        while header < len(lines) and _HEADER.match(lines[header]):
            header += 1
        late = [i for i, line in enumerate(lines) if i >= header and _HEADER.match(line)]
        if late and "@package" in lines[late[0]]:
            raise OverrideError(
                f"config: {path}: '{lines[late[0]].strip()}' must come before any other line "
                f"(Hydra reads it only there); move it to the top of the file"
            )


#: The name under which pipekit's `config.yaml` is registered in Hydra's ConfigStore: the
#: primary config when a user directory has no `config.yaml` of its own.
FALLBACK = "pipekit_defaults"


def _pipekit_primary() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((conf_dir() / "config.yaml").read_text()) or {}


def _store(name: str, node: dict[str, Any]) -> str:
    """Register `node` as primary config `name` in Hydra's ConfigStore (searched last)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=node)
    return name


def _fallback(user: Path, config_dir: str | Path, overrides: Sequence[str]) -> str:
    """pipekit's primary config, its default pipeline the user's only one (if one)."""
    node = _pipekit_primary()
    if any(override_key(o) == "pipeline" for o in overrides):
        return _store(FALLBACK, node)
    found = sorted(p.stem for p in (user / "pipeline").glob("*.yaml"))
    if len(found) > 1:
        raise OverrideError(
            f"config directory '{config_dir}' has no config.yaml and {len(found)} pipelines: "
            f"choose one with pipeline=NAME ({', '.join(found)}), or add a config.yaml "
            f"whose defaults name one"
        )
    if not found:
        return _store(FALLBACK, node)
    defaults = [
        {"pipeline": found[0]} if isinstance(e, dict) and "pipeline" in e else e
        for e in node.get("defaults") or []
    ]
    name = re.sub(r"\W", "_", found[0])
    return _store(f"{FALLBACK}_{name}", {**node, "defaults": defaults})


def _around(own: Path, config_name: str) -> str:
    """A primary config that includes the user's `own` after pipekit's defaults of the
    groups it leaves out, so its values win over those and `tracking=off` still selects;
    a pipeline it does not name stays selectable with `pipeline=NAME`."""
    named = _named_groups(own) or set()
    choices = default_choices()
    defaults: list[Any] = ["_self_"]
    defaults += [{g: choices[g]} for g in GROUPS if g not in named and g in choices]
    defaults.append(config_name)
    if "pipeline" not in named:
        defaults.append({"pipeline": None})
    if len(defaults) == 2:  # the user's config names every group: it is the primary
        return config_name
    left_out = "_".join(g for g in ("pipeline", *GROUPS) if g not in named)
    name = re.sub(r"\W", "_", config_name)
    return _store(f"pipekit_around_{name}_{left_out}", {"defaults": defaults})


def default_choices() -> dict[str, str]:
    """pipekit's default option of each group (`executor: threads`, ...)."""
    found = _pipekit_primary().get("defaults") or []
    return {k: str(v) for entry in found if isinstance(entry, dict) for k, v in entry.items()}


def _named_groups(primary: Path) -> set[str] | None:
    """Groups a user's primary config selects in its defaults list (not those it only
    `override`s: pipekit's default must be there to override); None when no such file."""
    import yaml

    if not primary.is_file():
        return None
    try:
        data = yaml.safe_load(primary.read_text()) or {}
    except yaml.YAMLError as exc:
        raise OverrideError(f"config: {primary}: {_first_line(exc)}") from exc
    named = set()
    for entry in (data.get("defaults") or []) if isinstance(data, dict) else []:
        keys = entry.keys() if isinstance(entry, dict) else []
        for key in keys:
            words = str(key).split()
            if words[0] != "override":
                named.add(words[-1].lstrip("/").split("@")[0])
    return named


def compose(
    overrides: Sequence[str] = (),
    *,
    config_dir: str | Path | None = None,
    config_name: str = "config",
) -> Any:
    """Compose a config with Hydra's compose API; safe to call repeatedly in one kernel."""
    return composed(overrides, config_dir=config_dir, config_name=config_name)[0]


def composed(
    overrides: Sequence[str] = (),
    *,
    config_dir: str | Path | None = None,
    config_name: str = "config",
) -> tuple[Any, Path | None]:
    """The composed config and the file its pipeline came from."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    found = sources(overrides, config_dir, config_name)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(found.primary), version_base=None):
            cfg = hydra_compose(
                config_name=found.config_name, overrides=found.overrides, return_hydra_config=True
            )
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        raise OverrideError(
            describe_hydra_error(
                exc, overrides=overrides, config_dir=config_dir, config_name=config_name
            )
        ) from exc
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        choices = cfg.pop("hydra").runtime.choices
    return cfg, found.pipeline_file(choices.get("pipeline"))


def describe_hydra_error(
    exc: BaseException,
    *,
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
    config_name: str = "config",
) -> str:
    """One line from a Hydra/OmegaConf/YAML error, with a hint on how to fix the usual causes.

    `overrides`, `config_dir` and `config_name` are what was composed: a command the hint
    prints composes the same config, so it runs as printed.
    """
    import yaml

    text = str(exc)
    if isinstance(exc, yaml.YAMLError) or isinstance(exc.__cause__, yaml.YAMLError):
        return _yaml_error(exc.__cause__ if isinstance(exc.__cause__, yaml.YAMLError) else exc)
    if "found duplicate key" in text or "while parsing" in text or "while scanning" in text:
        return f"config: {_first_line(exc)} (fix the YAML syntax)"
    message = _first_line(exc)
    if "Could not override" in text or ("Key '" in text and "not in struct" in text):
        shown = _config_printer(text, overrides, config_dir, config_name)
        hint = f"check the key path (`{shown}` prints the config); prefix with + to add a new key"
    elif "Could not find" in text or "Cannot find primary config" in text:
        options = [s.strip() for s in text.splitlines() if s.startswith("\t") and "=" not in s]
        hint = f"available: {', '.join(options)}" if options else "check the group and option names"
    elif "mismatched input" in text or "no viable alternative" in text or "extraneous" in text:
        hint = "overrides look like key=value, +key=value, ~key or group=option"
    else:
        hint = ""
    return f"config: {message}" + (f" ({hint})" if hint else "")


_PLAIN_OVERRIDE = re.compile(r"\+?[\w/@-]+=[\w.-]+")


def _config_printer(
    text: str, overrides: Sequence[str], config_dir: str | Path | None, config_name: str
) -> str:
    """`pipekit run [-cd DIR] --cfg job [group=option...]`: the config the user composed,
    with their group choices, without the override that failed."""
    bad = re.search(r"override '([^']+)'", text)
    keep = [
        o
        for o in overrides
        if _PLAIN_OVERRIDE.fullmatch(o)
        and "." not in override_key(o)
        and not override_key(o).startswith("hydra")
        and (bad is None or override_key(o) != bad.group(1))
    ]
    return command_line(
        "run", keep, config_dir=config_dir, config_name=config_name, options={"--cfg": "job"}
    )


def _yaml_error(exc: BaseException) -> str:
    """`config: file.yaml line 4: found duplicate key 'train'` from a YAML error."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or _first_line(exc)
    context = getattr(exc, "context", None)
    where_ = f"{mark.name} line {mark.line + 1}" if mark is not None else "YAML"
    detail = f"{context} {problem}" if context and "duplicate" in str(context) else problem
    return f"config: {where_}: {detail} (fix the YAML syntax of that file)"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def override_key(override: str) -> str:
    """The key an override sets: `+a.b=1` -> `a.b`, `~a` -> `a`, `hydra/launcher=x` -> ..."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def merge_overrides(old: Sequence[str], new: Sequence[str]) -> list[str]:
    """`old` then `new`, where a later override of the same key replaces the earlier one.

    Hydra rejects two overrides of one key, so re-running with a changed value must replace.
    """
    merged = {override_key(o): o for o in old}
    for override in new:
        merged.pop(override_key(override), None)
        merged[override_key(override)] = override
    return list(merged.values())


#: Words a shell passes on unchanged (a leading `~` would be expanded: quoted).
_SAFE = re.compile(r"[\w.=/,:+@-][\w.=/,:+~@-]*")


def command_line(
    command: str,
    overrides: Sequence[str] = (),
    *,
    config_dir: str | Path | None = None,
    config_name: str = "config",
    options: Mapping[str, str] | None = None,
    flags: Sequence[str] = (),
) -> str:
    """The `pipekit <command>` line that composes the same config: runs as printed.

    `options` are `--flag value` pairs, `flags` the command's own options as typed."""
    parts = ["pipekit", command]
    if config_dir is not None:
        parts += ["-cd", str(config_dir)]
    if config_name != "config":
        parts += ["-cn", config_name]
    for flag, value in (options or {}).items():
        parts += [flag, value]
    parts += [*flags, *overrides]
    return " ".join(p if _SAFE.fullmatch(p) else shlex.quote(p) for p in parts)
