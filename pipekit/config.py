"""Hydra composition for notebooks and the CLI, and the library's own config directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OverrideError

if TYPE_CHECKING:
    from .pipeline import Pipeline


def conf_dir() -> Path:
    """pipekit's configs: `pipekit/conf` in a wheel, the repository's `conf/` in a checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parent / "conf"


def search_path_override(config_dir: str | Path | None) -> list[str]:
    """With a user config dir as primary, keep pipekit's groups (executor, ...) reachable."""
    if config_dir is None:
        return []
    return [f"hydra.searchpath=[file://{conf_dir()}]"]


def compose(
    overrides: Sequence[str] = (),
    *,
    config_dir: str | Path | None = None,
    config_name: str = "config",
) -> Any:
    """Compose a config with Hydra's compose API; safe to call repeatedly in one kernel."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    primary = Path(config_dir).expanduser().resolve() if config_dir else conf_dir()
    if not primary.is_dir():
        raise OverrideError(f"config_dir '{primary}' does not exist or is not a directory")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(primary), version_base=None):
            return hydra_compose(
                config_name=config_name,
                overrides=[*overrides, *search_path_override(config_dir)],
            )
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        raise OverrideError(describe_hydra_error(exc)) from exc
    finally:
        GlobalHydra.instance().clear()


def describe_hydra_error(exc: BaseException) -> str:
    """One line from a Hydra/OmegaConf error, with a hint on how to fix the usual causes."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else type(exc).__name__
    text = str(exc)
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


def load(
    name: str | None = None,
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
    config_name: str = "config",
) -> Pipeline:
    """Compose `pipeline=<name>` plus overrides and return the Pipeline (not yet run)."""
    from .pipeline import Pipeline

    extra = [f"pipeline={name}"] if name and not _selects_pipeline(overrides) else []
    cfg = compose([*extra, *overrides], config_dir=config_dir, config_name=config_name)
    return Pipeline.from_config(
        cfg,
        overrides=[*extra, *overrides],
        config_dir=config_dir,
        config_name=config_name,
        composed=True,
    )


def _selects_pipeline(overrides: Sequence[str]) -> bool:
    return any(override_key(o) == "pipeline" for o in overrides)


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
