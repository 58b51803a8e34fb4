"""The offline demo: a pretrained tiny BLIP base, every method fine-tuned on the built-in benchmark, one table."""
