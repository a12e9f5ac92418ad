"""Typed schemas of the config sections besides `stages`: `executor`, `cache`, `tracking`.

Each section is a table of keys (type, default, meaning), so `validate()` can check the
whole config before anything runs, without importing fsspec or MLflow for sections that
do not need them. The tables are data: a later executor or backend adds a row or a
choice, not code. Every message names the key as an override (`executor.scheduler`) and
has one of three shapes:

``executor.scheduler 'thread' is unknown (did you mean 'threads'?); use one of sync, threads, processes``
``executor.num_workers must be a positive integer or null, got str 'abc'``
``tracking.urii is not a tracking setting (did you mean 'uri'?); known: backend, uri, ...``
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..errors import (
    CacheConfigError,
    ConfigError,
    ExecutorConfigError,
    SweepError,
    TrackingConfigError,
    check_keys,
    did_you_mean,
    where,
)
from .spec import backend_name

#: Dask schedulers `executor.scheduler` may name (`distributed`: run/distributed.py).
SCHEDULERS: tuple[str, ...] = ("sync", "threads", "processes", "distributed")
CACHE_BACKENDS: tuple[str, ...] = ("off", "local", "fsspec")
TRACKING_BACKENDS: tuple[str, ...] = ("local", "server", "off")
#: What a run whose tracking failed does: `warn` (closing line, exit 0) or `fail` (exit 1).
ON_ERROR: tuple[str, ...] = ("warn", "fail")


@dataclass(frozen=True, slots=True)
class Kind:
    """The values a key takes: `fits(value)` says whether one does, `text` names them."""

    text: str
    fits: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` is no count


STRING = Kind("a string", lambda v: isinstance(v, str))
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
POSITIVE_INT = Kind("a positive integer", lambda v: _is_int(v) and v > 0)
MAPPING = Kind("a mapping", lambda v: isinstance(v, Mapping))
SIZE = Kind(
    "a size such as '4GB', a number of bytes, or 'auto'",
    lambda v: isinstance(v, str) or (_is_int(v) and v > 0),
)


@dataclass(frozen=True, slots=True)
class Setting:
    """One key of a section: a Kind or a tuple of allowed values, its default and meaning."""

    kind: Kind | tuple[str, ...]
    default: Any
    meaning: str
    nullable: bool = False  # null is a valid value (it means "the default behaviour")
    backends: tuple[str, ...] = ()  # the backends that take this key (empty: every one)


#: A whole-section check run after every key fits: (pipeline, section name, values).
Check = Callable[[str | None, str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Section:
    """A top-level config section: its keys, its exception class and cross-key checks.

    With a `selector` (`backend`), that key's value decides which other keys apply;
    `absent` is its value when the section is missing or empty.
    """

    name: str
    error: type[ConfigError]
    noun: str  # "a tracking setting", used as "<key> is not <noun>"
    settings: Mapping[str, Setting]
    selector: str | None = None
    absent: str | None = None
    checks: tuple[Check, ...] = field(default_factory=tuple)

    def keys_for(self, backend: str | None) -> list[str]:
        """The keys a section with this backend may have, in table order."""
        return [
            key
            for key, s in self.settings.items()
            if backend is None or not s.backends or backend in s.backends
        ]


# --- cross-key checks ---------------------------------------------------------------------


def _check_tracking_uri(pipeline: str | None, name: str, values: dict[str, Any]) -> None:
    """A server needs http(s)://; a local store must not be given a server's URI."""
    backend, uri = values["backend"], values.get("uri")
    if not uri:
        return
    if backend == "server" and not uri.startswith(("http://", "https://", "databricks")):
        raise TrackingConfigError(
            f"{where(pipeline, key=f'{name}.uri')} '{uri}' is not a server URI; the server "
            f"backend needs http(s)://host:port, e.g. `tracking.uri=http://127.0.0.1:5000` "
            f"(use `tracking=local` for a local store)"
        )
    if backend == "local" and uri.startswith(("http://", "https://")):
        raise TrackingConfigError(
            f"{where(pipeline, key=f'{name}.uri')} '{uri}' is a server URI; use "
            f"`tracking=server tracking.uri={uri}`"
        )


#: executor keys only executor=distributed reads
DISTRIBUTED_KEYS = ("address", "n_workers", "threads_per_worker", "memory_limit", "resources")


def _check_distributed(pipeline: str | None, name: str, values: dict[str, Any]) -> None:
    """The cluster keys are refused for a local scheduler: they would be ignored silently."""
    if values["scheduler"] == "distributed":
        return
    for key in DISTRIBUTED_KEYS:
        if values.get(key) != EXECUTOR_DEFAULTS[key]:
            raise ExecutorConfigError(
                f"{where(pipeline, key=f'{name}.{key}')} is a setting of executor=distributed, "
                f"but executor.scheduler is '{values['scheduler']}'; use "
                f"`executor=distributed` (or remove {name}.{key})"
            )


def _check_cache_url(pipeline: str | None, name: str, values: dict[str, Any]) -> None:
    if values["backend"] == "fsspec":
        check_fsspec_url(pipeline, values.get("url"), key=f"{name}.url")


def check_fsspec_url(pipeline: str | None, url: Any, *, key: str = "cache.url") -> None:
    """`url` is an fsspec URL whose protocol fsspec knows and whose implementation imports.

    fsspec is imported here, only for the fsspec backend; the implementation's package
    (`s3fs`, `gcsfs`, ...) is imported too, so a missing one is named before anything runs.
    """
    if not isinstance(url, str) or ("://" not in url and not url.startswith("/")):
        raise CacheConfigError(
            f"{where(pipeline, key=key)} must be an fsspec URL such as "
            f"file:///shared/cache, s3://bucket/cache or memory://cache, got {url!r}"
        )
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError as exc:
        raise CacheConfigError(
            f"{where(pipeline, key=key)} '{url}' needs the 'fsspec' package; install it with "
            f"pip install 'pipekit[cache]' (or pip install fsspec)"
        ) from exc
    for protocol in _protocols(url):
        known = set(fsspec.registry) | set(known_implementations)
        if protocol not in known:
            raise CacheConfigError(
                f"{where(pipeline, key=key)} '{url}': protocol '{protocol}' is unknown to "
                f"fsspec{did_you_mean(protocol, known)}; use a URL such as "
                f"file:///shared/cache, s3://bucket/cache or memory://cache"
            )
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as exc:
            cause = exc.__cause__
            package = (
                getattr(cause, "name", None)
                or known_implementations.get(protocol, {}).get("class", "?").split(".")[0]
            )
            package = package.split(".")[0]
            raise CacheConfigError(
                f"{where(pipeline, key=key)} '{url}' needs the '{package}' package for "
                f"protocol '{protocol}' ({exc}); install it with pip install {package}"
            ) from exc
        except Exception as exc:  # a broken third-party implementation
            raise CacheConfigError(
                f"{where(pipeline, key=key)} '{url}': fsspec cannot load protocol "
                f"'{protocol}' ({type(exc).__name__}: {exc})"
            ) from exc


def _protocols(url: str) -> list[str]:
    """Protocols of a (possibly chained, `simplecache::s3://b/k`) URL; a bare path is file."""
    parts = url.split("::")
    found = []
    for index, part in enumerate(parts):
        if "://" in part:
            found.append(part.split("://", 1)[0])
        elif index < len(parts) - 1:
            found.append(part)  # `simplecache::` names a protocol on its own
        else:
            found.append("file")
    return found


# --- the sections -------------------------------------------------------------------------

EXECUTOR = Section(
    "executor",
    ExecutorConfigError,
    "an executor setting",
    {
        "scheduler": Setting(SCHEDULERS, "threads", "how independent stages run in parallel"),
        "num_workers": Setting(
            POSITIVE_INT, None, "parallel threads or processes; null means one per core", True
        ),
        # executor=distributed (run/distributed.py); the check below refuses them elsewhere
        "address": Setting(
            STRING, None, "tcp://host:8786 of a running Dask scheduler; null starts one", True
        ),
        "n_workers": Setting(
            POSITIVE_INT, None, "worker processes of the local cluster; null: num_workers", True
        ),
        "threads_per_worker": Setting(
            POSITIVE_INT, 1, "threads in each worker process of the local cluster", True
        ),
        "memory_limit": Setting(SIZE, "auto", "memory of each local worker ('4GB')", True),
        "resources": Setting(
            MAPPING, None, "resources each local worker offers, e.g. {GPU: 1}", True
        ),
        "dashboard": Setting(BOOL, True, "serve and print Dask's dashboard (needs bokeh)"),
    },
    checks=(_check_distributed,),
)

SWEEP = Section(
    "sweep",
    SweepError,
    "a sweep setting",
    {
        "metric": Setting(
            STRING, None, "metric that ranks sweep jobs, as stage.key (evaluate.accuracy)", True
        ),
        "mode": Setting(("max", "min"), "max", "whether the best job has the highest or lowest"),
    },
)

EXECUTOR_DEFAULTS = {key: s.default for key, s in EXECUTOR.settings.items()}

CACHE = Section(
    "cache",
    CacheConfigError,
    "a cache setting",
    {
        "backend": Setting(CACHE_BACKENDS, "local", "where stage outputs are stored"),
        "path": Setting(
            STRING,
            ".pipekit/cache",
            "cache directory; relative paths resolve against the directory the run starts in",
            True,
            ("local",),
        ),
        "url": Setting(
            STRING, None, "fsspec URL of the cache (s3://bucket/cache, ...)", False, ("fsspec",)
        ),
        "options": Setting(
            MAPPING, {}, "keyword arguments of the fsspec filesystem", True, ("fsspec",)
        ),
    },
    selector="backend",
    absent="off",
    checks=(_check_cache_url,),
)

TRACKING = Section(
    "tracking",
    TrackingConfigError,
    "a tracking setting",
    {
        "backend": Setting(TRACKING_BACKENDS, "off", "which MLflow store: local | server | off"),
        "uri": Setting(
            STRING,
            None,
            "tracking URI (sqlite:///mlflow.db, http://host:5000); null means the backend's",
            True,
        ),
        "experiment": Setting(STRING, None, "experiment name; null means the pipeline name", True),
        "artifacts": Setting(
            STRING, None, "artifact root for new experiments; null means the backend's", True
        ),
        "enabled": Setting(BOOL, True, "false switches tracking off, keeping the backend"),
        "wal": Setting(
            BOOL, True, "SQLite only: write-ahead log, no fsync per commit (false on NFS)"
        ),
        "on_error": Setting(
            ON_ERROR, "warn", "when tracking fails: warn (the run still passes) or fail"
        ),
        "keep_versions": Setting(
            POSITIVE_INT,
            None,
            "registry retention: after each registration, delete that model's versions "
            "older than the newest N unless they hold an alias; null keeps every version",
            True,
        ),
    },
    selector="backend",
    absent="off",
    checks=(_check_tracking_uri,),
)

#: Every checked section by its top-level key; a later issue adds its own (e.g. `serve`).
SECTIONS: dict[str, Section] = {s.name: s for s in (EXECUTOR, CACHE, TRACKING, SWEEP)}


# --- checking -----------------------------------------------------------------------------


def checked(pipeline: str | None, name: str, section: Any) -> dict[str, Any]:
    """The section's values, defaults filled in, backend spelled canonically ('off' for
    YAML's false); a ConfigError subclass naming the first bad key otherwise."""
    schema = SECTIONS[name]
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise schema.error(
            f"{where(pipeline, key=name)} must be a mapping of settings "
            f"({', '.join(schema.settings)}), got {type(section).__name__} {section!r}; "
            f"pick an option of the group with `{name}=<option>`"
        )
    backend = None
    if schema.selector is not None:
        if section:
            default = schema.settings[schema.selector].default
            backend = _backend(pipeline, schema, backend_name(section, default))
        else:
            backend = schema.absent
    allowed = schema.keys_for(backend)
    per_backend = backend is not None and any(s.backends for s in schema.settings.values())
    noun = f"a setting of the '{backend}' backend" if per_backend else schema.noun
    at = where(pipeline, key=schema.name)
    check_keys(section, allowed, schema.error, at, partial(_other_backend, schema), noun=noun)
    values: dict[str, Any] = {}
    for key in allowed:
        setting = schema.settings[key]
        if key == schema.selector:
            values[key] = backend
        elif key in section:
            values[key] = check_value(pipeline, name, key, section[key])
        else:
            values[key] = setting.default
    for check in schema.checks:
        check(pipeline, name, values)
    return values


def check_value(pipeline: str | None, name: str, key: str, value: Any) -> Any:
    """One value of `name.key` (e.g. the `executor=` argument of `run()`), as given."""
    schema = SECTIONS[name]
    setting = schema.settings[key]
    full = f"{name}.{key}"
    if value is None and setting.nullable:
        return value
    if isinstance(setting.kind, tuple):
        if key == schema.selector:
            return _backend(pipeline, schema, backend_name({key: value}, setting.default))
        if not isinstance(value, str):
            raise schema.error(
                f"{where(pipeline, key=full)} must be one of {', '.join(setting.kind)}, "
                f"got {_shown(value)}"
            )
        if value not in setting.kind:
            raise schema.error(_unknown_value(pipeline, full, value, setting.kind))
        return value
    if not setting.kind.fits(value):
        null = " or null" if setting.nullable else ""
        raise schema.error(
            f"{where(pipeline, key=full)} must be {setting.kind.text}{null}, got {_shown(value)}"
        )
    return value


def check_sections(pipeline: str, config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Check every known section of a whole config; their checked values by name."""
    return {name: checked(pipeline, name, config.get(name)) for name in SECTIONS}


def _backend(pipeline: str | None, schema: Section, backend: str) -> str:
    choices = schema.settings[schema.selector or ""].kind
    assert isinstance(choices, tuple)
    if backend not in choices:
        raise schema.error(
            _unknown_value(pipeline, f"{schema.name}.{schema.selector}", backend, choices)
        )
    return backend


def _unknown_value(pipeline: str | None, key: str, value: str, choices: tuple[str, ...]) -> str:
    return (
        f"{where(pipeline, key=key)} '{value}' is unknown{did_you_mean(value, choices)}; "
        f"use one of {', '.join(choices)}"
    )


def _other_backend(schema: Section, key: str) -> str:
    """For an unknown key that is a setting of another backend: which one, and how to
    pick it; else ''."""
    setting = schema.settings.get(key)
    if setting is None or not setting.backends:
        return ""
    other = setting.backends[0]
    return f"{key} is a setting of the '{other}' backend: pick it with `{schema.name}={other}`"


def _shown(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"
