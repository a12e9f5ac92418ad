"""Stage matrices: one declared stage expanded into many members, after composition.

Hydra composes one small stage; pipekit expands it here, so 100,000 members cost no YAML::

    train:
      _target_: mypkg.train
      matrix: {region: [eu, us], model: [logreg, forest]}   # -> 4 members
      members:                                              # optional per-member params
        - where: {region: eu}
          params: {C: 0.5}
    compare:
      inputs: {models: "train[*]"}                          # fan-in: {member name: output}

Members are named `train[region=eu,model=logreg]` (axes in declared order) and get the
matrix values as params; `foreach: [a, b]` is a one-axis matrix whose value is the param
`item` (members `train[a]`, `train[b]`). `foreach: {keys_of: split}` is the same over the
keys split's output is *declared* to have (the return annotation of its `_target_`, a
TypedDict or dataclass: known when the config is parsed, without running anything);
member `train[eu]` gets `item="eu"` and the input `split` <- `split.eu` (`input:` renames
that argument). Overrides of `stages.train.*` apply to every member. How other stages
refer to a matrix stage (`Ref` text):

| input text                    | the argument receives                                  |
|-------------------------------|--------------------------------------------------------|
| `train[*]` (`train[*].key`)   | dict member name -> output, in member order           |
| `train[:]` (`train[:].key`)   | list of outputs, in member order                      |
| `train[region=eu]`            | dict of the members matching the selector             |
| `train[region=eu,model=logreg]` | that member's output (a selector naming every axis) |
| `train` in a matrix stage     | the member with the same values on train's axes       |

`after: [train]` waits for every member. A bare `train` input in a stage that is not a
matrix over train's axes is an error: say which of the forms above is meant.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from ..errors import (
    ConfigTypeError,
    DuplicateArgumentError,
    MatrixError,
    TargetImportError,
    UnknownKeyError,
    UnknownStageError,
    check_keys,
    did_you_mean,
    where,
)
from .declared import import_target, optional_keys, returned_type, type_keys
from .refs import Ref

#: a `spec.Stage` (not imported by name: `spec` imports this module)
Stage = Any

#: Stage keys that declare a matrix (read here, not by `spec._parse_stage`).
MATRIX_KEYS = ("matrix", "foreach", "members")
#: The param a `foreach` member receives its value as.
FOREACH_PARAM = "item"
#: Keys of the mapping form of `foreach` (`foreach: {keys_of: split}`), with their meaning.
FOREACH_KEYS = {
    "keys_of": "a stage whose output keys are declared (its _target_ returns a TypedDict or "
    "dataclass): one member per key",
    "input": "the argument each member receives `<stage>.<key>` as (default: the stage's name)",
}
#: Characters a matrix value may not contain when shown in a member name.
_RESERVED = re.compile(r"[\[\],=]")
_SCALARS = (str, int, float, bool)


def has_matrix(raw_stages: Mapping[str, Any]) -> bool:
    """True when any raw stage declares `matrix` or `foreach`."""
    return any(
        isinstance(body, Mapping) and ("matrix" in body or "foreach" in body)
        for body in raw_stages.values()
    )


def shown(value: Any) -> str:
    """A matrix value as it appears in member names (`true`, `0.1`, `eu`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def member_name(base: str, coords: Mapping[str, Any], foreach: bool = False) -> str:
    """`train[region=eu,model=logreg]`, or `train[eu]` for a `foreach` member."""
    if foreach:
        return f"{base}[{shown(coords[FOREACH_PARAM])}]"
    return f"{base}[{','.join(f'{axis}={shown(v)}' for axis, v in coords.items())}]"


def base_of(name: str) -> str:
    """The declared stage a member belongs to (`train[...]` -> `train`); else `name`."""
    return name.partition("[")[0]


def expand(
    pipeline: str, parsed: Mapping[str, Stage], raw_stages: Mapping[str, Any]
) -> tuple[dict[str, Stage], dict[str, tuple[str, ...]]]:
    """Replace every matrix stage by its members and resolve references to them.

    Returns the stages (members in place of their base, declaration order kept) and the
    matrices (base name -> member names).
    """
    axes: dict[str, dict[str, list[Any]]] = {}
    foreach: set[str] = set()
    members_of: dict[str, tuple[str, ...]] = {}
    coords_of: dict[str, dict[str, Any]] = {}
    stages: dict[str, Stage] = {}
    for name, stage in parsed.items():
        raw = raw_stages.get(name)
        if not isinstance(raw, Mapping) or not ("matrix" in raw or "foreach" in raw):
            if isinstance(raw, Mapping) and raw.get("members") is not None:
                raise MatrixError(
                    f"{where(pipeline, name, 'members')} is only allowed on a matrix stage; "
                    f"add `matrix:` or `foreach:` to stages.{name}"
                )
            stages[name] = stage
            continue
        stage_axes, is_foreach, source = _axes(pipeline, stage, raw, parsed, raw_stages)
        axes[name] = stage_axes
        if is_foreach:
            foreach.add(name)
        extra = _member_params(pipeline, stage, raw.get("members"), stage_axes)
        names = []
        keys = list(stage_axes)
        make = _member_factory(stage)  # `dataclasses.replace` costs 3x more per member
        # each value's part of the member names, made once (`member_name` for all members)
        labels = [
            [shown(v) if is_foreach else f"{axis}={shown(v)}" for v in values]
            for axis, values in stage_axes.items()
        ]
        columns = [
            list(zip(values, texts, strict=True))
            for values, texts in zip(stage_axes.values(), labels, strict=True)
        ]
        base_params = dict(stage.params)
        for combo in itertools.product(*columns):
            coords = dict(zip(keys, [value for value, _ in combo], strict=True))
            member = f"{name}[{','.join([text for _, text in combo])}]"
            params = {**base_params, **coords}
            for where_, more in extra:
                if all(coords[a] == v for a, v in where_.items()):
                    params.update(more)
            made = make(member, MappingProxyType(params), MappingProxyType(coords))
            if source is not None:  # keys_of: this member's key of the upstream output
                upstream, arg = source
                edge = {**stage.inputs, arg: Ref(upstream, coords[FOREACH_PARAM])}
                made = replace(made, inputs=MappingProxyType(edge))
            stages[member] = made
            coords_of[member] = coords
            names.append(member)
        members_of[name] = tuple(names)
    if not members_of:
        return stages, {}
    resolver = _Resolver(pipeline, axes, foreach, members_of, coords_of)
    for name, stage in stages.items():
        if not stage.inputs and not stage.after:
            continue
        inputs = {arg: resolver.ref(stage, arg, ref) for arg, ref in stage.inputs.items()}
        after = resolver.after(stage)
        if any(inputs[a] is not stage.inputs[a] for a in inputs) or after != stage.after:
            stages[name] = replace(stage, inputs=MappingProxyType(inputs), after=after)
    return stages, members_of


def _member_factory(stage: Stage) -> Any:
    """`make(name, params, matrix)`: a copy of `stage` with those three fields replaced."""
    from dataclasses import fields

    cls = type(stage)
    names = [f.name for f in fields(cls) if f.init]
    values = [getattr(stage, n) for n in names]
    at = {n: names.index(n) for n in ("name", "params", "matrix")}

    def make(name: str, params: Any, matrix: Any) -> Stage:
        args = list(values)
        args[at["name"]], args[at["params"]], args[at["matrix"]] = name, params, matrix
        return cls(*args)

    return make


def _axes(
    pipeline: str,
    stage: Stage,
    raw: Mapping[str, Any],
    parsed: Mapping[str, Stage],
    raw_stages: Mapping[str, Any],
) -> tuple[dict[str, list], bool, tuple[str, str] | None]:
    """The checked axes of a matrix (or the one `item` axis of a `foreach`), whether it is
    a foreach, and for `foreach: {keys_of: ...}` the upstream stage and the argument each
    member receives its key's value of that stage's output as (else None)."""
    name = stage.name
    source = None
    if "matrix" in raw and "foreach" in raw:
        raise MatrixError(
            f"{where(pipeline, name)}: give either 'matrix' or 'foreach', not both "
            f"(a foreach is a one-axis matrix)"
        )
    if "foreach" in raw:
        values = raw["foreach"]
        if isinstance(values, Mapping):
            values, source = _keys_of(pipeline, stage, values, parsed, raw_stages)
        elif not isinstance(values, Sequence) or isinstance(values, str):
            raise ConfigTypeError(
                f"{where(pipeline, name, 'foreach')} must be a list of values, e.g. "
                f"foreach: [eu, us], or {{keys_of: <stage>}} (one member per key of that "
                f"stage's declared output), got {type(values).__name__} {values!r}"
            )
        axes = {FOREACH_PARAM: _values(pipeline, name, "foreach", values)}
        is_foreach = True
    else:
        matrix = raw["matrix"]
        if not isinstance(matrix, Mapping) or not matrix:
            raise ConfigTypeError(
                f"{where(pipeline, name, 'matrix')} must be a mapping of param -> list of "
                f"values, e.g. matrix: {{region: [eu, us]}}, got {matrix!r}"
            )
        axes = {}
        for axis, values in matrix.items():
            axis = str(axis)
            if not axis.isidentifier():
                raise MatrixError(
                    f"{where(pipeline, name, f'matrix.{axis}')}: matrix axes are params, so "
                    f"their names must be Python identifiers"
                )
            if not isinstance(values, Sequence) or isinstance(values, str):
                raise ConfigTypeError(
                    f"{where(pipeline, name, f'matrix.{axis}')} must be a list of values, "
                    f"got {type(values).__name__} {values!r}"
                )
            axes[axis] = _values(pipeline, name, f"matrix.{axis}", values)
        is_foreach = False
    for axis in axes:
        if axis in stage.params:
            raise DuplicateArgumentError(
                f"{where(pipeline, name)}: '{axis}' is both a matrix axis and a param; the "
                f"matrix sets it for each member, so remove it from 'params'"
            )
        if axis in stage.inputs:
            raise DuplicateArgumentError(
                f"{where(pipeline, name)}: '{axis}' is both a matrix axis and an input; "
                f"rename the axis or the input"
            )
    return axes, is_foreach, source


def _keys_of(
    pipeline: str,
    stage: Stage,
    raw: Mapping[str, Any],
    parsed: Mapping[str, Stage],
    raw_stages: Mapping[str, Any],
) -> tuple[list[str], tuple[str, str]]:
    """`foreach: {keys_of: split, input: part}`: the keys split's output is declared to
    have, and (split, the argument that receives `split.<key>`).

    "Declared" means the return annotation of split's `_target_`: a TypedDict (its keys)
    or a dataclass (its fields). Reading it imports split's module, as validation does;
    nothing runs. Keys a TypedDict may leave out are refused: a member would have no input.
    """
    name = stage.name
    key = f"stages.{name}.foreach"
    at = where(pipeline, key=key)
    forms = "foreach: {keys_of: <stage>} or a list, foreach: [eu, us]"
    check_keys(raw, FOREACH_KEYS, UnknownKeyError, at, f"e.g. {forms}")
    upstream = raw.get("keys_of")
    if not isinstance(upstream, str) or not upstream:
        raise ConfigTypeError(
            f"{at}.keys_of must name the stage whose declared output keys name the members, "
            f"e.g. {key}.keys_of=split, got {upstream!r}; {forms}"
        )
    if upstream == name:
        raise MatrixError(
            f"{at}.keys_of: stage '{name}' cannot expand over its own output; name the "
            f"stage upstream of it whose keys it runs once per"
        )
    if upstream not in parsed:
        raise UnknownStageError(
            f"{at}.keys_of refers to unknown stage '{upstream}'"
            f"{did_you_mean(upstream, parsed)}; name a stage of this pipeline"
        )
    body = raw_stages.get(upstream)
    if isinstance(body, Mapping) and ("matrix" in body or "foreach" in body):
        raise MatrixError(
            f"{at}.keys_of: '{upstream}' is a matrix stage, whose members each have an "
            f"output; name a single stage (a fan-in over {upstream}[*] returning a TypedDict)"
        )
    arg = raw.get("input", upstream)
    if not isinstance(arg, str) or not arg.isidentifier():
        raise ConfigTypeError(
            f"{at}.input must be the name of the argument each member receives "
            f"'{upstream}.<key>' as, e.g. {key}.input=part, got {arg!r}"
        )
    if arg in stage.inputs or arg in stage.params or arg == FOREACH_PARAM:
        if arg == FOREACH_PARAM:
            clash = f"the param that holds each member's key ('{FOREACH_PARAM}')"
        else:
            clash = f"in stages.{name}.{'inputs' if arg in stage.inputs else 'params'}"
        raise DuplicateArgumentError(
            f"{at}: argument '{arg}' receives '{upstream}.<key>' but is also {clash}; "
            f"name another argument with {key}.input=<name>"
        )
    source = parsed[upstream]
    try:
        func = import_target(source.target)
    except Exception as exc:  # ImportError, AttributeError, or the module raised
        raise TargetImportError(
            f"{at}.keys_of: the keys of '{upstream}' come from the return annotation of "
            f"its _target_ '{source.target}', which cannot be imported "
            f"({type(exc).__name__}: {exc}); fix stages.{upstream}._target_"
        ) from exc
    try:
        declared = returned_type(func)
    except TypeError:  # an unhashable callable object
        declared = None
    if declared is None:
        raise MatrixError(
            f"{at}: the keys of '{upstream}' are not known before it runs: "
            f"{source.target} declares no TypedDict or dataclass as its return type; "
            f"annotate it (e.g. `-> Parts` with `class Parts(TypedDict): eu: ...; us: ...`) "
            f"or list the values yourself: {key}=[eu,us] (members then get only '{FOREACH_PARAM}')"
        )
    keys = list(type_keys(declared))
    kind = declared.__name__
    if not keys:
        raise MatrixError(
            f"{at}: '{upstream}' returns {kind}, which declares no keys, so there would be "
            f"no members; add keys to {kind} or list the values: {key}=[eu,us]"
        )
    optional = optional_keys(declared)
    if optional:
        raise MatrixError(
            f"{at}: '{upstream}' returns {kind}, which may leave out {', '.join(optional)} "
            f"(total=False or NotRequired), so a member could have no input; make those "
            f"keys required in {kind}"
        )
    for value in keys:
        if not value or _RESERVED.search(value):
            raise MatrixError(
                f"{at}: key {value!r} of {kind} (the output of '{upstream}') cannot name a "
                f"member: it is empty or contains one of [ ] , =; rename the key"
            )
    return keys, (upstream, arg)


def _values(pipeline: str, stage: str, key: str, values: Sequence[Any]) -> list[Any]:
    if not values:
        raise MatrixError(f"{where(pipeline, stage, key)} is empty; give at least one value")
    seen: dict[str, Any] = {}
    for value in values:
        if not isinstance(value, _SCALARS):
            raise ConfigTypeError(
                f"{where(pipeline, stage, key)} values must be strings, numbers or booleans "
                f"(they name the members), got {type(value).__name__} {value!r}; put "
                f"structured settings in params and select them by a name"
            )
        text = value if type(value) is str else shown(value)
        if not text or _RESERVED.search(text):
            raise MatrixError(
                f"{where(pipeline, stage, key)} value {text!r} cannot name a member: it is "
                f"empty or contains one of [ ] , ="
            )
        if text in seen:
            raise MatrixError(f"{where(pipeline, stage, key)} lists {text!r} twice")
        seen[text] = value
    return list(values)


def _member_params(
    pipeline: str, stage: Stage, raw: Any, axes: Mapping[str, list[Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """`members: [{where: {axis: value}, params: {...}}]`: params for matching members."""
    if raw is None:
        return []
    key = "members"
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ConfigTypeError(
            f"{where(pipeline, stage.name, key)} must be a list of {{where: {{axis: value}}, "
            f"params: {{...}}}}, got {type(raw).__name__}"
        )
    out = []
    for index, entry in enumerate(raw):
        at = f"{key}[{index}]"
        if not isinstance(entry, Mapping) or set(entry) - {"where", "params"}:
            raise ConfigTypeError(
                f"{where(pipeline, stage.name, at)} must be a mapping with 'where' and "
                f"'params', got {entry!r}"
            )
        selector, params = entry.get("where") or {}, entry.get("params") or {}
        if not isinstance(selector, Mapping) or not isinstance(params, Mapping):
            raise ConfigTypeError(
                f"{where(pipeline, stage.name, at)}: 'where' and 'params' must be mappings"
            )
        for axis, value in selector.items():
            if axis not in axes:
                raise MatrixError(
                    f"{where(pipeline, stage.name, f'{at}.where')}: '{axis}' is not a matrix "
                    f"axis{did_you_mean(str(axis), axes)}; axes are {', '.join(axes)}"
                )
            if value not in axes[axis]:
                raise MatrixError(
                    f"{where(pipeline, stage.name, f'{at}.where.{axis}')}: {value!r} is not "
                    f"one of its values ({', '.join(map(shown, axes[axis]))})"
                )
        for param in params:
            if param in axes:
                raise MatrixError(
                    f"{where(pipeline, stage.name, f'{at}.params')}: '{param}' is a matrix "
                    f"axis; its value is fixed by the member"
                )
            if param in stage.inputs:
                raise DuplicateArgumentError(
                    f"{where(pipeline, stage.name, f'{at}.params')}: '{param}' is an input"
                )
        out.append((dict(selector), {str(k): v for k, v in params.items()}))
    return out


def parse_selector(text: str) -> dict[str, str] | None:
    """`region=eu,model=logreg` -> {region: eu, model: logreg}; None if not `k=v` pairs."""
    found = {}
    for part in text.split(","):
        axis, sep, value = part.partition("=")
        if not sep or not axis.strip():
            return None
        found[axis.strip()] = value.strip()
    return found


class _Resolver:
    """Turns references to matrix stages into member or fan-in `Ref`s."""

    def __init__(
        self,
        pipeline: str,
        axes: Mapping[str, Mapping[str, list[Any]]],
        foreach: set[str],
        members: Mapping[str, tuple[str, ...]],
        coords: Mapping[str, Mapping[str, Any]],
    ):
        self.pipeline, self.axes, self.foreach = pipeline, axes, foreach
        self.members, self.coords = members, coords
        self._cache: dict[tuple[str, str | None], Ref] = {}

    def ref(self, stage: Stage, arg: str, ref: Ref) -> Ref:
        text = ref.stage
        base, bracket, rest = text.partition("[")
        if base not in self.members:
            if bracket and base:
                raise UnknownStageError(
                    f"{where(self.pipeline, stage.name, f'input {arg!r}')} refers to "
                    f"'{text}', but '{base}' is not a matrix stage"
                    f"{did_you_mean(base, self.members)}"
                )
            return ref
        if not bracket:
            return self._paired(stage, arg, ref)
        cached = self._cache.get((text, ref.key))
        if cached is not None:
            return cached
        inner = rest[:-1] if rest.endswith("]") else None
        if inner is None:
            raise UnknownStageError(
                f"{where(self.pipeline, stage.name, f'input {arg!r}')} '{text}' is missing "
                f"its closing ']'"
            )
        found = self._select(stage, arg, base, inner)
        self._cache[(text, ref.key)] = found if ref.key is None else replace(found, key=ref.key)
        return self._cache[(text, ref.key)]

    def _select(self, stage: Stage, arg: str, base: str, inner: str) -> Ref:
        members = self.members[base]
        text = f"{base}[{inner}]"
        if inner in ("*", ":"):
            return Ref(text, None, members, "dict" if inner == "*" else "list")
        if text in self.coords:
            return Ref(text)
        selector = {FOREACH_PARAM: inner} if base in self.foreach else parse_selector(inner)
        axes = self.axes[base]
        if selector is None or any(axis not in axes for axis in selector):
            raise UnknownStageError(
                f"{where(self.pipeline, stage.name, f'input {arg!r}')} refers to unknown "
                f"member '{text}'{did_you_mean(text, members[:1000])}; use {base}[*] (dict), "
                f"{base}[:] (list) or a selector over the axes {', '.join(axes)}"
            )
        matching = tuple(
            m for m in members if all(shown(self.coords[m][a]) == v for a, v in selector.items())
        )
        if not matching:
            raise UnknownStageError(
                f"{where(self.pipeline, stage.name, f'input {arg!r}')} '{text}' matches no "
                f"member of matrix '{base}'"
            )
        if len(selector) == len(axes):
            return Ref(matching[0])
        return Ref(text, None, matching, "dict")

    def _paired(self, stage: Stage, arg: str, ref: Ref) -> Ref:
        """A bare matrix name in a matrix stage: the member with the same axis values."""
        base = ref.stage
        axes = self.axes[base]
        mine = self.coords.get(stage.name)
        if mine is None or not set(axes) <= set(mine):
            why = (
                "this stage is not a matrix"
                if mine is None
                else f"this stage's matrix does not cover its axes ({', '.join(axes)})"
            )
            raise MatrixError(
                f"{where(self.pipeline, stage.name, f'input {arg!r}')} refers to matrix "
                f"stage '{base}' ({len(self.members[base])} members) but {why}; use "
                f"{base}[*] for a dict of all outputs, {base}[:] for a list, or one member "
                f"such as {self.members[base][0]}"
            )
        member = member_name(base, {a: mine[a] for a in axes}, base in self.foreach)
        if member not in self.coords:
            raise MatrixError(
                f"{where(self.pipeline, stage.name, f'input {arg!r}')}: matrix '{base}' has "
                f"no member {member} to pair with this member"
            )
        return Ref(member, ref.key)

    def after(self, stage: Stage) -> tuple[str, ...]:
        if not any(base_of(dep) in self.members for dep in stage.after):
            return stage.after
        out: list[str] = []
        for dep in stage.after:
            if dep in self.members:
                out.extend(self.members[dep])
            else:
                out.append(dep)
        return tuple(dict.fromkeys(out))


def target_names(
    stages: Mapping[str, Any], matrices: Mapping[str, Sequence[str]], name: str
) -> list[str] | None:
    """The stages `--targets NAME` means: itself, every member of a matrix, or the members
    a selector such as `train[region=eu]` matches; None when it names nothing."""
    if name in stages:
        return [name]
    if name in matrices:
        return list(matrices[name])
    base, bracket, rest = name.partition("[")
    if not bracket or base not in matrices or not rest.endswith("]"):
        return None
    inner = rest[:-1]
    if inner in ("*", ":"):
        return list(matrices[base])
    selector = parse_selector(inner)
    if selector is None:
        return None
    found = [
        m
        for m in matrices[base]
        if all(shown(stages[m].matrix.get(a, object())) == v for a, v in selector.items())
    ]
    return found or None


def names_for_messages(stages: Mapping[str, Any], matrices: Mapping[str, Sequence[str]]) -> list:
    """Stage names to list in an error: plain stages and matrix bases, not every member."""
    members = {m for names in matrices.values() for m in names}
    return [n for n in stages if n not in members] + [f"{b}[...]" for b in matrices]
