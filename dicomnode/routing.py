"""Routing: a pure function of a series summary and the rules.

Rules are evaluated in order; the first whose every condition holds decides the plan. With no rules
configured the embedded default applies: every analyzer whose filter matches the series, and every
destination. With rules configured and none matching, the series is not processed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from dicomnode.config import Config, Match, Rule, compile_pattern
from dicomnode.domain import Priority, SeriesSummary

DEFAULT_RULE = "default"


@dataclass(frozen=True)
class Plan:
    rule: str
    analyzers: tuple[str, ...]
    destinations: tuple[str, ...]
    priority: Priority
    quiet_period_s: float
    late_policy: Literal["reprocess", "ignore"]
    late_window_min: float
    reasons: tuple[str, ...] = ()
    notify: tuple[str, ...] = ()  # notify channels told about this series' events
    notify_at: str = "urgent"  # the triage priority that makes a finding critical


@lru_cache(maxsize=1024)
def _pattern(text: str):  # type: ignore[no-untyped-def]
    return compile_pattern(text)


def _any_matches(patterns: Sequence[str], values: Sequence[str]) -> str | None:
    for pattern in patterns:
        regex = _pattern(pattern)
        for value in values:
            if regex.fullmatch(value) or (pattern.startswith("re:") and regex.search(value)):
                return f"{pattern!r} matches {value!r}"
    return None


def explain_match(match: Match, series: SeriesSummary) -> tuple[bool, list[str]]:
    """Whether ``match`` holds for ``series``, with one reason per condition checked."""
    reasons: list[str] = []
    text_conditions: list[tuple[str, list[str], Sequence[str]]] = [
        ("modality", match.modality, [series.modality]),
        ("sop_class_uid", match.sop_class_uid, list(series.sop_class_uids)),
        ("body_part", match.body_part, [series.body_part]),
        ("series_description", match.series_description, [series.series_description]),
        ("study_description", match.study_description, [series.study_description]),
        ("calling_ae", match.calling_ae, [series.calling_ae]),
        ("image_type", match.image_type, list(series.image_types)),
    ]
    for name, patterns, values in text_conditions:
        if not patterns:
            continue
        hit = _any_matches(patterns, values)
        if hit is None:
            reasons.append(f"{name}: none of {patterns} matches {list(values)}")
            return False, reasons
        reasons.append(f"{name}: {hit}")
    if match.min_instances is not None:
        if series.instance_count < match.min_instances:
            reasons.append(f"instances: {series.instance_count} < min {match.min_instances}")
            return False, reasons
        reasons.append(f"instances: {series.instance_count} >= min {match.min_instances}")
    if match.max_instances is not None:
        if series.instance_count > match.max_instances:
            reasons.append(f"instances: {series.instance_count} > max {match.max_instances}")
            return False, reasons
        reasons.append(f"instances: {series.instance_count} <= max {match.max_instances}")
    if not reasons:
        reasons.append("no conditions: matches every series")
    return True, reasons


def rule_name(rule: Rule, index: int) -> str:
    return rule.name or f"rules[{index}]"


def plan_for(
    series: SeriesSummary,
    config: Config,
    default_analyzers: Callable[[SeriesSummary], list[str]],
) -> Plan | None:
    """The plan for a series, or None when rules exist and none matches."""
    a = config.assembly
    if not config.rules:
        return Plan(
            rule=DEFAULT_RULE,
            analyzers=tuple(default_analyzers(series)),
            destinations=tuple(sorted(config.destinations)),
            priority=Priority.ROUTINE,
            quiet_period_s=a.quiet_period_s,
            late_policy=a.late_policy,
            late_window_min=a.late_window_min,
            reasons=("no rules configured: embedded default",),
            notify=tuple(sorted(config.notify)),
        )
    for index, rule in enumerate(config.rules):
        matched, reasons = explain_match(rule.match, series)
        if not matched:
            continue
        then = rule.then
        return Plan(
            rule=rule_name(rule, index),
            analyzers=tuple(then.analyzers if then.analyzers is not None else default_analyzers(series)),
            destinations=tuple(then.destinations if then.destinations is not None
                               else sorted(config.destinations)),
            priority=Priority.parse(then.priority),
            quiet_period_s=then.quiet_period_s or a.quiet_period_s,
            late_policy=then.late_policy or a.late_policy,
            late_window_min=then.late_window_min if then.late_window_min is not None else a.late_window_min,
            reasons=tuple(reasons),
            notify=tuple(then.notify if then.notify is not None else sorted(config.notify)),
            notify_at=then.notify_at,
        )
    return None


def explain_all(series: SeriesSummary, config: Config) -> list[tuple[str, bool, list[str]]]:
    """For ``rules test``: every rule, whether it matches, and why."""
    return [
        (rule_name(rule, i), *explain_match(rule.match, series)) for i, rule in enumerate(config.rules)
    ]
