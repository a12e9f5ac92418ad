"""The DAG of stages: edge checks, cycles with their path, order and slicing.

Standard library only, iterative throughout (100k-stage pipelines must not hit the
recursion limit). Modelled on `graphlib`: small, and `CycleError` carries the cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..errors import CycleError, SelfEdgeError, UnknownStageError, did_you_mean, where
from .spec import PipelineSpec


class Graph:
    """An immutable DAG over names; `deps[name]` are the names it waits for."""

    __slots__ = ("_deps", "_order")

    def __init__(self, deps: Mapping[str, Sequence[str]]):
        self._deps = deps
        self._order: list[str] | None = None

    @classmethod
    def of(cls, spec: PipelineSpec) -> Graph:
        """The graph of a pipeline whose edges were checked by `check_edges`."""
        return cls({name: stage.upstream for name, stage in spec.stages.items()})

    @property
    def deps(self) -> Mapping[str, Sequence[str]]:
        return self._deps

    def find_cycle(self) -> list[str] | None:
        """A cycle as a path whose first and last names are equal, or None."""
        deps = self._deps
        done: set[str] = set()
        for root in deps:
            if root in done:
                continue
            path: list[str] = [root]
            on_path = {root: 0}
            iters = [iter(deps[root])]
            while iters:
                for dep in iters[-1]:
                    if dep in on_path:  # back edge: path[on_path[dep]:] is the cycle
                        cycle = [*path[on_path[dep] :], dep]
                        cycle.reverse()  # report in execution order: dep -> ... -> dep
                        return cycle
                    if dep not in done:
                        on_path[dep] = len(path)
                        path.append(dep)
                        iters.append(iter(deps[dep]))
                        break
                else:
                    iters.pop()
                    node = path.pop()
                    del on_path[node]
                    done.add(node)
        return None

    def order(self) -> list[str]:
        """Topological order, stable with respect to declaration order (Kahn)."""
        if self._order is None:
            deps = self._deps
            waiting: dict[str, int] = {}
            children: dict[str, list[str]] = {}  # only names something waits for
            ready: list[str] = []
            for name, d in deps.items():
                if not d:
                    ready.append(name)
                    continue
                waiting[name] = len(d)
                for dep in d:
                    kids = children.get(dep)
                    if kids is None:
                        children[dep] = [name]
                    else:
                        kids.append(name)
            ready.reverse()
            order: list[str] = []
            while ready:
                name = ready.pop()
                order.append(name)
                kids = children.get(name)
                if kids is None:
                    continue
                released = []
                for child in kids:
                    left = waiting[child] - 1
                    waiting[child] = left
                    if not left:
                        released.append(child)
                ready.extend(reversed(released))
            if len(order) != len(deps):
                cycle = self.find_cycle() or []
                raise CycleError(f"cycle {' -> '.join(cycle)}", cycle)
            self._order = order
        return self._order

    def upstream(self, names: Iterable[str]) -> set[str]:
        """`names` and everything they transitively wait for."""
        return _closure(names, self._deps)

    def downstream(self, names: Iterable[str]) -> set[str]:
        """`names` and everything that transitively waits for them."""
        children: dict[str, list[str]] = {name: [] for name in self._deps}
        for name, d in self._deps.items():
            for dep in d:
                children[dep].append(name)
        return _closure(names, children)

    def subgraph(self, names: set[str]) -> Graph:
        return Graph({n: d for n, d in self._deps.items() if n in names})


def _closure(start: Iterable[str], edges: Mapping[str, Sequence[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(start)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(edges[name])
    return seen


def check_edges(spec: PipelineSpec) -> Graph:
    """Check every edge names a known stage and that the graph is acyclic; return it."""
    names = spec.stages
    for stage in names.values():
        own = stage.name
        for arg, ref in stage.inputs.items():
            for source in ref.sources:  # a fan-in reads every member of a matrix
                if source == own or source not in names:
                    _check_ref(spec.name, own, f"input '{arg}'", source, names)
        for dep in stage.after:
            _check_ref(spec.name, own, "'after'", dep, names)
    graph = Graph.of(spec)
    try:
        graph.order()  # fails on a cycle; a valid graph keeps its order for later
    except CycleError as exc:
        cycle = exc.cycle
        raise CycleError(f"{where(spec.name)}: cycle {' -> '.join(cycle)}", cycle) from None
    return graph


def check_targets(spec: PipelineSpec, targets: Iterable[str] | str) -> list[str]:
    """Validate names asked for in `targets` (one name or several); return them as a list."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if spec.matrices:  # `train` means every member, `train[region=eu]` the matching ones
        return _matrix_targets(spec, targets)
    for name in targets:
        if name not in spec.stages:
            raise UnknownStageError(
                f"{where(spec.name)}: target '{name}' is not a stage"
                f"{did_you_mean(name, spec.stages)}; stages are {', '.join(spec.stages)}"
            )
    return targets


def _matrix_targets(spec: PipelineSpec, targets: list[str]) -> list[str]:
    from .matrix import names_for_messages, target_names

    found: list[str] = []
    for name in targets:
        names = target_names(spec.stages, spec.matrices, name)
        if names is None:
            known = names_for_messages(spec.stages, spec.matrices)
            raise UnknownStageError(
                f"{where(spec.name)}: target '{name}' is not a stage or matrix member"
                f"{did_you_mean(name, known)}; stages are {', '.join(known)}"
            )
        found.extend(names)
    return list(dict.fromkeys(found))


def _check_ref(pipeline: str, stage: str, what: str, ref: str, names: Mapping) -> None:
    if ref == stage:
        raise SelfEdgeError(
            f"{where(pipeline, stage, what)} refers to the stage itself; a stage cannot "
            f"depend on its own output",
            [stage, stage],
        )
    if ref not in names:
        raise UnknownStageError(
            f"{where(pipeline, stage, what)} refers to unknown stage '{ref}'"
            f"{did_you_mean(ref, names)}"
        )
