"""What the `paper` block outputs at init (docs/instabilities.md): for every adapted attention block of the demo's
SNLI-VE recipe, how close Ū (Eqs. 14-16) is to the frozen attention output o = Σ_j M_qj V̂_j (what the block would
give without the adapter) and to the query's own node V̂_q = (x W_q + b_q) W_O + b_O (the β̃ term).
usage: padapter_parts.py BASE DATA KEY=VALUE ...   (prints; scratch run folder under the system temp folder)"""
import sys
import tempfile

import torch
import yaml

import vlpeft.training.run as run_module
import vlpeft.tuners.p_adapter.variants as variants
from vlpeft.data.synth import benchmark_files
from vlpeft.training import config_from_dict
from vlpeft.training.validation import validate_config

rows = []
original = variants.p_laplacian_aggregate


def measured(query_nodes, value_nodes, attn, *args, **kwargs):
    result = original(query_nodes, value_nodes, attn, *args, **kwargs)
    u = (result[0] if isinstance(result, tuple) else result).squeeze(1)
    q, v = query_nodes.squeeze(1), value_nodes.squeeze(1)
    if query_nodes.shape[1] == 1 and v.shape[-2] == attn.shape[-1]:  # paper (one graph, no grouped-value basis)
        o = attn.mean(1) @ v
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        causal = float(attn.mean(1).triu(1).abs().max()) == 0.0  # self-attention of the causal decoder
        rows.append(("self" if causal else "cross", tuple(attn.shape), rel(u, o), rel(u, q)))
    return result


variants.p_laplacian_aggregate = measured


def main(base, data, *options):
    files = benchmark_files(data)
    method = {"type": "p_adapter", "key_pool_size": 17}
    method.update({k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in options)})
    config = config_from_dict({
        "model": {"name": base}, "method": method,
        "task": {"type": "snli_ve", "train": str(files.ve_jsonl["train"]), "test": str(files.ve_jsonl["test"]),
                 "images": str(files.ve_images), "inference": "rank", "max_length": 32,
                 "max_train_samples": 6000, "max_eval_samples": 300},
        "eval": {"strategy": "no", "load_best_at_end": False},
        "run": {"output_dir": tempfile.mkdtemp(prefix="padapter-parts-"), "seed": 0, "report_to": []},
    })
    assembled = run_module._assemble(config, validate_config(config, for_training=True))
    task = assembled.task
    model = assembled.model.eval()
    batch = task.collate([task.test_dataset[i] for i in range(32)])
    with torch.no_grad():
        model(**batch)
    for kind, shape, to_o, to_q in rows:
        print(f"{' '.join(options)}: {kind:>5}-attention {shape}: |Ū - o|/|o| = {to_o:.3f}, |Ū - V̂_q|/|V̂_q| = {to_q:.3f}")
    # image sensitivity: the same texts with the images of the batch rolled by one, adapted vs base (adapters off)
    rolled = {**batch, "pixel_values": batch["pixel_values"].roll(1, dims=0)}
    with torch.no_grad():
        adapted = (model(**batch).logits - model(**rolled).logits).abs().mean()
        with model.disable_adapter():
            base = (model(**batch).logits - model(**rolled).logits).abs().mean()
    print(f"{' '.join(options)}: image sensitivity (mean |logits change| when the images are swapped), adapted / "
          f"base = {float(adapted):.4f} / {float(base):.4f} = {float(adapted / base):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
