"""Fan-in arguments: one argument that receives the outputs of many matrix members.

A stage with `inputs: {models: "train[*]"}` depends on every member of `train`. Each
member is passed to its `StageTask` as an input of its own (`models<-train[eu]`), so the
usual checks apply per member (an upstream failure skips the stage, a missing `.key`
fails it naming the member); `FanInCall` then regroups those arguments into the dict or
list the stage function receives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: args of a StageTask: (argument, upstream position, key, source stage)
Args = tuple[tuple[str, int, str | None, str], ...]


def stage_args(
    stage: Any, func: Callable[..., Any], position: Mapping[str, int]
) -> tuple[Callable[..., Any], Args]:
    """The callable and StageTask args of a stage with fan-in inputs (`stage`: a spec.Stage)."""
    args: list[tuple[str, int, str | None, str]] = []
    groups: dict[str, tuple[str, tuple[str, ...]]] = {}
    for arg, ref in stage.inputs.items():
        if not ref.members:
            args.append((arg, position[ref.stage], ref.key, ref.stage))
            continue
        names = []
        for member in ref.members:
            name = f"{arg}<-{member}"
            args.append((name, position[member], ref.key, member))
            names.append(name)
        groups[arg] = (ref.form, tuple(names))
    return FanInCall(func, groups), tuple(args)


class FanInCall:
    """Calls `func` with each fan-in group of arguments gathered into one dict or list."""

    __slots__ = ("func", "groups")

    def __init__(self, func: Callable[..., Any], groups: Mapping[str, tuple[str, tuple[str, ...]]]):
        self.func, self.groups = func, dict(groups)

    def __reduce__(self):
        return (FanInCall, (self.func, self.groups))

    def __call__(self, **kwargs: Any) -> Any:
        for arg, (form, names) in self.groups.items():
            values = [kwargs.pop(name) for name in names]
            if form == "list":
                kwargs[arg] = values
            else:
                kwargs[arg] = {
                    name.partition("<-")[2]: v for name, v in zip(names, values, strict=True)
                }
        return self.func(**kwargs)

    def __repr__(self) -> str:
        return f"FanInCall({getattr(self.func, '__qualname__', self.func)!r})"
