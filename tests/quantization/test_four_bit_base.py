"""Routed LoRA, Adapter and p-adapter over a bitsandbytes NF4 4-bit base, the way QLoRA users train (issue #20 item 5).

A tiny twin is saved, reloaded 4-bit through ``transformers.BitsAndBytesConfig`` and prepared with
``peft.prepare_model_for_kbit_training``; each method is attached with its defaults, trained two steps, saved, and
loaded with ``PeftModel.from_pretrained`` onto a freshly quantized base.

CPU: bitsandbytes >= 0.50 runs 4-bit layers (forward and backward) on the CPU, so these tests are in the default
suite. CUDA: the same tests run under the ``gpu`` marker where a GPU is present (``benchmarks/gpu/device_checks.sh``),
with bfloat16 compute as QLoRA trains. They are skipped only where bitsandbytes is not installed (extra ``quant``).
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import vlpeft
from vlpeft.testing.twins import build_twin
from vlpeft.tuners._quantized import dequantized_weight

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[quant]')")

METHODS = {
    "padapter_release": lambda: vlpeft.PAdapterConfig(variant="release"),
    "padapter_paper": lambda: vlpeft.PAdapterConfig(variant="paper"),
    "lora": lambda: vlpeft.RoutedLoraConfig(),
    "routed_lora": lambda: vlpeft.RoutedLoraConfig(routing="mul"),
    "adapter": lambda: vlpeft.AdapterConfig(),
    "routed_adapter": lambda: vlpeft.AdapterConfig(routing="mul"),
}
#: The second family runs the methods that read the base in their own way (routing, W_O).
CASES = [("qwen2_5_vl", method) for method in sorted(METHODS)] + [
    ("gemma3", method) for method in ("padapter_paper", "padapter_release", "routed_adapter", "routed_lora")
]
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]


@pytest.fixture(scope="module")
def saved_twins(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each family's twin saved once: {name: (twin, folder)}."""
    saved = {}
    for name in sorted({family for family, _ in CASES}):
        twin = build_twin(name)
        folder = tmp_path_factory.mktemp(f"{name}_base")
        twin.model.save_pretrained(folder)
        saved[name] = (twin, folder)
    return saved


def _quantized_base(twin, folder, device: str, *, reentrant: bool = False) -> torch.nn.Module:
    """The saved twin reloaded NF4 with double quantization, prepared for k-bit training (QLoRA's setup: float32
    CPU compute, bfloat16 on CUDA) with non-reentrant gradient checkpointing (``reentrant``: PEFT's default, see
    test_routed_methods_under_reentrant_checkpointing)."""
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    model = twin.spec.model_class.from_pretrained(
        folder, quantization_config=quantization, device_map=device, dtype=compute)
    if device == "cpu":
        # bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first eval forward without
        # gradients, which fails for inputs narrower than its 64-wide quantization block ("shape '[32, 0]' is
        # invalid", bitsandbytes 0.50.2); the twins are 32 wide. Off, every CPU takes the same (dequantize) path.
        # test_dequantized_weight_after_cpu_repacking covers p-adapter's reading of a repacked weight.
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return peft.prepare_model_for_kbit_training(
        model, gradient_checkpointing_kwargs=None if reentrant else {"use_reentrant": False})


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


def _four_bit_state(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Packed codes and block scales of every 4-bit layer."""
    return {name: (module.weight.data.clone(), module.weight.quant_state.absmax.clone())
            for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("twin_name", "method"), CASES)
def test_method_trains_saves_and_loads_over_a_four_bit_base(saved_twins, twin_name, method, device, tmp_path):
    twin, folder = saved_twins[twin_name]
    batch = {k: v.to(device) for k, v in twin.batch(twin.samples((1, 2))).items()}
    model = _quantized_base(twin, folder, device)
    language = [module for name, module in model.named_modules()
                if ".language_model." in name and name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    assert language and all(isinstance(m, bnb.nn.Linear4bit) and m.weight.dtype == torch.uint8 for m in language)

    wrapped = peft.get_peft_model(model, METHODS[method]())
    trainable = {name: p for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable, "the method adapted nothing"
    assert all(p.dtype == torch.float32 for p in trainable.values())
    four_bit = _four_bit_state(wrapped)
    assert four_bit
    frozen = {name: p.detach().clone() for name, p in wrapped.named_parameters() if not p.requires_grad}

    # Two Adam steps (as tests/tuners/test_twin_methods.py): finite loss, finite gradients, and every trainable tensor
    # reached in one of the steps (LoRA's A only once B has moved off zero).
    wrapped.train()
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-3)
    reached = set()
    for _ in range(2):
        optimizer.zero_grad()
        loss = wrapped(**batch).loss
        assert torch.isfinite(loss), loss
        loss.backward()
        for name, parameter in trainable.items():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        reached |= {name for name, p in trainable.items() if bool(p.grad.abs().sum() > 0)}
        optimizer.step()
    assert reached == set(trainable), f"no gradient reached {sorted(set(trainable) - reached)}"

    # The 4-bit codes and scales, and every other frozen tensor, are unchanged.
    for name, (codes, scales) in _four_bit_state(wrapped).items():
        assert torch.equal(codes, four_bit[name][0]) and torch.equal(scales, four_bit[name][1]), name
    for name, parameter in wrapped.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name

    # The trained adapter acts on the outputs; the saved file holds only float adapter tensors.
    wrapped.eval()
    adapted = _logits(wrapped, batch)
    with wrapped.disable_adapter():
        assert not torch.allclose(_logits(wrapped, batch), adapted, atol=1e-6)
    wrapped.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(t.is_floating_point() for t in saved.values())
    assert not any("base_layer" in key for key in saved)

    loaded = peft.PeftModel.from_pretrained(_quantized_base(twin, folder, device), tmp_path).eval()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if device == "cpu" else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(_logits(loaded, batch), adapted, **tolerance)


@pytest.mark.parametrize("nested", [False, True], ids=["plain_scales", "double_quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantized_weight_after_cpu_repacking(quant_type: str, nested: bool) -> None:
    """p-adapter reads W_O through ``dequantized_weight``: after bitsandbytes repacked the layer for its
    AVX512-BF16 CPU kernel (forced here, so on every CPU) it gives the weight the layer computes with, up to the
    bfloat16 rounding of the block scales that the repacking does."""
    convert = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU repacking")
    generator = torch.Generator().manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 128, generator=generator), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=nested)
    layer = layer.to("cpu")
    before = dequantized_weight(layer).float().clone()
    assert before.shape == (96, 128)
    block_scale = before.abs().reshape(96, 2, 64).amax(dim=-1, keepdim=True).expand(96, 2, 64).reshape(96, 128)

    layer.weight.data, layer.weight.quant_state = convert(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu and layer.weight.shape == (96, 64)
    after = dequantized_weight(layer)
    assert after.shape == (96, 128)
    assert bool(((after.float() - before).abs() <= block_scale * 2**-8 + 1e-6).all())


def test_routed_methods_under_reentrant_checkpointing(saved_twins) -> None:
    """prepare_model_for_kbit_training's default (reentrant checkpointing, the patch embedding marked to require
    grad): x_R is cut from the frozen vision graph, so the routed layers' backwards do not walk it twice."""
    twin, folder = saved_twins["qwen2_5_vl"]
    wrapped = peft.get_peft_model(_quantized_base(twin, folder, "cpu", reentrant=True), METHODS["routed_lora"]())
    wrapped.train()
    wrapped(**twin.batch(twin.samples((1, 2)))).loss.backward()
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_lora_refuses_to_merge_into_a_four_bit_weight(saved_twins) -> None:
    twin, folder = saved_twins["qwen2_5_vl"]
    wrapped = peft.get_peft_model(_quantized_base(twin, folder, "cpu"), METHODS["lora"]())
    with pytest.raises(ValueError, match="cannot merge routed LoRA into the quantized weight"):
        wrapped.merge_and_unload()
