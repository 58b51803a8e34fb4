"""``vlpeft sweep`` end to end on a tiny BLIP captioner: 2 learning rates x 2 steps, selection on the eval split,
the selected value's test score, sweep.json, resume (nothing re-run) and clean errors for bad grids."""

from __future__ import annotations

import json

import pytest
import yaml
from _training_data import tiny_caption_config, write_caption_data, write_config

import vlpeft.cli as cli
from vlpeft.training import run as run_module
from vlpeft.training import sweep as sweep_module
from vlpeft.training.config import ConfigError


def _config(data: dict, out, **task) -> dict:
    config = tiny_caption_config(data, out)
    config["optim"].update({"max_steps": 2, "batch_size": 2})
    config["eval"].update({"strategy": "no", "load_best_at_end": False, "max_new_tokens": 3})
    config["run"].update({"report_to": []})
    config["task"].update({"test": data["val"], **task})
    return config


@pytest.fixture
def sweep_cli(monkeypatch):
    """``vlpeft.cli.main`` with only the sweep sub-command registered (the other commands are tested elsewhere);
    counts run_training / evaluate calls."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["vlpeft.training.sweep"])
    calls = {"train": [], "evaluate": []}
    train, evaluate = run_module.run_training, run_module.evaluate

    def counted_train(config, *args, **kwargs):
        calls["train"].append((config.optim.learning_rate, config.run.seed, config.task.test))
        return train(config, *args, **kwargs)

    def counted_evaluate(config, checkpoint, split="eval"):
        calls["evaluate"].append((str(checkpoint), split))
        return evaluate(config, checkpoint, split=split)

    monkeypatch.setattr(run_module, "run_training", counted_train)
    monkeypatch.setattr(run_module, "evaluate", counted_evaluate)
    return calls


def test_sweep_is_registered_as_a_cli_command():
    assert "vlpeft.training.sweep" in cli.COMMAND_MODULES


def test_sweep_end_to_end_selects_on_eval_reports_test_and_resumes(tmp_path, sweep_cli, capsys):
    data = write_caption_data(tmp_path / "data", 4, 2)
    config = write_config(tmp_path / "c.yaml", _config(data, tmp_path / "sweep"))
    args = ["sweep", str(config), "--learning-rates", "1e-3,5e-3", "--set", "eval.java=no"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    # two runs, trained without the test split; then the selected value evaluated on test
    assert sorted(c[:2] for c in sweep_cli["train"]) == [(1e-3, 7), (5e-3, 7)]
    assert all(c[2] is None for c in sweep_cli["train"])
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert record["metric"] == "CIDEr" and record["greater_is_better"] is True
    assert record["grid"] == {"learning_rates": [1e-3, 5e-3], "seeds": [7]}
    assert record["command"] == f"vlpeft sweep {config} --learning-rates 1e-3,5e-3 --set eval.java=no"
    assert record["config_file"] == str(config.resolve())
    assert len(record["config_digest"]) == 16 and set(record["git"]) == {"commit", "dirty"}
    by_lr = {r["learning_rate"]: r for r in record["runs"]}
    assert set(by_lr) == {1e-3, 5e-3}
    for lr, run in by_lr.items():
        assert run["status"] == "finished" and run["global_step"] == 2 and run["reused"] is False
        assert run["output_dir"] == str(tmp_path / "sweep" / f"lr-{lr:g}-seed-7")
        metrics = json.loads((tmp_path / "sweep" / f"lr-{lr:g}-seed-7" / "metrics.json").read_text())["metrics"]
        assert run["eval"] == metrics["eval"]["CIDEr"] and "test" not in metrics
    values = {v["learning_rate"]: v["eval"]["mean"] for v in record["per_value"]}
    assert values == {lr: by_lr[lr]["eval"] for lr in by_lr}
    assert all(v["eval"]["ci95"] is None and v["eval"]["n"] == 1 for v in record["per_value"])  # one seed
    best = max(values, key=lambda lr: (values[lr], -list(values).index(lr)))
    selected = record["selected"]
    assert selected["learning_rate"] == best
    assert sweep_cli["evaluate"] == [(str(tmp_path / "sweep" / f"lr-{best:g}-seed-7"), "test")]
    assert selected["test"]["split"] == "test" and selected["test"]["scores"].keys() == {"7"}
    assert selected["test"]["mean"] == selected["test"]["scores"]["7"] and selected["test"]["ci95"] is None
    assert f"selected learning rate {best:g}: test CIDEr" in out

    # resume: a second invocation trains and evaluates nothing, and writes the same selection
    sweep_cli["train"].clear()
    sweep_cli["evaluate"].clear()
    assert cli.main(args) == 0
    assert sweep_cli == {"train": [], "evaluate": []}
    again = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert all(r["reused"] for r in again["runs"])
    assert again["selected"]["learning_rate"] == best
    assert again["selected"]["test"]["scores"] == selected["test"]["scores"]
    assert "not re-run" in capsys.readouterr().out

    # adding a value to the grid trains only that value
    assert cli.main([*args[:3], "1e-3,5e-3,2e-3", *args[4:]]) == 0
    assert [c[0] for c in sweep_cli["train"]] == [2e-3]

    # another config in the same folder is refused
    assert cli.main([*args, "--set", "method.r=2"]) == 2
    assert "holds a run of another config" in capsys.readouterr().err


def test_sweep_with_seeds_from_the_config_section_and_no_test_split(tmp_path, sweep_cli, capsys):
    data = write_caption_data(tmp_path / "data", 4, 2)
    raw = _config(data, tmp_path / "run", test=None)
    raw["eval"]["java"] = "no"
    raw["sweep"] = {"learning_rates": [2e-3], "seeds": [0, 1]}
    config = write_config(tmp_path / "c.yaml", raw)
    assert cli.main(["sweep", str(config), "--out", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert sorted(c[:2] for c in sweep_cli["train"]) == [(2e-3, 0), (2e-3, 1)]
    assert sweep_cli["evaluate"] == []
    record = json.loads((tmp_path / "elsewhere" / "sweep.json").read_text())
    assert record["grid"] == {"learning_rates": [2e-3], "seeds": [0, 1]}
    value = record["per_value"][0]
    assert set(value["eval_scores"]) == {"0", "1"} and value["eval"]["n"] == 2
    assert value["eval"]["ci95"] is not None and value["eval"]["ci95"] >= 0
    assert record["selected"]["test"] is None
    assert "no separate test split" in record["selected"]["test_note"]
    assert "no test score" in out and "no separate test split" in out
    # the command line overrides the section
    sweep_cli["train"].clear()
    assert cli.main(["sweep", str(config), "--out", str(tmp_path / "elsewhere"), "--seeds", "1"]) == 0
    assert sweep_cli["train"] == []  # seed 1 of 2e-3 finished earlier


@pytest.mark.parametrize(("grid", "message"), [
    ("", "the learning-rate grid is empty"),
    ("1e-4,abc", "'abc' is not a number"),
    ("1e-4,0", "must be finite and positive, got '0'"),
    ("-1e-4", "must be finite and positive"),
    ("1e-4,nan", "must be finite and positive"),
    ("1e-4,1e-4", "given twice"),
])
def test_bad_grids_are_clean_errors(tmp_path, sweep_cli, capsys, monkeypatch, grid, message):
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    data = write_caption_data(tmp_path / "data", 2, 2)
    config = write_config(tmp_path / "c.yaml", _config(data, tmp_path / "run"))
    assert cli.main(["sweep", str(config), f"--learning-rates={grid}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlpeft sweep: error: --learning-rates: ") and message in err and "Traceback" not in err
    assert sweep_cli["train"] == []


@pytest.mark.parametrize(("section", "args", "message"), [
    ({"learning_rates": []}, [], "sweep.learning_rates: the learning-rate grid is empty"),
    ({"learning_rates": ["fast"]}, [], "sweep.learning_rates: 'fast' is not a number"),
    ({"learning_rates": [1e-3], "seeds": [-1]}, [], "sweep.seeds: seeds must be >= 0"),
    ({"learnig_rates": [1e-3]}, [], "unknown key sweep.learnig_rates"),
    (None, [], "no learning-rate grid"),
    (None, ["--learning-rates", "1e-3", "--seeds", "0,x"], "--seeds: 'x' is not an integer"),
])
def test_bad_sweep_sections_and_seeds_are_clean_errors(tmp_path, sweep_cli, capsys, section, args, message):
    data = write_caption_data(tmp_path / "data", 2, 2)
    raw = _config(data, tmp_path / "run")
    if section is not None:
        raw["sweep"] = section
    config = write_config(tmp_path / "c.yaml", raw)
    assert cli.main(["sweep", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlpeft sweep: error: ") and message in err
    assert sweep_cli["train"] == []


def test_a_config_without_eval_split_is_refused_before_training(tmp_path, sweep_cli, capsys):
    data = write_caption_data(tmp_path / "data", 2, 2)
    config = write_config(tmp_path / "c.yaml", _config(data, tmp_path / "run", eval=None))
    assert cli.main(["sweep", str(config), "--learning-rates", "1e-3"]) == 2
    assert "selects the learning rate on the eval split" in capsys.readouterr().err
    assert sweep_cli["train"] == []


def test_selection_respects_lower_is_better_and_skips_diverged_values():
    def value(lr, mean, status="finished"):
        return {"learning_rate": lr, "status": status, "eval": None if status != "finished" else {"mean": mean}}

    values = [value(1e-4, 2.0), value(2e-4, 1.0), value(5e-4, 0.5, "diverged"), value(1e-3, 2.0)]
    assert sweep_module._select(values, greater_is_better=True)["learning_rate"] == 1e-4  # tie: first in grid
    assert sweep_module._select(values, greater_is_better=False)["learning_rate"] == 2e-4
    assert sweep_module._select([value(1e-4, 0, "diverged")], greater_is_better=True) is None


def test_config_digest_ignores_what_the_sweep_varies(tmp_path):
    data = write_caption_data(tmp_path / "data", 2, 2)
    path = write_config(tmp_path / "c.yaml", _config(data, tmp_path / "run"))
    base, _ = sweep_module.load_sweep_config(path)
    same, _ = sweep_module.load_sweep_config(path, ["optim.learning_rate=0.5", "run.seed=3", "run.output_dir=x",
                                                   "run.resume=never"])
    other, _ = sweep_module.load_sweep_config(path, ["optim.max_steps=3"])
    assert sweep_module.config_digest(base) == sweep_module.config_digest(same)
    assert sweep_module.config_digest(base) != sweep_module.config_digest(other)


def test_config_digest_follows_the_library_defaults(tmp_path, monkeypatch):
    """A run folder trained under another default of the method (here the p-adapter paper variant's mu0) is not
    the same config, although the yaml is."""
    import vlpeft.tuners.p_adapter.config as p_adapter_config

    data = write_caption_data(tmp_path / "data", 2, 2)
    config = _config(data, tmp_path / "run")
    config["method"] = {"type": "p_adapter", "variant": "paper"}
    path = write_config(tmp_path / "c.yaml", config)
    original = p_adapter_config.PAPER_MU0
    before = sweep_module.config_digest(sweep_module.load_sweep_config(path)[0])
    monkeypatch.setattr(p_adapter_config, "PAPER_MU0", original * 5)
    assert sweep_module.config_digest(sweep_module.load_sweep_config(path)[0]) != before
    monkeypatch.setattr(p_adapter_config, "PAPER_MU0", original)
    assert sweep_module.config_digest(sweep_module.load_sweep_config(path)[0]) == before


def test_grid_parsers():
    assert sweep_module.parse_learning_rates("1e-4, 2e-4,5e-4") == (1e-4, 2e-4, 5e-4)
    assert sweep_module.parse_learning_rates([1e-3, "2e-3"]) == (1e-3, 2e-3)
    assert sweep_module.parse_seeds("0,1,2") == (0, 1, 2) and sweep_module.parse_seeds(4) == (4,)
    assert sweep_module.run_folder_name(5e-4, 2) == "lr-0.0005-seed-2"
    with pytest.raises(ConfigError, match="not a number"):
        sweep_module.parse_learning_rates([True])
    with pytest.raises(ConfigError, match="given twice"):
        sweep_module.parse_seeds([1, 1])
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"  # YAML 1.1 strings are numbers to the parser
    assert sweep_module.parse_learning_rates(yaml.safe_load("[1e-4]")) == (1e-4,)
