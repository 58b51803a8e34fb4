"""A demo run's fingerprint covers what decides its result beyond the method spec: the method's config with the
library's defaults resolved, and the benchmark's file format version. A resumed ``--out`` folder must not reuse a
record made under another default (for example the p-adapter paper variant's mu0, changed in issue #17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vlpeft.demo.setting as setting_module
import vlpeft.tuners.p_adapter.config as p_adapter_config
from vlpeft.demo.blip import SIZES, BlipSetting
from vlpeft.demo.setting import PlanContext


@pytest.fixture()
def context(tmp_path: Path) -> PlanContext:
    """A context over a BLIP base folder with only its config (no weights are read to build a plan)."""
    base = tmp_path / "base"
    base.mkdir()
    config = {"model_type": "blip", "architectures": ["BlipForConditionalGeneration"],
              "vision_config": {"image_size": 32, "patch_size": 8}}
    (base / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return PlanContext(base_path=base, base_digest="digest", data_root=tmp_path / "data", synth_settings={"seed": 0},
                       size=SIZES["smoke"], work_dir=tmp_path / "runs", progress=False)


def _fingerprints(context: PlanContext) -> dict[str, str]:
    demo = BlipSetting()
    plan = demo.build_plan(demo.method_specs(["matmul"]), ["snli_ve"], [0], context)
    return {item.title: item.fingerprint for item in plan}


def test_method_settings_resolve_the_library_defaults(context):
    demo = BlipSetting()
    specs = {spec.label: spec for spec in demo.method_specs(["matmul"])}
    paper = demo.method_settings(specs["p-adapter (paper)"], "snli_ve", context)
    release = demo.method_settings(specs["p-adapter (release)"], "snli_ve", context)
    assert (paper["variant"], paper["mu0"]) == ("paper", p_adapter_config.PAPER_MU0)
    assert (release["variant"], release["mu0"]) == ("release", 10.0)  # the released SNLI-VE constant
    json.dumps(paper, sort_keys=True)  # plain JSON values only: sets became sorted lists


def test_a_changed_default_changes_only_the_affected_fingerprints(context, monkeypatch):
    before = _fingerprints(context)
    monkeypatch.setattr(p_adapter_config, "PAPER_MU0", 0.5)
    after = _fingerprints(context)
    changed = sorted(title for title in before if before[title] != after[title])
    assert changed == ["p-adapter (paper) on snli_ve (seed 0)"]


def test_a_new_benchmark_format_changes_every_fingerprint(context, monkeypatch):
    before = _fingerprints(context)
    monkeypatch.setattr(setting_module, "BENCHMARK_FORMAT", setting_module.BENCHMARK_FORMAT + 1)
    after = _fingerprints(context)
    assert all(before[title] != after[title] for title in before)


def test_selection_fingerprints_follow_the_resolved_config(context, monkeypatch):
    from vlpeft.demo.selection import selection_items

    def fingerprints() -> dict[str, str]:
        demo = BlipSetting()
        items = selection_items(demo, demo.method_specs(["matmul"]), ["snli_ve"], context, grid=[1e-3, 1e-2],
                                seeds=[0], command="vlpeft demo", common=demo.run_settings(context))
        return {item.title: item.fingerprint for item in items}

    before = fingerprints()
    monkeypatch.setattr(p_adapter_config, "PAPER_MU0", 0.5)
    after = fingerprints()
    assert sorted(t for t in before if before[t] != after[t]) == ["learning rate of p-adapter (paper) on snli_ve"]
