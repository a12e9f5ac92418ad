"""Which config values are secrets, and the config with them replaced by `***`.

The rule, in one place (docs/security.md quotes it): a key is secret when

- one of its words is `password`, `passwd`, `passphrase`, `secret`, `secrets`, `token`,
  `credential`, `credentials` or `apikey` (`db_password`, `githubToken`, `client_secret`);
- or its last word is `key` (`key`, `api_key`, `accessKey`), or its last two `key id`
  (`access_key_id`) -- so `keys`, `key_col`, `monkey` and `sort_keys` are not secrets;
- or it sits anywhere under `cache.options` (fsspec's credentials and connection options).

Words are the pieces of a key split at `_`, `-`, `.`, spaces and camelCase humps, compared
lower-case. A secret key keeps its name; its value (whole sub-tree) becomes `***`. Two more
things are scrubbed from every string: the password of a URL (`scheme://user:***@host`),
and any secret value found under a secret key wherever else it appears (a
`${vars.db_password}` interpolated into another param, or into an override).

Standard library only: every layer (tracking, display, cache, CLI) can use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

MASK = "***"
#: a word that makes any key containing it secret
SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "secrets",
        "token",
        "credential",
        "credentials",
        "apikey",
    }
)
#: key paths whose whole sub-tree is secret
SECRET_SECTIONS = (("cache", "options"),)
#: secret values shorter than this are not searched for elsewhere (too many false hits)
MIN_SCRUB = 4

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<pw>[^@\s/]+)@")
_LITERAL_KEY = re.compile(r"([A-Za-z_][\w-]*)\s*:")


def words(key: str) -> list[str]:
    """`db_password` -> [db, password]; `apiKey` -> [api, key]; `AWS_KEY_ID` -> [aws, key, id]."""
    return [w.lower() for w in _WORD.findall(str(key))]


@lru_cache(maxsize=65536)  # keys repeat (params, sections): each is split once
def is_secret_key(key: str) -> bool:
    """THE rule for one key name (see the module docstring)."""
    found = words(key)
    if not found:
        return False
    if SECRET_WORDS.intersection(found):
        return True
    return found[-1] == "key" or found[-2:] == ["key", "id"]


def is_secret_path(path: Sequence[str]) -> bool:
    """A dotted key path (as a sequence of keys) whose value is a secret."""
    parts = [str(p) for p in path]
    for section in SECRET_SECTIONS:
        if tuple(parts[: len(section)]) == section and len(parts) > len(section):
            return True
    return any(is_secret_key(part) for part in parts)


def _child(section: tuple[str, ...] | None, key: Any) -> tuple[tuple[str, ...] | None, bool]:
    """For `key` under a mapping at `section` (its path while it may still lead into a
    SECRET_SECTION, else None): the child's section, and whether the section rule makes
    the child secret. Each key is judged once on the way down, never a whole path again."""
    if section is None:
        return None, False
    if section in SECRET_SECTIONS:
        return None, True
    path = (*section, str(key))
    return (path if any(s[: len(path)] == path for s in SECRET_SECTIONS) else None), False


def secret_values(config: Any, path: tuple[str, ...] = ()) -> set[str]:
    """Every string under a secret key (what to scrub elsewhere; other scalars are too
    short-lived as text, e.g. `True`, to search for)."""
    found: set[str] = set()
    secret = bool(path) and is_secret_path(path)
    _collect(config, tuple(path) if not path else None, secret, found)
    return found


#: leaf types of a plain config: checked first, as `isinstance(x, Mapping)` is slow
_SCALARS = (str, int, float, bool, type(None))


def _collect(value: Any, section: tuple[str, ...] | None, secret: bool, found: set[str]) -> None:
    if isinstance(value, _SCALARS):
        if secret and isinstance(value, str) and len(value) >= MIN_SCRUB:
            found.add(value)
        return
    if isinstance(value, list | tuple):
        for item in value:
            _collect(item, None, secret, found)
        return
    if not isinstance(value, Mapping):
        return
    for key, item in value.items():
        below, forced = _child(section, key) if section is not None else (None, False)
        hidden = secret or forced or is_secret_key(key if type(key) is str else str(key))
        if hidden or not isinstance(item, _SCALARS):
            _collect(item, below, hidden, found)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without URL passwords and without any of `secrets`."""
    if "@" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    for secret in secrets if isinstance(secrets, list) else _longest_first(secrets):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _longest_first(secrets: Iterable[str]) -> list[str]:
    return sorted(secrets, key=len, reverse=True)


def redact(config: Any, secrets: Iterable[str] | None = None, path: tuple[str, ...] = ()) -> Any:
    """A copy of `config` (mappings, lists, scalars) with secrets masked; `config` unchanged.

    `secrets` defaults to the secret values found in `config` itself.
    """
    found = secret_values(config, path) if secrets is None else secrets
    secret = bool(path) and is_secret_path(path)
    return _redact(config, _longest_first(found), tuple(path) if not path else None, secret)


def _redact(value: Any, secrets: list[str], section: tuple[str, ...] | None, secret: bool) -> Any:
    if secret and not _is_empty(value):
        return MASK
    if isinstance(value, str):
        return scrub(value, secrets) if secrets or "@" in value else value
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list | tuple):
        return type(value)(_redact(item, secrets, None, False) for item in value)
    if not isinstance(value, Mapping):
        return value
    shown = {}
    for key, item in value.items():
        below, forced = _child(section, key) if section is not None else (None, False)
        hidden = forced or is_secret_key(key if type(key) is str else str(key))
        shown[key] = _redact(item, secrets, below, hidden)
    return shown


def _is_empty(value: Any) -> bool:
    """`None`, `{}` and `[]` say nothing; keep them so a config still reads as it was."""
    if value is None or isinstance(value, _SCALARS):
        return value is None
    return isinstance(value, Mapping | list | tuple) and not value


def redact_override(override: str, secrets: Iterable[str] = ()) -> str:
    """One Hydra override (`+vars.db_password=x`, `cache.options={key: x}`) made safe.

    The key decides as in `is_secret_path`; a `{...}`/`[...]` value naming a secret key
    inside is masked whole; any other value is scrubbed.
    """
    key, sep, value = override.partition("=")
    if not sep:
        return scrub(override, secrets)
    path = key.lstrip("+~").split("@", 1)[0].split(".")
    if is_secret_path(path) or (
        path in [list(s) for s in SECRET_SECTIONS] and value.strip() not in ("", "{}", "null")
    ):
        return f"{key}={MASK}"
    literal = value.lstrip()
    if literal[:1] in "{[" and any(is_secret_key(k) for k in _LITERAL_KEY.findall(literal)):
        return f"{key}={MASK}"
    return f"{key}={scrub(value, secrets)}"


def redact_overrides(overrides: Iterable[str], config: Any = None) -> list[str]:
    """Overrides as `redact_override` shows them, scrubbing secret values of `config` too."""
    secrets = secret_values(config) if config is not None else set()
    return [redact_override(o, secrets) for o in overrides]
