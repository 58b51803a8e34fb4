"""Scenes drawn on the fly (no files): the captioning corpus used to pretrain the demo's base model.

:class:`SceneCaptionDataset` item ``i`` is image ``i // captions_per_image`` of the ``"pretrain"`` random stream
with its ``i % captions_per_image``-th caption, in the item format of
:class:`~vlpeft.tasks.captions.CaptionDataset` (``"pairs"`` view): ``image`` (PIL RGB), ``image_id``,
``caption``, ``caption_id``. Its scenes exclude the same held-out (colour, shape) pairs as the benchmark's
training split, so the benchmark's test pairs stay unseen by the base model as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from vlpeft.data.language import make_captions
from vlpeft.data.scenes import all_combinations, render_scene, sample_scene, scene_rng


class SceneCaptionDataset(Dataset):
    """``num_images`` procedurally drawn scenes with ``captions_per_image`` captions each.

    Args:
        num_images: number of distinct scenes (>= 1).
        seed: seed of the scenes (independent of the benchmark's splits, which use other random streams).
        heldout: (colour, shape) pairs never drawn.
        image_size, min_objects, max_objects: as in :class:`~vlpeft.data.synth.SynthConfig`.
    """

    def __init__(self, num_images: int, *, seed: int = 0, heldout: Sequence[tuple[str, str]] = (),
                 image_size: int = 64, min_objects: int = 1, max_objects: int = 4,
                 captions_per_image: int = 5) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        self.num_images = num_images
        self.seed = seed
        self.allowed = [c for c in all_combinations() if c not in set(map(tuple, heldout))]
        self.image_size = image_size
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.captions_per_image = captions_per_image

    def __len__(self) -> int:
        return self.num_images * self.captions_per_image

    def scene_and_captions(self, image_index: int) -> tuple[Any, list[str]]:
        rng = scene_rng(self.seed, "pretrain", image_index)
        scene = sample_scene(rng, image_size=self.image_size, min_objects=self.min_objects,
                             max_objects=self.max_objects, allowed=self.allowed)
        captions = make_captions(scene, scene_rng(self.seed, "pretrain", image_index, 2), self.captions_per_image)
        return scene, captions

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image_index, caption_index = divmod(index, self.captions_per_image)
        scene, captions = self.scene_and_captions(image_index)
        image = render_scene(scene, scene_rng(self.seed, "pretrain", image_index, 1))
        return {"image": image, "image_id": image_index, "caption": captions[caption_index],
                "caption_id": index}
