"""Static checks of `promote`: a promotion that can never act is a config error.

A stage's `promote` moves an alias on the model versions produced at or upstream of it
(a model stage promotes its own new version, a gate stage the models it checked). With a
`metric` (`stage.key`), the value comes from a stage of the same run that is upstream of
(or is) the promoting stage; `tracking/promotion.py` does the moving.
"""

from __future__ import annotations

from ..errors import PromotionConfigError, did_you_mean, where
from .graph import Graph
from .spec import PipelineSpec


def check_promotion(spec: PipelineSpec, graph: Graph) -> None:
    """Raise PromotionConfigError for a `promote` without a model stage at or upstream of
    it, or whose `metric` names no stage at or upstream of it (or a metric it never logs)."""
    for name, stage in spec.stages.items():
        if not stage.promote:
            continue
        above = graph.upstream([name])
        key = f"stages.{_declared(spec, name)}.promote"
        if not any(spec.stages[n].model for n in above):
            raise PromotionConfigError(
                f"{where(spec.name, key=key)} can never act: no model stage (`model: true`) "
                f"is at or upstream of stage '{name}'; put promote on the model stage or on a "
                f"stage that takes its output (inputs or after), or remove it"
            )
        if stage.promote_metric:
            metric_source(spec, graph, name, stage.promote_metric)


def metric_source(spec: PipelineSpec, graph: Graph, stage: str, metric: str) -> tuple[str, str]:
    """The (stage, key) a promoting `stage`'s `metric` (`evaluate.accuracy`) reads; a matrix
    name resolves to its one member upstream of `stage`. PromotionConfigError otherwise."""
    key = f"stages.{_declared(spec, stage)}.promote.metric"
    above = graph.upstream([stage])
    names = [*spec.stages, *spec.matrices]
    source = max((n for n in names if metric.startswith(f"{n}.")), key=len, default=None)
    if source is None:
        wanted = metric.partition(".")[0]
        known = [n for n in spec.stages if n in above and not spec.stages[n].matrix]
        raise PromotionConfigError(
            f"{where(spec.name, key=key)} '{metric}' names no stage of the pipeline"
            f"{did_you_mean(wanted, list(spec.stages) + list(spec.matrices))}; use "
            f"<stage>.<metric> of a stage at or upstream of '{stage}' "
            f"({', '.join(known)})"
        )
    metric_key = metric[len(source) + 1 :]
    if source in spec.matrices:  # the member this stage's branch depends on
        members = [m for m in spec.matrices[source] if m in above]
        if len(members) != 1:
            raise PromotionConfigError(
                f"{where(spec.name, key=key)} '{metric}' names matrix '{source}', of which "
                f"{len(members)} members are upstream of '{stage}'; name one member, "
                f"e.g. {spec.matrices[source][0]}.{metric_key}"
            )
        source = members[0]
    if source not in above:
        known = [n for n in spec.stages if n in above]
        raise PromotionConfigError(
            f"{where(spec.name, key=key)} '{metric}': stage '{source}' is not upstream of "
            f"'{stage}', so its value is not known when '{stage}' promotes; use a metric of "
            f"{', '.join(known)}, or add `after: [{source}]` to stage '{stage}'"
        )
    declared = spec.stages[source].metrics
    if declared and metric_key not in declared and metric_key != "duration_s":
        raise PromotionConfigError(
            f"{where(spec.name, key=key)} '{metric}': stage '{source}' logs no metric "
            f"'{metric_key}'{did_you_mean(metric_key, declared)}; its metrics are "
            f"{', '.join(declared)}"
        )
    return source, metric_key


def _declared(spec: PipelineSpec, name: str) -> str:
    """The name a user writes in an override: a matrix member's matrix name."""
    return name.partition("[")[0]
