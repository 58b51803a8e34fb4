"""Layer layouts of the architectures whose families are written out in :mod:`vlpeft.glue.known`.

Each :class:`~vlpeft.glue.description.LayerLayout` gives the relative module names of one layer of an
architecture (BERT-like, BLIP text with inline attention, Q-Former, Llama-like, OPT, BART, GPT-2, CLIP/SigLIP
vision, ViT, BLIP and BLIP-2 vision). Derived families build their layouts from the model instead.
"""

from __future__ import annotations

from vlpeft.glue.description import LayerLayout

LAYER_LAYOUTS: dict[str, LayerLayout] = {
    "bert": LayerLayout(
        layers=r"encoder\.layer\.\d+", self_attn="attention", cross_attn="crossattention",
        query="self.query", key="self.key", value="self.value", attn_output="output.dense",
        ffn_input="intermediate.dense", ffn_output="output.dense", ffn_block="output",
        ffn_block_style="bert_output", attention_style="interface",
    ),
    "blip_text": LayerLayout(
        layers=r"encoder\.layer\.\d+", self_attn="attention", cross_attn="crossattention",
        query="self.query", key="self.key", value="self.value", attn_output="output.dense",
        ffn_input="intermediate.dense", ffn_output="output.dense", ffn_block="output",
        ffn_block_style="bert_output", attention_style="inline",
    ),
    "qformer": LayerLayout(
        layers=r"encoder\.layer\.\d+", self_attn="attention", cross_attn="crossattention",
        query="attention.query", key="attention.key", value="attention.value", attn_output="output.dense",
        ffn_input="intermediate_query.dense", ffn_output="output_query.dense", ffn_block="output_query",
        ffn_block_style="bert_output", attention_style="interface",
    ),
    "llama": LayerLayout(
        layers=r"layers\.\d+", self_attn="self_attn", cross_attn=None,
        query="q_proj", key="k_proj", value="v_proj", attn_output="o_proj",
        ffn_input="mlp.up_proj", ffn_output="mlp.down_proj", ffn_block="mlp",
        ffn_block_style="mlp", attention_style="interface",
    ),
    "opt": LayerLayout(
        layers=r"model\.decoder\.layers\.\d+", self_attn="self_attn", cross_attn=None,
        query="q_proj", key="k_proj", value="v_proj", attn_output="out_proj",
        ffn_input="fc1", ffn_output="fc2", ffn_block=None, ffn_block_style=None, attention_style="interface",
    ),
    "bart": LayerLayout(  # BART encoder/decoder layers: FFN projections on the layer itself, no FFN block
        layers=r"layers\.\d+", self_attn="self_attn", cross_attn="encoder_attn",
        query="q_proj", key="k_proj", value="v_proj", attn_output="out_proj",
        ffn_input="fc1", ffn_output="fc2", ffn_block=None, ffn_block_style=None, attention_style="interface",
    ),
    "gpt2": LayerLayout(
        layers=r"h\.\d+", self_attn="attn", cross_attn="crossattention",
        query=None, key=None, value=None, attn_output="c_proj", fused_qkv="c_attn",
        ffn_input="mlp.c_fc", ffn_output="mlp.c_proj", ffn_block="mlp", ffn_block_style="mlp",
        attention_style="interface",
    ),
    "clip_vision": LayerLayout(
        layers=r"encoder\.layers\.\d+", self_attn="self_attn", cross_attn=None,
        query="q_proj", key="k_proj", value="v_proj", attn_output="out_proj",
        ffn_input="mlp.fc1", ffn_output="mlp.fc2", ffn_block="mlp", ffn_block_style="mlp",
        attention_style="interface",
    ),
    "vit": LayerLayout(
        layers=r"layers\.\d+", self_attn="attention", cross_attn=None,
        query="q_proj", key="k_proj", value="v_proj", attn_output="o_proj",
        ffn_input="mlp.fc1", ffn_output="mlp.fc2", ffn_block="mlp", ffn_block_style="mlp",
        attention_style="interface",
    ),
    "blip_vision": LayerLayout(
        layers=r"encoder\.layers\.\d+", self_attn="self_attn", cross_attn=None,
        query=None, key=None, value=None, attn_output="projection", fused_qkv="qkv",
        ffn_input="mlp.fc1", ffn_output="mlp.fc2", ffn_block="mlp", ffn_block_style="mlp",
        attention_style="inline",
    ),
    "blip2_vision": LayerLayout(
        layers=r"encoder\.layers\.\d+", self_attn="self_attn", cross_attn=None,
        query=None, key=None, value=None, attn_output="projection", fused_qkv="qkv",
        ffn_input="mlp.fc1", ffn_output="mlp.fc2", ffn_block="mlp", ffn_block_style="mlp",
        attention_style="interface",
    ),
}
