"""Fingerprints for the stage cache: code (with the project's own helpers), values, files.

A stage's code fingerprint covers its function's bytecode, constants and defaults, and
walks the globals it names to the functions, classes and simple constants of the
user's own project (not the standard library or installed packages), recursively and
bounded. Editing a helper in `mypkg/utils.py` therefore changes the key of every stage
that calls it, which is what path-based caches (Ploomber, DVC, Hamilton) miss.

Per-object digests are memoised (keyed by the object, checked against its `__code__`),
the walk itself is redone per planning pass so a rebound global in a notebook counts.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import site
import sys
import sysconfig
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from functools import cache, lru_cache
from typing import Any

#: At most this many functions/classes per code walk (a stage calling half a project).
MAX_OBJECTS = 400
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
    """One object's own digest and the global names its code refers to."""

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


def _members(cls: type) -> list[tuple[str, Any]]:
    """A class's own functions (methods, static/class methods, property accessors)."""
    found = []
    for name, attr in sorted(vars(cls).items()):
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if isinstance(attr, property):
            for accessor in (attr.fget, attr.fset, attr.fdel):
                if isinstance(accessor, types.FunctionType):
                    found.append((name, accessor))
        elif isinstance(attr, types.FunctionType) or (
            isinstance(attr, _SIMPLE) and not name.startswith("__")
        ):
            found.append((name, attr))
    return found


def _own_class(cls: type) -> _Own:
    found = _OWN.get(cls)
    if found is not None:
        return found
    parts = [cls.__qualname__, ",".join(_qualname(b) for b in cls.__bases__)]
    for name, member in _members(cls):
        if isinstance(member, types.FunctionType):
            parts.append(f"{name}:{_own_function(member).digest}")
        else:
            parts.append(f"{name}={member!r}")
    own = _Own(None, digest("\x1f".join(parts)), ())
    with contextlib.suppress(TypeError):
        _OWN[cls] = own
    return own


def code_digests(target: Callable[..., Any]) -> dict[str, str]:
    """Digest of `target` and of every project function/class/constant it reaches.

    Returns {qualified name: digest}; the key uses all of it, `explain` names the changes.
    """
    out: dict[str, str] = {}
    seen: set[int] = set()
    stack: list[Any] = [target]
    while stack and len(out) < MAX_OBJECTS:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None and callable(wrapped):
            stack.append(wrapped)
        if isinstance(obj, types.MethodType):
            stack.append(obj.__func__)
            continue
        if isinstance(obj, types.FunctionType):
            own = _own_function(obj)
            out[_qualname(obj)] = own.digest
            _follow(obj, own.names, obj.__globals__, stack, out)
            for cell in obj.__closure__ or ():
                try:
                    content = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if _is_project_code(content):
                    stack.append(content)
                elif isinstance(content, _SIMPLE):
                    out[f"{_qualname(obj)}:<closure>"] = digest(repr(content))
        elif isinstance(obj, type):
            out[_qualname(obj)] = _own_class(obj).digest
            if obj is target or in_project(_module_of(obj)):
                for _, member in _members(obj):
                    if isinstance(member, types.FunctionType):
                        _follow(obj, _own_function(member).names, member.__globals__, stack, out)
        else:  # a callable instance or something exotic: its type plus a value token
            out[_qualname(type(obj))] = value_token(obj)
            if _is_project_code(type(obj)):
                stack.append(type(obj))
    return out


def _is_project_code(obj: Any) -> bool:
    return isinstance(obj, (types.FunctionType, type)) and in_project(_module_of(obj))


def _follow(
    owner: Any,
    names: Iterable[str],
    namespace: Mapping[str, Any],
    stack: list[Any],
    out: dict[str, str],
) -> None:
    """Push the project functions/classes among `names`; record simple module constants."""
    modules = []
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
        elif isinstance(value, _SIMPLE):
            module = namespace.get("__name__", "?")
            out[f"{module}.{name}"] = digest(repr(value))
    for module in modules:  # `helpers.clean(x)`: co_names holds both 'helpers' and 'clean'
        attrs = vars(module)
        for name in names:
            value = attrs.get(name)
            if isinstance(value, (types.FunctionType, type)) and in_project(_module_of(value)):
                stack.append(value)
            elif isinstance(value, _SIMPLE) and name in attrs:
                out[f"{module.__name__}.{name}"] = digest(repr(value))


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
