"""Training chat VLMs: conversation data (LLaVA JSON, messages JSONL / Parquet / save_to_disk) and the papers' tasks
through the processor's chat template, from the CLI and the Python API, on tiny twins."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from _training_data import write_chat_data, write_vqa_data

from vlpeft.cli import main
from vlpeft.tasks.chat_collator import ChatCollator
from vlpeft.tasks.chat_records import single_turn_record
from vlpeft.tasks.chat_tasks import ChatTaskCollator, chat_rank, conversation_losses, prompt_records
from vlpeft.tasks.framing import vqa_examples
from vlpeft.tasks.vqa import VQADataset
from vlpeft.testing.twins import build_twin

ROOT = Path(__file__).resolve().parents[2]
CHAT_RECIPES = ["qwen2_5_vl_7b_routed_lora_chat", "smolvlm_256m_padapter_chat"]
FAST = ["--set", "optim.max_steps=2", "--set", "optim.batch_size=2", "--set", "optim.gradient_accumulation_steps=1",
        "--set", "eval.strategy=no", "--set", "eval.max_new_tokens=3", "--set", "run.report_to=[csv]",
        "--set", "run.progress_bar=false"]


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("chat"), 4, 3)


@pytest.mark.parametrize("layout", ["llava", "messages"])
@pytest.mark.parametrize("recipe", CHAT_RECIPES)
def test_chat_recipes_train_on_user_data_with_their_tiny_twin(recipe, layout, chat_files, tmp_path):
    out = tmp_path / "run"
    code = main(["train", str(ROOT / "configs" / f"{recipe}.yaml"), "--tiny-twin",
                 "--set", f"task.train={chat_files[f'{layout}_train']}",
                 "--set", f"task.eval={chat_files[f'{layout}_val']}", "--set", "task.test=null",
                 "--set", f"task.images={chat_files['images']}", "--set", f"run.output_dir={out}", *FAST])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    evaluation = metrics["metrics"]["eval"]
    assert evaluation["loss"] > 0 and 0 <= evaluation["exact_match"] <= 100  # short final answers: generated
    assert metrics["global_step"] == 2


def test_other_stored_formats_train_too(chat_files, tmp_path):
    """Parquet and a save_to_disk folder with the same messages/images columns."""
    table = datasets.load_dataset("json", data_files=chat_files["messages_train"], split="train")
    table.to_parquet(str(tmp_path / "train.parquet"))
    table.save_to_disk(str(tmp_path / "train_disk"))
    for source in (tmp_path / "train.parquet", tmp_path / "train_disk"):
        out = tmp_path / f"run_{source.name}"
        code = main(["train", str(ROOT / "configs" / "smolvlm_256m_padapter_chat.yaml"), "--tiny-twin",
                     "--set", f"task.train={source}", "--set", f"task.eval={chat_files['messages_val']}",
                     "--set", "task.test=null", "--set", f"task.images={chat_files['images']}",
                     "--set", f"run.output_dir={out}", *FAST])
        assert code == 0, source


def test_malformed_records_name_file_record_and_field(chat_files, tmp_path, capsys):
    records = json.loads(Path(chat_files["llava_train"]).read_text())
    records[2]["image"] = "missing.png"
    records[3]["conversations"][1]["value"] = ""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    args = ["train", str(ROOT / "configs" / "smolvlm_256m_padapter_chat.yaml"), "--tiny-twin",
            "--set", f"task.train={bad}", "--set", f"task.eval={chat_files['llava_val']}", "--set", "task.test=null",
            "--set", f"task.images={chat_files['images']}", "--set", f"run.output_dir={tmp_path / 'run'}", *FAST]
    assert main(args) == 2
    message = capsys.readouterr().err
    assert message.startswith("vlpeft train: error: ") and "bad.json" in message and "missing.png" in message
    assert "record 2" in message
    assert main([*args, "--set", "task.bad_input=skip"]) == 0


def test_chat_task_needs_a_chat_template_model(chat_files, tmp_path, capsys):
    args = ["train", str(ROOT / "configs" / "smolvlm_256m_padapter_chat.yaml"), "--set", "model.name=null",
            "--set", "model.tiny=llava", "--set", f"task.train={chat_files['llava_train']}",
            "--set", f"task.eval={chat_files['llava_val']}", "--set", f"task.images={chat_files['images']}",
            "--set", f"run.output_dir={tmp_path / 'run'}", *FAST]
    assert main(args) == 2
    assert "needs a model driven by its chat template" in capsys.readouterr().err


def test_vqa_rendering_is_shared_by_training_generation_and_ranking(tmp_path):
    files = write_vqa_data(tmp_path, 2, 1)
    dataset = VQADataset.from_official(files["train"], files["train_annotations"], files["images"])
    twin = build_twin("qwen2_vl")
    chat = ChatCollator(twin.processor, 512)
    items = [dataset[0], dataset[1]]
    template = "{question} Answer with one word."
    train = ChatTaskCollator(chat, lambda its: vqa_examples(its, template, "most_common"))(items)
    prompts = [template.format(question=it["question"].strip()) for it in items]
    generation = chat.prompt_batch(prompt_records(items, prompts)).inputs
    for row in range(2):
        prompt = generation["input_ids"][row][generation["attention_mask"][row].bool()]
        assert torch.equal(train["input_ids"][row][: prompt.numel()], prompt)
    model = twin.model.eval()
    candidates = ["red", "green", "blue", "yellow"]
    picks = chat_rank(model, chat, items, prompts, candidates, top_k=len(candidates))
    for item, prompt, pick in zip(items, prompts, picks, strict=True):
        nll, _ = conversation_losses(model, chat, [single_turn_record([item["image"]], prompt, c) for c in candidates])
        assert pick == int(torch.argmin(nll))


def test_check_deep_decodes_every_image_before_any_model_loads(chat_files, tmp_path, capsys):
    records = json.loads(Path(chat_files["llava_train"]).read_text())
    corrupt = tmp_path / "images"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    records[0]["image"] = str(corrupt / "broken.png")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    base = ["train", str(ROOT / "configs" / "smolvlm_256m_padapter_chat.yaml"), "--tiny-twin",
            "--set", f"task.eval={chat_files['llava_val']}", "--set", "task.test=null",
            "--set", f"task.images={chat_files['images']}", "--set", f"run.output_dir={tmp_path / 'run'}"]
    good = [*base, "--set", f"task.train={chat_files['llava_train']}"]
    assert main([*good, "--check", "--deep"]) == 0
    assert "data OK: train 4 records, eval 3 records (every image decoded)" in capsys.readouterr().out
    broken = [*base, "--set", f"task.train={bad}"]
    assert main([*broken, "--check"]) == 0  # the shallow check sees the file exists
    capsys.readouterr()
    assert main([*broken, "--check", "--deep"]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main([*broken, "--check", "--deep", "--set", "task.bad_input=skip"]) == 0
    out = capsys.readouterr().out
    assert "train 3 records" in out and "corrupt_image" in out
    assert main([*good, "--deep"]) == 2
    assert not (tmp_path / "run").exists()
