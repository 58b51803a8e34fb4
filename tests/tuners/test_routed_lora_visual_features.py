"""The per-forward visual-feature context: several images per sample (LLaVA), concurrent forwards, scoping."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from peft import get_peft_model

from vlpeft import RoutedLoraConfig
from vlpeft.glue.visual_features import MissingVisualFeaturesError
from vlpeft.testing import IMAGE_TOKEN_ID, build_tiny_model


@pytest.fixture(scope="module")
def llava():
    return build_tiny_model("llava", seed=5, num_hidden_layers=1)


def routed(tiny, **kwargs):
    config = RoutedLoraConfig(r=4, init_lora_weights=False, **{"routing": "matmul", "pooling": "none", **kwargs})
    return get_peft_model(copy.deepcopy(tiny.model), config).eval()


@pytest.mark.parametrize("pooling", ["none", "mean"])
def test_several_images_per_sample_follow_their_sample(llava, pooling):
    """Sample 0 has two images, sample 1 one; each row of the batch equals that sample run alone."""
    model = routed(llava, pooling=pooling)
    tokens = llava.num_image_tokens
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(5, 99, (2, 6 + tokens), generator=generator)
    image = torch.full((tokens,), IMAGE_TOKEN_ID)
    first = torch.cat([image, image, text[0, :6]])
    second = torch.cat([image, text[1]])
    input_ids = torch.stack([first, second])
    pixel_values = torch.randn(3, 3, 32, 32, generator=generator)
    with torch.no_grad():
        batch = model(input_ids=input_ids, pixel_values=pixel_values).logits
        alone_first = model(input_ids=first[None], pixel_values=pixel_values[:2]).logits
        alone_second = model(input_ids=second[None], pixel_values=pixel_values[2:]).logits
        # The mapping matters: sample 1 routed with image 1 (the one-image-per-sample assumption) differs.
        wrong = model(input_ids=second[None], pixel_values=pixel_values[1:2]).logits
    torch.testing.assert_close(batch[:1], alone_first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch[1:], alone_second, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch[1:], wrong, atol=1e-3)


def test_concurrent_forwards_in_threads_keep_their_own_features(llava):
    model = routed(llava)
    inputs = llava.inputs
    rows = [{k: v[i : i + 1] for k, v in inputs.items() if k != "labels"} for i in range(2)]
    with torch.no_grad():
        expected = [model(**row).logits for row in rows]
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def work(index: int) -> None:
        barrier.wait()
        with torch.no_grad():
            for _ in range(3):
                results[index] = model(**rows[index]).logits

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(2):
        torch.testing.assert_close(results[index], expected[index])


def test_features_do_not_leak_into_a_later_text_only_forward(llava):
    model = routed(llava)
    with torch.no_grad():
        model(**{k: v for k, v in llava.inputs.items() if k != "labels"})
        text_only = torch.randint(5, 99, (2, 6))
        with pytest.raises(MissingVisualFeaturesError, match="q_proj"):
            model(input_ids=text_only)


def test_unload_removes_the_hooks(llava):
    model = routed(llava)
    base = model.unload()
    projector = base.model.multi_modal_projector
    assert not projector._forward_hooks
    assert not base._forward_pre_hooks and not base._forward_hooks
