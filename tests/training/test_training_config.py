"""Config loading, overrides and validation: errors name the key and the allowed values, before any model loads."""

from __future__ import annotations

import pytest
from _training_data import tiny_caption_config, write_caption_data, write_config

from vlpeft.training import ConfigError, config_from_dict, load_config, validate_config
from vlpeft.training import run as run_module
from vlpeft.training.config import config_to_dict


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_caption_data(tmp_path_factory.mktemp("data"), n_train=2, n_eval=2)


@pytest.fixture(autouse=True)
def _no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the config is invalid")

    monkeypatch.setattr(run_module, "load_model", refuse)


def _cfg(data, tmp_path, **sections):
    return tiny_caption_config(data, tmp_path / "run", **sections)


def test_round_trip_and_overrides(data, tmp_path):
    path = write_config(tmp_path / "c.yaml", _cfg(data, tmp_path))
    config = load_config(path, ["optim.learning_rate=2e-4", "method.r=16", "run.report_to=[csv]",
                                "model.tiny_overrides.hidden_size=64"])
    assert config.optim.learning_rate == 2e-4 and config.method.options["r"] == 16
    assert config.run.report_to == ["csv"] and config.model.tiny_overrides == {"hidden_size": 64}
    again = config_from_dict(config_to_dict(config))
    assert config_to_dict(again) == config_to_dict(config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.learnin_rate=1", "unknown key optim.learnin_rate; allowed keys in optim: ['learning_rate'"),
        ("optim.batch_size=four", "optim.batch_size: expected int, got 'four'"),
        ("run.precision=fp8", "run.precision: 'fp8' is not one of ['fp32', 'bf16', 'fp16']"),
        ("trainer.lr=1", "unknown section 'trainer'"),
        ("eval.strategy=sometimes", "eval.strategy: 'sometimes' is not one of ['no', 'steps', 'epoch']"),
        ("run.report_to=[wandb]", "unknown logger(s) ['wandb']"),
    ],
)
def test_key_and_type_errors(data, tmp_path, override, message):
    path = write_config(tmp_path / "c.yaml", _cfg(data, tmp_path))
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"task": {"train": "/nonexistent/train.json"}}, "task.train: file '/nonexistent/train.json' does not exist"),
        ({"task": {"images": "/nonexistent"}}, "task.images: folder '/nonexistent' does not exist"),
        ({"model": {"tiny": "blip9"}}, "model.tiny: unknown tiny family 'blip9'; allowed:"),
        ({"model": {"name": "some/model"}}, "set exactly one of model.name"),
        ({"method": {"lora_rank": 3}}, "method.lora_rank: unknown option for method 'lora'; allowed: ['r'"),
        ({"method": {"type": "prefix"}}, "method.type: unknown method 'prefix'; allowed: ["),
        ({"run": {"precision": "fp16"}}, "fp16 needs a CUDA device"),
        ({"run": {"save_total_limit": 1}}, "run.save_total_limit: must be >= 2"),
        ({"task": {"inference": "rank"}}, "task.inference: 'rank' is not available for task 'caption' with model family 'blip_caption'; allowed: ['generate']"),
        ({"eval": {"early_stopping_patience": 2, "strategy": "no"}}, "early stopping needs eval.strategy"),
        ({"optim": {"batch_size": 0}}, "optim.batch_size: must be >= 1"),
    ],
)
def test_validation_errors_before_loading(data, tmp_path, sections, message):
    config = config_from_dict(_cfg(data, tmp_path, **sections))
    with pytest.raises(ConfigError) as info:
        run_module.run_training(config)
    assert message in str(info.value)


def test_incompatible_method_and_model(data, tmp_path):
    # the generative framing has no layout for the ViT-GPT2 encoder-decoder family
    config = config_from_dict(_cfg(data, tmp_path, model={"tiny": "vision_encoder_decoder"}))
    with pytest.raises(ConfigError, match="task.framing: the generative framing needs a model family in"):
        validate_config(config)


def test_valid_config_resolves_family_and_lora_targets(data, tmp_path):
    plan = validate_config(config_from_dict(_cfg(data, tmp_path)))
    assert plan.family == "blip_caption" and plan.metric == "CIDEr"
    assert "text_decoder" in str(plan.method_config.target_modules)
