"""Former path of the synthetic images: they live in :mod:`vlpeft.models.tiny.images` (re-exported here)."""

from vlpeft.models.tiny.images import images_to_pixel_values, random_pixel_values, tiny_images

__all__ = ["tiny_images", "images_to_pixel_values", "random_pixel_values"]
