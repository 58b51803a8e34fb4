"""The demo BLIP base's vision tower as a transformers ``ViTModel`` (the vision encoder of the composite setting,
:mod:`vlpeft.demo.composite`).

The two share one architecture; the conversion is checked to give the same features. The ViT has no pooler: the
composite reads the final-LayerNorm CLS token.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipVisionModel, ViTConfig, ViTModel

__all__ = ["VISION_EXPORT_FORMAT", "blip_vision_to_vit", "export_vision_tower"]

VISION_EXPORT_FORMAT = 1

_LAYER_MAP = {
    "self_attn.projection": "attention.o_proj",
    "layer_norm1": "layernorm_before",
    "layer_norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def blip_vision_to_vit(blip_vision: BlipVisionModel) -> ViTModel:
    """A ``ViTModel`` (no pooler) with the weights of a ``BlipVisionModel``.

    Both are pre-LayerNorm ViTs: patch conv + CLS + learned positions, then layers of x + attn(LN1 x),
    x + MLP(LN2 x), and a final LayerNorm; BLIP's fused ``qkv`` (3d, d) splits into q, k, v in that order. The
    ViT's ``last_hidden_state`` (batch, 1 + patches, d) equals BLIP's."""
    source = blip_vision.config
    config = ViTConfig(hidden_size=source.hidden_size, num_hidden_layers=source.num_hidden_layers,
                       num_attention_heads=source.num_attention_heads, intermediate_size=source.intermediate_size,
                       image_size=source.image_size, patch_size=source.patch_size, hidden_act=source.hidden_act,
                       layer_norm_eps=source.layer_norm_eps, qkv_bias=True, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    vit = ViTModel(config, add_pooling_layer=False)
    blip = blip_vision.state_dict()
    mapped = {
        "embeddings.cls_token": blip["embeddings.class_embedding"],
        "embeddings.position_embeddings": blip["embeddings.position_embedding"],
        "embeddings.patch_embeddings.projection.weight": blip["embeddings.patch_embedding.weight"],
        "embeddings.patch_embeddings.projection.bias": blip["embeddings.patch_embedding.bias"],
        "layernorm.weight": blip["post_layernorm.weight"],
        "layernorm.bias": blip["post_layernorm.bias"],
    }
    for i in range(source.num_hidden_layers):
        prefix = f"encoder.layers.{i}."
        for part, tensor in zip(("q_proj", "k_proj", "v_proj"), blip[prefix + "self_attn.qkv.weight"].chunk(3)):
            mapped[f"layers.{i}.attention.{part}.weight"] = tensor
        for part, tensor in zip(("q_proj", "k_proj", "v_proj"), blip[prefix + "self_attn.qkv.bias"].chunk(3)):
            mapped[f"layers.{i}.attention.{part}.bias"] = tensor
        for old, new in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                mapped[f"layers.{i}.{new}.{kind}"] = blip[f"{prefix}{old}.{kind}"]
    expected = set(vit.state_dict())
    if set(mapped) != expected:
        raise RuntimeError(f"BLIP -> ViT weight map mismatch: missing {sorted(expected - set(mapped))}, "
                           f"unexpected {sorted(set(mapped) - expected)}")
    with torch.no_grad():
        vit.load_state_dict({k: v.clone() for k, v in mapped.items()})
    return vit.eval()


def export_vision_tower(base_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                        check: bool = True) -> Path:
    """Save the BLIP base's vision tower as a ``ViTModel`` folder (with the base's image processor) and return it.

    The folder (default: ``<base_dir>-vit``) is reused when it records the same base. With ``check`` the ViT's
    features are compared with BLIP's on random pixels (max abs difference < 1e-4)."""
    base_dir = Path(base_dir)
    out = Path(out_dir) if out_dir is not None else base_dir.with_name(base_dir.name + "-vit")
    stamp = {"format": VISION_EXPORT_FORMAT,
             "base_config": json.loads((base_dir / "config.json").read_text(encoding="utf-8"))["vision_config"],
             "base_weights_bytes": (base_dir / "model.safetensors").stat().st_size}
    marker = out / "vlpeft_vision_export.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp:
        return out
    blip = BlipForConditionalGeneration.from_pretrained(base_dir).vision_model.eval()
    vit = blip_vision_to_vit(blip)
    if check:
        pixels = torch.randn(2, 3, blip.config.image_size, blip.config.image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            gap = (vit(pixel_values=pixels).last_hidden_state - blip(pixel_values=pixels).last_hidden_state).abs().max()
        if float(gap) > 1e-4:
            raise RuntimeError(f"the converted ViT differs from BLIP's vision tower by {float(gap):.2e}")
    processor = AutoProcessor.from_pretrained(base_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-vit-", dir=out.parent if out.parent.exists() else None))
    try:
        vit.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        (tmp / marker.name).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
