"""SNLI-VE on the CLIP-BART composite (issue #21): the label word (entailment / neutral / contradiction) is
generated after the task prompt, mapped back to its label as NLVR2's true/false are (``inference._label_of``),
and scored by the entailment metric, which counts any other text as wrong and reports it as ``invalid``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from _training_data import write_snli_ve_data

from vlpeft.cli import main as cli_main
from vlpeft.metrics.entailment import entailment_accuracy
from vlpeft.tasks import inference
from vlpeft.tasks.framing import GENERATED_LABEL_WORDS
from vlpeft.training import ConfigError, config_from_dict, evaluate, load_config, run_training
from vlpeft.training.task_binding import allowed_inference, target_texts
from vlpeft.training.task_scores import _entailment_score
from vlpeft.training.validation import validate_config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_snli_ve_data(tmp_path_factory.mktemp("snli-ve"), 9, 3)


def _config(files: dict[str, str], output_dir: Path, *, model: str = "clip_bart", method: dict | None = None,
            eval_file: str | None = None, **optim) -> dict:
    return {
        "model": {"tiny": model},
        "method": method or {"type": "adapter", "reduction_factor": 8},
        "task": {"type": "snli_ve", "train": files["train"], "eval": eval_file or files["dev"],
                 "images": files["images"], "prompt": "ve: {hypothesis}", "max_length": 40},
        "optim": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2, **optim},
        "eval": {"strategy": "steps", "steps": 2, "max_new_tokens": 4, "num_beams": 2, "java": "no"},
        "run": {"output_dir": str(output_dir), "seed": 3, "logging_steps": 1, "progress_bar": False,
                "report_to": ["csv"]},
    }


def test_the_generated_label_words_map_to_their_labels_and_anything_else_is_invalid():
    words = dict(GENERATED_LABEL_WORDS)
    assert inference._label_of("entailment", words) == "entailment"
    assert inference._label_of(" Neutral. ", words) == "neutral"
    assert inference._label_of("CONTRADICTION!", words) == "contradiction"
    for text in ("yes", "", "entailment neutral", "correct"):
        assert inference._label_of(text, words) == text  # kept as generated: the metric calls it invalid

    records = [SimpleNamespace(pair_id=f"p{i}", label=label)
               for i, label in enumerate(("entailment", "neutral", "contradiction", "neutral", "entailment"))]
    dataset = SimpleNamespace(records=records)
    predicted = [{"pair_id": "p0", "label": "entailment"}, {"pair_id": "p1", "label": "neutral"},
                 {"pair_id": "p2", "label": "entailment"}, {"pair_id": "p3", "label": "yes"},
                 {"pair_id": "p4", "label": ""}]
    score = _entailment_score(predicted, dataset, generated=True)
    assert score["accuracy"] == pytest.approx(40.0) and score["invalid"] == 2.0
    assert score["accuracy_entailment"] == pytest.approx(50.0) and score["accuracy_neutral"] == pytest.approx(50.0)
    assert score["accuracy_contradiction"] == 0.0
    with pytest.raises(ValueError, match=r"unknown predicted label 'yes' for example 'p3'"):
        _entailment_score(predicted, dataset)  # ranked / classified labels are never free text
    assert "invalid" not in _entailment_score(predicted[:3], dataset)
    with pytest.raises(ValueError, match="entailment mode 'generate' needs a prompt encoder"):
        inference.predict_entailment(None, [], mode="generate", label_words=words)
    with pytest.raises(ValueError, match="must be rank, classify or generate, got 'sample'"):
        inference.predict_entailment(None, [], mode="sample", label_words=words)


def test_the_entailment_metric_counts_invalid_predictions_only_when_asked():
    score = entailment_accuracy(["entailment", "maybe", "contradiction"], ["entailment", "neutral", "neutral"],
                                invalid="wrong")
    assert score.overall == pytest.approx(100 / 3) and score.num_invalid == 1 and score.per_class["neutral"] == 0.0
    assert entailment_accuracy(["neutral"], ["neutral"]).num_invalid == 0
    with pytest.raises(ValueError, match="unknown predicted label 'maybe'"):
        entailment_accuracy(["maybe"], ["neutral"])
    with pytest.raises(ValueError, match="unknown gold label 'maybe'"):
        entailment_accuracy(["neutral"], ["maybe"], invalid="wrong")  # gold labels always raise
    with pytest.raises(ValueError, match="invalid must be 'raise' or 'wrong', got 'skip'"):
        entailment_accuracy(["neutral"], ["neutral"], invalid="skip")


def test_clip_bart_generates_snli_ve_and_the_ranking_families_still_rank(files, tmp_path):
    assert allowed_inference("snli_ve", "generative", "clip_bart") == ("generate",)
    assert allowed_inference("snli_ve", "generative", "blip_caption") == ("rank",)
    assert allowed_inference("snli_ve", "generative", "blip_vqa") == ()  # no ranking, not seq2seq: refused
    config = config_from_dict(_config(files, tmp_path / "run"))
    assert target_texts(config, "clip_bart") == ["entailment", "neutral", "contradiction"]
    assert target_texts(config_from_dict(_config(files, tmp_path / "b", model="blip_caption")), "blip_caption") == []
    bad = config_from_dict({**_config(files, tmp_path / "run"),
                            "task": {**_config(files, tmp_path)["task"], "inference": "rank"}})
    with pytest.raises(ConfigError, match=r"task.inference: 'rank' is not available for task 'snli_ve' with model "
                                          r"family 'clip_bart'; allowed: \['generate'\]"):
        validate_config(bad)


def test_vlpeft_train_runs_snli_ve_on_the_tiny_clip_bart(files, tmp_path):
    path = tmp_path / "snli_ve.yaml"
    path.write_text(yaml.safe_dump(_config(files, tmp_path / "run")))
    assert cli_main(["train", str(path)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    scores = metrics["metrics"]["eval"]
    assert {"accuracy", "invalid"} <= set(scores) and 0.0 <= scores["accuracy"] <= 100.0
    assert scores["invalid"] == float(int(scores["invalid"])) and 0 <= scores["invalid"] <= 3
    predictions = json.loads((tmp_path / "run" / "predictions_eval.json").read_text())
    assert len(predictions) == 3 and all(set(p) == {"pair_id", "label"} for p in predictions)
    invalid = sum(p["label"] not in GENERATED_LABEL_WORDS for p in predictions)
    assert scores["invalid"] == float(invalid)  # the count reported is the predictions that are no label
    again = evaluate(load_config(path), tmp_path / "run")  # the saved adapter reloads with the same tokenizer
    assert again["accuracy"] == pytest.approx(scores["accuracy"]) and again["invalid"] == scores["invalid"]


def test_generation_reads_the_layout_training_wrote(files, tmp_path):
    """Fully fine-tuned on the training pairs, generation gives back the trained label words: far above the 33 %
    of chance, with no invalid text (a decoder start or end token out of place would leave invalid answers)."""
    config = config_from_dict(_config(files, tmp_path / "run", method={"type": "full"}, eval_file=files["train"],
                                      max_steps=40, batch_size=9, learning_rate=3e-3, warmup_steps=0))
    config.eval.strategy = "no"
    result = run_training(config)
    scores = result.metrics["eval"]
    assert result.metric == "accuracy" and scores["invalid"] == 0.0
    assert scores["accuracy"] >= 88.0, scores  # 8 of the 9 training pairs or more (seed 3: all 9)


def test_snli_ve_is_a_multitask_sub_task_on_clip_bart(files, tmp_path):
    single = _config(files, tmp_path / "run")
    config = config_from_dict({**single, "task": {"type": "multitask", "max_length": 40, "tasks": [
        {"name": "ve", **{k: v for k, v in single["task"].items() if k != "max_length"}},
        {"name": "ve2", **{k: v for k, v in single["task"].items() if k != "max_length"}, "prompt": "ve2: {hypothesis}"},
    ]}})
    assert target_texts(config, "clip_bart") == ["entailment", "neutral", "contradiction"] * 2
    result = run_training(config)
    assert result.global_step == 2
    for name in ("ve", "ve2"):
        assert f"{name}_accuracy" in result.metrics["eval"] and f"{name}_invalid" in result.metrics["eval"]
