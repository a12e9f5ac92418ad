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
from functools import cache
from pathlib import Path
from typing import Any

from .errors import OverrideError

#: pipekit's own config groups, filled in with pipekit's default when a user's primary
#: config does not name them.
GROUPS = ("executor", "tracking", "cache")

#: Hydra settings that keep Hydra from writing `outputs/<date>/<time>/` and log files:
#: a user override of the same key wins.
QUIET_HYDRA = (
    "hydra.run.dir=.",
    "hydra.sweep.dir=.",
    "hydra.sweep.subdir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
)


def conf_dir() -> Path:
    """pipekit's configs: `pipekit/conf` in a wheel, the repository's `conf/` in a checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parent / "conf"


@dataclass(frozen=True, slots=True)
class Sources:
    """Where Hydra composes from: the primary directory, the config name, the overrides to
    pass (the user's, adjusted, then pipekit's search path), and the user's directory."""

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
    """The search path both doors use: the user's directory, then pipekit's `conf/`."""
    _register_primary()
    pipekit = conf_dir()
    user = None
    if config_dir is not None:
        user = Path(config_dir).expanduser().resolve()
        if not user.is_dir():
            raise OverrideError(
                f"config directory '{config_dir}' does not exist or is not a directory "
                f"(looked in {user})"
            )
    primary = user or pipekit
    adjusted = list(overrides)
    if user is not None:
        own = user / f"{config_name}.yaml"
        if config_name == "config" and not own.is_file():
            config_name = FALLBACK
        adjusted = _fill_groups(own, adjusted)
        adjusted.append(f"hydra.searchpath=[file://{pipekit}]")
    return Sources(primary, config_name, adjusted, user)


#: The name under which pipekit's `config.yaml` is registered in Hydra's ConfigStore: the
#: primary config when a user directory has no `config.yaml` of its own.
FALLBACK = "pipekit_defaults"


@cache
def _register_primary() -> None:
    """pipekit's `config.yaml` in Hydra's ConfigStore, so a user directory needs none."""
    import yaml
    from hydra.core.config_store import ConfigStore

    node = yaml.safe_load((conf_dir() / "config.yaml").read_text())
    ConfigStore.instance().store(name=FALLBACK, node=node)


def default_choices() -> dict[str, str]:
    """pipekit's default option of each group (`executor: threads`, ...)."""
    import yaml

    found = yaml.safe_load((conf_dir() / "config.yaml").read_text()).get("defaults") or []
    return {k: str(v) for entry in found if isinstance(entry, dict) for k, v in entry.items()}


def _named_groups(primary: Path) -> set[str] | None:
    """Groups a user's primary config names in its defaults list; None when no such file."""
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
            named.add(words[-1].lstrip("/").split("@")[0])
    return named


def _fill_groups(primary: Path, overrides: list[str]) -> list[str]:
    """Give pipekit's groups the user's primary config leaves out their default; a user
    override of such a group becomes an addition (`tracking=off` -> `+tracking=off`)."""
    named = _named_groups(primary)
    if named is None:
        return overrides
    defaults = default_choices()
    out = list(overrides)
    for group in ("pipeline", *GROUPS):
        if group in named:
            continue
        set_by_user = [i for i, o in enumerate(out) if override_key(o) == group]
        for i in set_by_user:
            if not out[i].startswith(("+", "~")):
                out[i] = f"+{out[i]}"
        if not set_by_user and group in GROUPS and group in defaults:
            out.append(f"+{group}={defaults[group]}")
    return out


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
        raise OverrideError(describe_hydra_error(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        choices = cfg.pop("hydra").runtime.choices
    return cfg, found.pipeline_file(choices.get("pipeline"))


def describe_hydra_error(exc: BaseException) -> str:
    """One line from a Hydra/OmegaConf/YAML error, with a hint on how to fix the usual causes."""
    import yaml

    text = str(exc)
    if isinstance(exc, yaml.YAMLError) or isinstance(exc.__cause__, yaml.YAMLError):
        return _yaml_error(exc.__cause__ if isinstance(exc.__cause__, yaml.YAMLError) else exc)
    if "found duplicate key" in text or "while parsing" in text or "while scanning" in text:
        return f"config: {_first_line(exc)} (fix the YAML syntax)"
    message = _first_line(exc)
    if "Could not override" in text or ("Key '" in text and "not in struct" in text):
        hint = "check the key path (`pipekit run --cfg job` prints the config); prefix with + to add a new key"
    elif "Could not find" in text or "Cannot find primary config" in text:
        options = [s.strip() for s in text.splitlines() if s.startswith("\t") and "=" not in s]
        hint = f"available: {', '.join(options)}" if options else "check the group and option names"
    elif "mismatched input" in text or "no viable alternative" in text or "extraneous" in text:
        hint = "overrides look like key=value, +key=value, ~key or group=option"
    else:
        hint = ""
    return f"config: {message}" + (f" ({hint})" if hint else "")


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


_SAFE = re.compile(r"[\w.=/,:+~@-]+")


def command_line(
    command: str,
    overrides: Sequence[str] = (),
    *,
    config_dir: str | Path | None = None,
    config_name: str = "config",
    options: Mapping[str, str] | None = None,
) -> str:
    """The `pipekit <command>` line that composes the same config: runs as printed."""
    parts = ["pipekit", command]
    if config_dir is not None:
        parts += ["-cd", str(config_dir)]
    if config_name != "config":
        parts += ["-cn", config_name]
    for flag, value in (options or {}).items():
        parts += [flag, value]
    parts += list(overrides)
    return " ".join(p if _SAFE.fullmatch(p) else shlex.quote(p) for p in parts)
