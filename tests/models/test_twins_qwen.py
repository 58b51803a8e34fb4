"""The Qwen-VL twins (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): valid inputs from the chat template + processor, training
and generation, image dependence, dynamic-resolution grids, M-RoPE, windowed vision attention and DeepStack."""

from __future__ import annotations

import _twin_checks as checks
import pytest
import torch
from transformers.vision_utils import get_vision_window_index
from vlpeft.testing.twins._qwen import MERGE, PATCH

from vlpeft.testing.twins import Twin, build_twin

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]

twin = checks.twin_fixture(QWEN)


def test_training_step_gives_finite_loss_and_embedding_gradient(twin: Twin) -> None:
    checks.check_loss_and_embedding_gradient(twin, twin.batch(twin.samples((1, 2))))


@pytest.mark.parametrize("images_per_sample", [(1, 2), (1, 1)])
def test_placeholder_count_follows_number_and_size_of_images(twin: Twin, images_per_sample: tuple[int, int]) -> None:
    # (1, 1): one image each, 32x32 and 48x32 -> 16 and 24 placeholders
    samples = twin.samples(images_per_sample)
    batch = twin.batch(samples)
    counts = checks.image_token_mask(twin, batch).sum(dim=1)
    assert counts[0] != counts[1]
    grids = iter(batch["image_grid_thw"])
    expected = [sum(int(next(grids).prod()) // MERGE**2 for _ in s.images) for s in samples]
    assert counts.tolist() == expected


def test_generate_with_and_without_cache_agree(twin: Twin) -> None:
    checks.check_generation_with_and_without_cache(twin, twin.generation_batch(twin.samples((1, 2))))


def test_logits_depend_on_pixels(twin: Twin) -> None:
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    logits, other = checks.logits_with_other_pixels(twin, batch, torch.randn_like)
    text = batch["attention_mask"].bool() & ~checks.image_token_mask(twin, batch)
    assert not torch.allclose(logits[text], other[text], atol=1e-4)


def test_image_grid_matches_image_sizes(twin: Twin) -> None:
    samples = twin.samples((1, 2))
    batch = twin.batch(samples)
    sizes = [image.size for s in samples for image in s.images]
    # the example sizes are multiples of PATCH * MERGE within the pixel budget, so they are kept as they are
    assert all(w % (PATCH * MERGE) == 0 and h % (PATCH * MERGE) == 0 for w, h in sizes)
    assert batch["image_grid_thw"].tolist() == [[1, h // PATCH, w // PATCH] for w, h in sizes]
    assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 3
    patch_dim = 3 * twin.processor.image_processor.temporal_patch_size * PATCH**2
    assert batch["pixel_values"].shape == (int(batch["image_grid_thw"].prod(dim=1).sum()), patch_dim)


def test_mrope_positions_are_3d_on_image_tokens_and_used_by_the_model(twin: Twin) -> None:
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    image = checks.image_token_mask(twin, batch)
    # the processor marks exactly the image placeholders; the model needs the marks for M-RoPE
    assert torch.equal(batch["mm_token_type_ids"].bool(), image)
    positions, deltas = twin.model.model.get_rope_index(
        input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
    )
    mask = batch["attention_mask"].bool()
    plain = (batch["attention_mask"].cumsum(dim=-1) - 1).clamp(min=0)
    assert positions.shape == (3, *batch["input_ids"].shape)
    text = mask & ~image
    assert all(torch.equal(positions[k][text], positions[0][text]) for k in (1, 2))  # text: 1-D, on all three axes
    for axis in range(3):
        assert not torch.equal(positions[axis][image], plain[image])
    assert not torch.equal(positions[1][image], positions[2][image])  # height and width differ inside an image
    assert (deltas < 0).all()  # an image of h x w tokens advances positions by max(h, w), less than h * w

    with torch.no_grad():
        default = twin.model(**batch).logits
        explicit = twin.model(**batch, position_ids=positions).logits
        one_d = twin.model(**batch, position_ids=plain).logits
    assert torch.allclose(default[mask], explicit[mask], atol=1e-5)
    assert not torch.allclose(default[mask], one_d[mask], atol=1e-4)
    # without the processor's marks there is no M-RoPE: Qwen2-VL and Qwen3-VL refuse, Qwen2.5-VL (transformers
    # 5.25) falls back to 1-D positions
    without_marks = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    if twin.spec.name == "qwen2_5_vl":
        with torch.no_grad():
            assert torch.allclose(twin.model(**without_marks).logits[mask], one_d[mask], atol=1e-5)
    else:
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            twin.model(**without_marks)


def test_qwen2_5_vl_vision_attention_is_windowed() -> None:
    twin = build_twin("qwen2_5_vl")
    visual = twin.model.model.visual
    assert 0 < len(visual.fullatt_block_indexes) < len(visual.blocks)
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    grid = batch["image_grid_thw"]  # 4x4, 4x6 and 5x3 merged patches; windows of 2x2 merged patches
    _, cu_window_seqlens = get_vision_window_index(grid, MERGE, visual.window_size, PATCH)
    assert len(cu_window_seqlens) - 1 == 4 + 6 + 6
    with torch.no_grad():
        windowed = torch.cat(twin.model.model.get_image_features(batch["pixel_values"], grid).pooler_output)
        visual.window_size = 10_000  # one window per image: every block attends over the whole image
        whole = torch.cat(twin.model.model.get_image_features(batch["pixel_values"], grid).pooler_output)
    assert windowed.shape == whole.shape
    assert not torch.allclose(windowed, whole, atol=1e-4)


def test_qwen3_vl_deepstack_features_reach_the_language_model() -> None:
    twin = build_twin("qwen3_vl")
    visual = twin.model.model.visual
    depth = len(twin.model.model.language_model.layers)
    assert list(visual.deepstack_visual_indexes) == [0, 1] and len(visual.blocks) == 3 and depth == 2
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    with torch.no_grad():
        features = twin.model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        assert len(features.deepstack_features) == 2
        for level in features.deepstack_features:
            assert [f.shape for f in level] == [f.shape for f in features.pooler_output]
        logits = twin.model(**batch).logits
        for merger in visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
        without = twin.model(**batch).logits
    assert not torch.allclose(logits, without, atol=1e-4)
