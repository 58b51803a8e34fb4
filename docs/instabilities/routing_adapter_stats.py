"""After training: per routed module, |A x_R|^2 (mean over 256 test images; x_R = mean of the post-LN vision tokens,
its tanh for runs named *tanh*, BLIP's pooler output for *pooler*) and |B|_F (docs/instabilities.md)."""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, BlipForConditionalGeneration

from vlpeft.data.synth import benchmark_files
from vlpeft.tasks import BadInputPolicy, VQADataset

torch.set_num_threads(1)
base, data, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
files = benchmark_files(data)
model = BlipForConditionalGeneration.from_pretrained(base).eval()
processor = AutoProcessor.from_pretrained(base)
dataset = VQADataset.from_official(files.vqa_questions("test"), files.vqa_annotations("test"), files.coco_images,
                                   policy=BadInputPolicy("raise"))
with torch.no_grad():
    images = [dataset[i]["image"] for i in range(0, 3 * 256, 3)]
    out = model.vision_model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    sources = {"mean": out.last_hidden_state.mean(1), "tanh": torch.tanh(out.last_hidden_state.mean(1)),
               "pooler": out.pooler_output}
for run in runs:
    weights = load_file(f"{run}/adapter_model.safetensors")
    x_r = sources[next((k for k in ("tanh", "pooler") if k in run), "mean")]
    a_keys = sorted(k for k in weights if k.endswith("lora_A.weight"))
    v2, b_norm, a_norm = [], [], []
    for key in a_keys:
        a, b = weights[key], weights[key.replace("lora_A", "lora_B")]
        v2.append(float(((x_r @ a.t()).norm(dim=-1) ** 2).mean()))
        b_norm.append(float(b.norm()))
        a_norm.append(float(a.norm()))
    print(f"{run}: {len(a_keys)} modules; |A x_R|^2 mean {sum(v2) / len(v2):.2f} (max {max(v2):.2f}); "
          f"|A|_F mean {sum(a_norm) / len(a_norm):.2f}; |B|_F mean {sum(b_norm) / len(b_norm):.2f} "
          f"(max {max(b_norm):.2f})")
