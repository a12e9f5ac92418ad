"""Fingerprints for the stage cache: code (with the project's own helpers), values, files.

A stage's code fingerprint covers its function's bytecode, constants and defaults, and
walks the globals it names to the functions, classes and constants of the user's own
project (not the standard library or installed packages), recursively and bounded.
Editing a helper in `mypkg/utils.py` or a list `FEATURES = [...]` therefore changes the
key of every stage that reads it, which is what path-based caches (Ploomber, DVC,
Hamilton) miss.

A key must never stay the same when something the stage reads changed. When that cannot
be promised (a constant with no deterministic token, such as a lock or an open file, or
a walk cut off at `MAX_OBJECTS`), the fingerprint says so in `problems` and the planner
treats the stage as not cacheable: it always runs.

Per-function digests are memoised (keyed by the object, checked against its `__code__`);
the walk and the constants are redone per planning pass, so a rebound or mutated global
in a notebook counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import glob
import hashlib
import json
import os
import site
import sys
import sysconfig
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cache, lru_cache
from typing import Any

#: At most this many functions/classes per code walk (a stage calling half a project).
#: A walk that would need more makes the stage not cacheable (it always runs).
MAX_OBJECTS = 400
#: Constants nested deeper than this have no token (the stage is not cacheable).
MAX_DEPTH = 64
#: Watched files up to this size are hashed by content; bigger ones by mtime and size.
CONTENT_HASH_LIMIT = 8 * 1024 * 1024
#: At most this many files per watch pattern.
MAX_WATCHED_FILES = 10_000

_SIMPLE = (int, float, str, bytes, bool, type(None))


def digest(text: str | bytes, size: int = 16) -> str:
    """A short hex blake2b digest (fast; not for security)."""
    data = text.encode() if isinstance(text, str) else text
    return hashlib.blake2b(data, digest_size=size).hexdigest()


# --- values -------------------------------------------------------------------------------


def value_token(value: Any) -> str:
    """A stable token of a Python value: JSON for plain config values, else dask's tokenize.

    Plain params (numbers, strings, lists, dicts) take the fast exact JSON path; anything
    else (arrays, frames, objects) goes through `dask.base.tokenize`.
    """
    try:
        return digest(json.dumps(value, sort_keys=True, allow_nan=True, separators=(",", ":")))
    except (TypeError, ValueError):
        from dask.base import tokenize

        return tokenize(value)


def plain(value: Any) -> Any:
    """A JSON-safe copy of a params value for manifests (repr for anything exotic)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, _SIMPLE) and not isinstance(value, bytes):
        return value
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


# --- code ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _excluded_roots() -> tuple[str, ...]:
    """Directories whose modules are not the user's project: stdlib and installed packages."""
    roots: set[str] = set()
    for scheme_vars in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        paths = sysconfig.get_paths(vars=scheme_vars) if scheme_vars else sysconfig.get_paths()
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            if paths.get(key):
                roots.add(os.path.realpath(paths[key]))
    with contextlib.suppress(AttributeError):  # some virtualenv flavours lack it
        roots.update(os.path.realpath(p) for p in site.getsitepackages())
    user = getattr(site, "getusersitepackages", lambda: "")()
    if user:
        roots.add(os.path.realpath(user))
    return tuple(sorted(r + os.sep for r in roots))


@cache
def in_project(module_name: str) -> bool:
    """True for the user's own modules: `__main__` (notebooks, scripts) and files outside
    the standard library and site-packages. pipekit's internals are not project code."""
    if module_name == "__main__":
        return True
    if module_name == "pipekit" or (
        module_name.startswith("pipekit.") and not module_name.startswith("pipekit.examples")
    ):
        return False
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path:
        return False
    real = os.path.realpath(path)
    if "site-packages" in real or "dist-packages" in real:
        return False
    return not real.startswith(_excluded_roots())


def _module_of(obj: Any) -> str:
    return getattr(obj, "__module__", None) or ""


def _qualname(obj: Any) -> str:
    return f"{_module_of(obj)}.{getattr(obj, '__qualname__', type(obj).__name__)}"


class _Own:
    """One function's own digest and the global names its code refers to."""

    __slots__ = ("check", "digest", "names")

    def __init__(self, check: Any, digest_: str, names: tuple[str, ...]):
        self.check, self.digest, self.names = check, digest_, names


_OWN: weakref.WeakKeyDictionary[Any, _Own] = weakref.WeakKeyDictionary()


def _code_parts(code: types.CodeType, parts: list[str], names: list[str]) -> None:
    """Bytecode, constants (nested code recursively) and names; line numbers left out."""
    parts.append(code.co_code.hex())
    parts.append(",".join(code.co_names))
    parts.append(",".join(code.co_varnames))
    parts.append(",".join(code.co_freevars))
    names.extend(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_parts(const, parts, names)
        elif isinstance(const, frozenset):  # `x in {"a", "b"}`: repr order follows hashing
            parts.append(f"frozenset({sorted(map(repr, const))})")
        else:
            parts.append(repr(const))


def _own_function(func: types.FunctionType) -> _Own:
    check = (func.__code__, func.__defaults__, func.__kwdefaults__)
    found = _OWN.get(func)
    if found is not None and found.check == check:
        return found
    parts: list[str] = [func.__qualname__]
    names: list[str] = []
    _code_parts(func.__code__, parts, names)
    parts.append(repr(func.__defaults__))
    parts.append(repr(sorted((func.__kwdefaults__ or {}).items())))
    own = _Own(check, digest("\x1f".join(parts)), tuple(dict.fromkeys(names)))
    _OWN[func] = own
    return own


def _members(cls: type) -> list[tuple[str, types.FunctionType]]:
    """A class's own functions (methods, static/class methods, property accessors)."""
    found = []
    for name, attr in sorted(vars(cls).items()):
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        elif isinstance(attr, functools.cached_property):
            attr = attr.func
        if isinstance(attr, property):
            for accessor in (attr.fget, attr.fset, attr.fdel):
                if isinstance(accessor, types.FunctionType):
                    found.append((name, accessor))
        elif isinstance(attr, types.FunctionType):
            found.append((name, attr))
    return found


def _class_constants(cls: type) -> list[tuple[str, Any]]:
    """A class's own data attributes (`FEATURES = [...]`, enum members, dataclass field
    defaults); methods, descriptors and Python's own bookkeeping left out."""
    found = []
    for name, attr in vars(cls).items():
        if name.startswith("__") or (name[:1] == "_" and name[-1:] == "_") or name == "_abc_impl":
            continue  # dunders, enum sunders (_member_map_ ...), ABC caches
        if isinstance(attr, (types.FunctionType, type)) or hasattr(type(attr), "__get__"):
            continue  # methods (hashed as code), nested classes (walked), descriptors
        found.append((name, attr))
    return found


def _own_class(cls: type) -> str:
    """Digest of a class's name, bases and methods (its data attributes are tokenised by
    the walk, every pass, as they may be mutated)."""
    parts = [cls.__qualname__, ",".join(_qualname(b) for b in cls.__bases__)]
    for name, member in _members(cls):
        parts.append(f"{name}:{_own_function(member).digest}")
    return digest("\x1f".join(parts))


# --- constants ----------------------------------------------------------------------------


class Opaque(Exception):
    """A value with no deterministic token: `str(exc)` says what it is, e.g. 'a _thread.lock'."""


_REPR_TYPES = frozenset((int, float, complex, str, bytes, bool, type(None), range))
_FLAT_CONTAINERS = frozenset((list, tuple, set, frozenset))


@lru_cache(maxsize=1)
def _repr_types() -> frozenset[type]:
    """Types whose repr is a deterministic, complete description of the value."""
    import datetime
    import decimal
    import fractions
    import pathlib
    import re
    import uuid

    extra = (
        slice,
        type(Ellipsis),
        decimal.Decimal,
        fractions.Fraction,
        datetime.date,
        datetime.datetime,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        uuid.UUID,
        re.Pattern,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.PosixPath,
        pathlib.WindowsPath,
    )
    return frozenset((*_REPR_TYPES, *extra))


@lru_cache(maxsize=1)
def _opaque_types() -> tuple[type, ...]:
    """State that changes under the same name, or that has no value to compare: locks,
    files, sockets, threads, queues, generators and other iterators, weak references."""
    import io
    import queue
    import socket
    import threading

    return (
        type(threading.Lock()),
        type(threading.RLock()),
        threading.Condition,
        threading.Semaphore,
        threading.Event,
        threading.Thread,
        threading.Barrier,
        io.IOBase,
        socket.socket,
        queue.Queue,
        types.GeneratorType,
        types.CoroutineType,
        types.AsyncGeneratorType,
        weakref.ref,
        Iterator,
    )


def _type_name(value: Any) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


class _Tokens:
    """Stable tokens of the constants a stage reads; pushes the project functions and
    classes found inside them (a dispatch dict of helpers) onto the code walk."""

    def __init__(self, push: Callable[[Any], None]):
        self.push = push
        self._path: set[int] = set()  # containers being tokenised (a cycle refers back)

    def __call__(self, value: Any, where: str = "", depth: int = 0) -> str:
        kind = type(value)
        if kind in _repr_types():
            return f"{kind.__name__}:{value!r}"
        if depth > MAX_DEPTH:
            raise Opaque(f"nested deeper than {MAX_DEPTH} levels{where and f' at {where}'}")
        if isinstance(value, enum.Enum):
            self._code(kind)
            return f"enum:{_qualname(kind)}.{value.name}={self(value.value, where, depth + 1)}"
        if isinstance(value, (types.FunctionType, type)):
            self._code(value)
            return f"code:{_qualname(value)}"
        if isinstance(value, types.ModuleType):
            return f"module:{value.__name__}"
        try:  # a proxy may raise anything from attribute access
            wrapped = getattr(value, "__wrapped__", None)
        except Exception:
            wrapped = None
        if callable(value) and callable(wrapped) and not isinstance(value, type):
            # `@functools.cache` and other wrapping decorators: the wrapped code counts,
            # the wrapper's state (its memo) does not
            return f"wrapped:{_qualname(value)}({self(wrapped, where, depth + 1)})"
        if isinstance(value, (types.BuiltinFunctionType, types.MethodDescriptorType)):
            name = f"builtin:{getattr(value, '__module__', '')}.{value.__qualname__}"
            bound = getattr(value, "__self__", None)  # `CACHE.append` reads CACHE
            if bound is None or isinstance(bound, types.ModuleType):
                return name
            return f"{name}({self(bound, where, depth + 1)})"
        if id(value) in self._path:
            return f"cycle:{kind.__name__}"
        self._path.add(id(value))
        try:
            return self._compound(value, where, depth + 1)
        finally:
            self._path.discard(id(value))

    def _code(self, obj: Any) -> None:
        if isinstance(obj, (types.FunctionType, type)) and in_project(_module_of(obj)):
            self.push(obj)

    def _compound(self, value: Any, where: str, depth: int) -> str:
        kind = type(value)
        head = _qualname(kind)
        if kind in _FLAT_CONTAINERS and all(type(v) in _REPR_TYPES for v in value):
            # the common case, e.g. FEATURES = ["a", "b"]: one repr (sets sorted: their
            # order follows string hashes, which differ between processes)
            shown = sorted(map(repr, value)) if isinstance(value, (set, frozenset)) else value
            return digest(f"{head}:{shown!r}")
        if kind is dict and all(
            type(k) in _REPR_TYPES and type(v) in _REPR_TYPES for k, v in value.items()
        ):
            return digest(f"{head}:{value!r}")
        if isinstance(value, (list, tuple)):
            self._code(kind)  # a namedtuple defined in the project
            items = [self(v, f"{where}[{i}]", depth) for i, v in enumerate(value)]
            return digest(f"{head}[{','.join(items)}]")
        if isinstance(value, (set, frozenset)):
            items = sorted(self(v, f"{where}{{...}}", depth) for v in value)
            return digest(f"{head}{{{','.join(items)}}}")
        if isinstance(value, (dict, types.MappingProxyType)):
            parts = [
                f"{self(k, where, depth)}:{self(v, f'{where}[{k!r}]', depth)}"
                for k, v in value.items()
            ]
            factory = getattr(value, "default_factory", None)  # a defaultdict
            if factory is not None:
                parts.append(f"factory={self(factory, where, depth)}")
            return digest(f"{head}{{{','.join(parts)}}}")
        if isinstance(value, (types.MethodType, functools.partial)):
            if isinstance(value, types.MethodType):
                inner = (value.__func__, value.__self__)
            else:
                inner = (value.func, value.args, value.keywords)
            return digest(f"{head}({self(inner, where, depth)})")
        if isinstance(value, _opaque_types()):
            raise Opaque(f"a {_type_name(value)}{where and f' at {where}'}")
        if dataclasses.is_dataclass(value):
            self._code(kind)
            fields = [
                f"{f.name}={self(getattr(value, f.name, None), f'{where}.{f.name}', depth)}"
                for f in dataclasses.fields(value)
            ]
            return digest(f"{head}({','.join(fields)})")
        state = getattr(value, "__dict__", None)
        if in_project(_module_of(kind)) and isinstance(state, dict) and not _slotted(kind):
            self._code(kind)  # an instance of the project's own class: its code and its state
            return digest(f"{head}({self(state, where, depth)})")
        return _library_token(value, where)


def _slotted(kind: type) -> bool:
    return any("__slots__" in vars(base) for base in kind.__mro__[:-1])


def _library_token(value: Any, where: str) -> str:
    """A deterministic dask token (arrays, frames, estimators, loggers...) or Opaque."""
    import dask
    from dask.base import tokenize

    try:
        with dask.config.set({"tokenize.ensure-deterministic": True}):
            return f"{_type_name(value)}:{tokenize(value)}"
    except Exception as exc:  # dask's TokenizationError, or whatever pickling raised
        raise Opaque(
            f"a value of type {_type_name(value)}{where and f' at {where}'} with no "
            f"deterministic token"
        ) from exc


# --- the walk -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CodeFingerprint:
    """{qualified name: digest} of a stage's code and constants, and why it cannot be
    trusted (`problems`, e.g. 'helpers.STATE is a _thread.lock'): then never cache it."""

    digests: dict[str, str]
    problems: tuple[str, ...] = ()

    @property
    def cacheable(self) -> bool:
        return not self.problems


def code_fingerprint(target: Callable[..., Any]) -> CodeFingerprint:
    """Digest `target` and every project function, class and constant it reaches.

    The walk stops after `MAX_OBJECTS` functions and classes; a walk cut off is a problem
    (a helper beyond the limit could change unseen), as is a constant without a token.
    """
    out: dict[str, str] = {}
    problems: list[str] = []
    seen: set[int] = set()
    stack: list[Any] = [target]
    tokens = _Tokens(stack.append)
    visited = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        if visited >= MAX_OBJECTS:
            problems.append(
                f"code walk stopped at MAX_OBJECTS={MAX_OBJECTS} functions and classes, so an "
                f"edit beyond them could go unseen"
            )
            break
        seen.add(id(obj))
        visited += 1
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None and callable(wrapped):
            stack.append(wrapped)
        if isinstance(obj, types.MethodType):
            stack.append(obj.__func__)
            continue
        if isinstance(obj, types.FunctionType):
            own = _own_function(obj)
            name = _qualname(obj)
            out[name] = own.digest
            project = in_project(_module_of(obj))
            _follow(own.names, obj.__globals__, stack, out, problems, tokens)
            for i, cell in enumerate(obj.__closure__ or ()):
                try:
                    content = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                free = obj.__code__.co_freevars[i] if i < len(obj.__code__.co_freevars) else i
                if _is_project_code(content):
                    stack.append(content)
                elif project:
                    _record(f"{name}:<closure {free}>", content, out, problems, tokens)
                elif isinstance(content, _SIMPLE):
                    out[f"{name}:<closure>"] = digest(repr(content))
        elif isinstance(obj, type):
            name = _qualname(obj)
            out[name] = _own_class(obj)
            if obj is target or in_project(_module_of(obj)):
                for _, member in _members(obj):
                    if obj is not target and not in_project(_module_of(member)):
                        continue  # e.g. Enum.__new__, set on every enum class
                    _follow(
                        _own_function(member).names,
                        member.__globals__,
                        stack,
                        out,
                        problems,
                        tokens,
                    )
                for attr, value in _class_constants(obj):
                    _record(f"{name}.{attr}", value, out, problems, tokens)
        else:  # a callable instance or something exotic: its type plus a value token
            _record(_qualname(type(obj)), obj, out, problems, tokens)
            if _is_project_code(type(obj)):
                stack.append(type(obj))
    return CodeFingerprint(out, tuple(problems))


def code_digests(target: Callable[..., Any]) -> dict[str, str]:
    """{qualified name: digest} of `target`'s code walk. A walk with problems gets an entry
    that differs on every call, so whoever keys on these digests never gets a stale hit."""
    found = code_fingerprint(target)
    out = dict(found.digests)
    if found.problems:
        import uuid

        out["<not cacheable>"] = uuid.uuid4().hex
    return out


def _is_project_code(obj: Any) -> bool:
    return isinstance(obj, (types.FunctionType, type)) and in_project(_module_of(obj))


def _record(
    label: str, value: Any, out: dict[str, str], problems: list[str], tokens: _Tokens
) -> None:
    """Add a constant's token to `out`, or a problem when it has none."""
    try:
        out[label] = tokens(value)
    except Opaque as exc:
        out[label] = "<no token>"
        problems.append(f"{label} is {exc}")
    except RecursionError:
        out[label] = "<no token>"
        problems.append(f"{label} is nested too deeply")


def _follow(
    names: Iterable[str],
    namespace: Mapping[str, Any],
    stack: list[Any],
    out: dict[str, str],
    problems: list[str],
    tokens: _Tokens,
) -> None:
    """Push the project functions/classes among `names` and record the constants they
    name: every kind in the project's modules, scalars only in other packages' modules."""
    modules = []
    module_name = namespace.get("__name__", "?")
    project = in_project(module_name) if isinstance(module_name, str) else False
    for name in names:
        if name not in namespace:
            continue  # a builtin, an attribute name, or a local
        value = namespace[name]
        if isinstance(value, (types.FunctionType, type)):
            if in_project(_module_of(value)):
                stack.append(value)
        elif isinstance(value, types.ModuleType):
            if in_project(value.__name__):
                modules.append(value)
        elif project:
            _record(f"{module_name}.{name}", value, out, problems, tokens)
        elif isinstance(value, _SIMPLE):
            out[f"{module_name}.{name}"] = digest(repr(value))
    for module in modules:  # `helpers.clean(x)`: co_names holds both 'helpers' and 'clean'
        attrs = vars(module)
        for name in names:
            if name not in attrs:
                continue
            value = attrs[name]
            if isinstance(value, (types.FunctionType, type)):
                if in_project(_module_of(value)):
                    stack.append(value)
            elif not isinstance(value, types.ModuleType):
                _record(f"{module.__name__}.{name}", value, out, problems, tokens)


def combined(digests: Mapping[str, str]) -> str:
    """One digest for a {name: digest} mapping (order independent)."""
    return digest("\x1f".join(f"{k}={v}" for k, v in sorted(digests.items())))


# --- watched files ------------------------------------------------------------------------

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """Content hash of a small file, `mtime:size` of a big one; cached by (path, mtime, size)."""
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    if stat.st_size > CONTENT_HASH_LIMIT:
        return f"mtime:{stat.st_mtime_ns}:size:{stat.st_size}"
    memo = (path, stat.st_mtime_ns, stat.st_size)
    found = _FILE_HASHES.get(memo)
    if found is None:
        hasher = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(block)
        except OSError:
            return "unreadable"
        found = _FILE_HASHES[memo] = hasher.hexdigest()
    return found


def watch_digests(patterns: Iterable[str], root: str | None = None) -> dict[str, str]:
    """{path: digest} of the files matched by `patterns` (globs, `**` allowed), sorted.

    A pattern matching nothing maps to "missing", so creating the file changes the key.
    Relative patterns are resolved against `root` (default: the working directory).
    """
    out: dict[str, str] = {}
    for pattern in patterns:
        full = os.path.join(root, pattern) if root and not os.path.isabs(pattern) else pattern
        matches = sorted(glob.glob(full, recursive=True))
        files: list[str] = []
        for match in matches:
            if os.path.isdir(match):
                for dirpath, _, names in os.walk(match):
                    files.extend(os.path.join(dirpath, n) for n in sorted(names))
            else:
                files.append(match)
            if len(files) >= MAX_WATCHED_FILES:
                break
        if not files:
            out[pattern] = "missing"
        for path in files[:MAX_WATCHED_FILES]:
            shown = os.path.relpath(path, root) if root else path
            out[shown] = file_digest(path)
    return out


def outs_digests(paths: Iterable[str], root: str | None = None) -> dict[str, str]:
    """{path: digest} of a stage's declared outputs (files, and every file under a
    directory), named relative to `root` like watched files; a missing one is "missing"."""
    out: dict[str, str] = {}
    for path in paths:
        found = watch_digests([glob.escape(path)], root)
        for name, value in found.items():
            if value == "missing" and name == glob.escape(path):
                full = os.path.join(root, path) if root and not os.path.isabs(path) else path
                name = os.path.relpath(full, root) if root else path
            out[name] = value
    return out
