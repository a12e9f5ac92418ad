"""The outcome of a pipeline run: stage outputs, states, timings and errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..errors import StageError, did_you_mean, where
from .states import State, count_states


class RunResult(Mapping[str, Any]):
    """`result["stage"]` is a stage's output; `status`, `durations`, `errors` describe the run."""

    def __init__(
        self,
        pipeline: str,
        outputs: Mapping[str, Any],
        status: Mapping[str, State],
        durations: Mapping[str, float] | None = None,
        errors: Mapping[str, StageError] | None = None,
        run_id: str = "",
        reasons: Mapping[str, str] | None = None,
        lazy: Mapping[str, Callable[[], Any]] | None = None,
        stored_metrics: Mapping[str, Callable[[], Mapping[str, Any]]] | None = None,
    ):
        self.pipeline = pipeline
        self.outputs = dict(outputs)
        #: cached stages whose output nobody needed during the run: loaded on first access
        self._lazy: dict[str, Callable[[], Any]] = dict(lazy or {})
        #: the metrics recorded with those cached outputs (read without loading them)
        self._stored_metrics = dict(stored_metrics or {})
        self.status: dict[str, State] = dict(status)
        self.durations: dict[str, float] = dict(durations or {})
        self.errors: dict[str, StageError] = dict(errors or {})
        self.reasons: dict[str, str] = dict(reasons or {})
        self.run_id = run_id
        #: where observers recorded the run, e.g. {"mlflow_run_id": ..., "mlflow_uri": ...}
        self.tracking: dict[str, str] = {}

    def __getitem__(self, stage: str) -> Any:
        try:
            return self.outputs[stage]
        except KeyError:
            pass
        loader = self._lazy.get(stage)
        if loader is not None:
            value = self.outputs[stage] = loader()
            del self._lazy[stage]
            return value
        state = self.status.get(stage)
        if state == "failed":
            raise KeyError(f"{where(self.pipeline, stage)} failed: {self.errors[stage]}")
        if state == "skipped":
            reason = self.reasons.get(stage, "an upstream stage failed")
            raise KeyError(f"{where(self.pipeline, stage)} was skipped: {reason}")
        raise KeyError(
            f"{where(self.pipeline, stage)} has no output in this run"
            f"{did_you_mean(stage, self.status)}; stages with outputs: {', '.join(self.outputs)}"
        )

    def __iter__(self) -> Iterator[str]:
        if not self._lazy:
            return iter(self.outputs)
        return iter([n for n in self.status if n in self.outputs or n in self._lazy])

    def __len__(self) -> int:
        return len(self.outputs) + len(self._lazy)

    def __contains__(self, stage: object) -> bool:
        return stage in self.outputs or stage in self._lazy

    @property
    def ok(self) -> bool:
        """True when no stage failed or was skipped."""
        return not any(s in ("failed", "skipped") for s in self.status.values())

    @property
    def failed(self) -> list[str]:
        return [name for name, state in self.status.items() if state == "failed"]

    def metrics(self) -> dict[str, dict[str, float]]:
        """Numeric scalars of dict outputs, by stage: what tracking logs as metrics.

        Cached outputs not yet read report the metrics stored with their entry."""
        from .metrics import numeric_items

        found = {}
        for name in list(self):
            if name in self._lazy and name in self._stored_metrics:
                items = numeric_items(self._stored_metrics[name]())  # no unpickling
            else:
                items = numeric_items(self[name])
            if items:
                found[name] = items
        return found

    def summary(self) -> str:
        """A plain-text table: stage, state, seconds."""
        width = max((len(s) for s in self.status), default=5)
        lines = [f"{'stage':<{width}}  {'state':<8} {'seconds':>8}"]
        for name, state in self.status.items():
            seconds = self.durations.get(name)
            shown = f"{seconds:8.3f}" if seconds is not None else " " * 8
            lines.append(f"{name:<{width}}  {state:<8} {shown}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<RunResult pipeline={self.pipeline!r} {count_states(self.status.values())}>"
