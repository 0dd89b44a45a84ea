"""Routing: rule matching properties and explanations."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dicomnode.config import parse_config
from dicomnode.domain import Priority, SeriesSummary
from dicomnode.routing import explain_match, plan_for

MODALITIES = ["CT", "MR", "CR", "DX", "US"]


def summary(modality: str = "CT", description: str = "HEAD ROUTINE", count: int = 10,
            calling: str = "SCANNER1", image_types: tuple[str, ...] = ("ORIGINAL\\PRIMARY\\AXIAL",)) -> SeriesSummary:
    return SeriesSummary(series_instance_uid="1.2", study_instance_uid="1", epoch=1, modality=modality,
                         sop_class_uids=("1.2.840.10008.5.1.4.1.1.2",), body_part="HEAD",
                         series_description=description, study_description="", calling_ae=calling,
                         instance_count=count, image_types=image_types)


@given(rule_modalities=st.lists(st.lists(st.sampled_from(MODALITIES), min_size=1, max_size=3), max_size=6),
       modality=st.sampled_from(MODALITIES), lower=st.booleans())
def test_first_matching_rule_wins(rule_modalities: list[list[str]], modality: str, lower: bool) -> None:
    rules = [{"name": f"r{i}", "match": {"modality": [m.lower() if lower else m for m in mods]}}
             for i, mods in enumerate(rule_modalities)]
    config = parse_config({"rules": rules} if rules else {})
    plan = plan_for(summary(modality), config, lambda s: ["qc"])
    expected = next((f"r{i}" for i, mods in enumerate(rule_modalities) if modality in mods), None)
    if not rules:
        assert plan is not None and plan.rule == "default"
    elif expected is None:
        assert plan is None
    else:
        assert plan is not None and plan.rule == expected


@given(count=st.integers(0, 500), low=st.integers(0, 500), high=st.integers(0, 500))
def test_instance_count_range(count: int, low: int, high: int) -> None:
    if low > high:
        low, high = high, low
    config = parse_config({"rules": [{"match": {"min_instances": low, "max_instances": high}}]})
    matched, reasons = explain_match(config.rules[0].match, summary(count=count))
    assert matched == (low <= count <= high)
    assert reasons


def test_glob_regex_image_type_and_calling_ae_with_reasons() -> None:
    config = parse_config({
        "destinations": {"PACS": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}},
        "rules": [
            {"name": "derived", "match": {"image_type": "*DERIVED*"}, "then": {"analyzers": []}},
            {"name": "head", "match": {"series_description": "re:head", "calling_ae": "SCANNER?"},
             "then": {"analyzers": ["qc-ct"], "priority": "stat", "quiet_period_s": 2}},
        ],
    })
    plan = plan_for(summary(), config, lambda s: ["never"])
    assert plan is not None
    assert (plan.rule, plan.analyzers, plan.destinations, plan.priority, plan.quiet_period_s) == (
        "head", ("qc-ct",), ("PACS",), Priority.STAT, 2.0)
    assert any("matches 'HEAD ROUTINE'" in r for r in plan.reasons)
    derived = plan_for(summary(image_types=("DERIVED\\SECONDARY",)), config, lambda s: [])
    assert derived is not None and derived.rule == "derived" and derived.analyzers == ()
    assert plan_for(summary(calling="OTHER"), config, lambda s: []) is None


def test_default_plan_uses_registry_defaults_and_all_destinations() -> None:
    config = parse_config({"destinations": {
        "B": {"ae_title": "B", "host": "127.0.0.1", "port": 1},
        "A": {"ae_title": "A", "host": "127.0.0.1", "port": 2}}})
    plan = plan_for(summary("MR"), config, lambda s: [f"qc-{s.modality.lower()}"])
    assert plan is not None and plan.analyzers == ("qc-mr",) and plan.destinations == ("A", "B")
