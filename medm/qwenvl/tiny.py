"""Offline tiny Qwen-VL presets: model configs with random weights, and a processor built in-process.

The tokenizer is `medm.models.tiny.tiny_tokenizer` (byte-level BPE trained now) with the Qwen special tokens
added and Qwen2-VL's chat template; the image processor is `Qwen2VLImageProcessor` built from settings (patch,
merge and temporal patch from the vision config, so the two always agree). Nothing is downloaded.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedTokenizerFast, ProcessorMixin, Qwen2VLImageProcessor

from medm.models.tiny import tiny_tokenizer

# The Qwen2-VL / Qwen2.5-VL special tokens beyond ChatML's, in the order the released tokenizers number them.
QWEN_VL_SPECIAL_TOKENS = [
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL-Instruct's chat template (Qwen2.5-VL ships the same one): a default system turn, ChatML turns, and
# `<|vision_start|><|image_pad|><|vision_end|>` for each image item of a message's content list.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text: hidden 64, 2 layers, head dim 16 (M-RoPE sections sum to head_dim / 2). Vision: 2 blocks of width 32,
# patch 14, 2x2 merge -> one LLM token per 28x28 pixels. Token ids and vocab size come from the tiny tokenizer.
_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}}
TINY_QWENVL: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"model_type": "qwen2_vl", "tie_word_embeddings": True, "text_config": _TINY_TEXT,
                 "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                                   "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}},
    # Qwen2.5-VL: SwiGLU vision blocks, windowed attention (one window of 56 px here) except in block 1.
    "qwen2_5_vl": {"model_type": "qwen2_5_vl", "tie_word_embeddings": True, "text_config": _TINY_TEXT,
                   "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                     "out_hidden_size": 64, "window_size": 56, "fullatt_block_indexes": [1],
                                     "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}},
    # Qwen3-VL: patch 16 (32 px per LLM token), learned position embeddings, one deepstack merger.
    "qwen3_vl": {"model_type": "qwen3_vl", "tie_word_embeddings": True,
                 "text_config": {**_TINY_TEXT, "head_dim": 16,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                     "mrope_section": [2, 3, 3], "mrope_interleaved": True}},
                 "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                   "out_hidden_size": 64, "num_position_embeddings": 64,
                                   "deepstack_visual_indexes": [0], "patch_size": 16, "spatial_merge_size": 2,
                                   "temporal_patch_size": 2}},
}


def tiny_qwenvl_config(model_type: str = "qwen2_5_vl") -> dict[str, Any]:
    """A tiny HF config dict (with `model_type`) for a Qwen-VL class: `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`."""
    if model_type not in TINY_QWENVL:
        raise KeyError(f"no tiny Qwen-VL preset for {model_type!r}; have: {', '.join(TINY_QWENVL)}")
    return copy.deepcopy(TINY_QWENVL[model_type])


def tiny_qwenvl_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny BPE tokenizer with the Qwen-VL special tokens and chat template (`<|im_end|>` ends a turn)."""
    tok = tiny_tokenizer("chatml", extra_special_tokens=QWEN_VL_SPECIAL_TOKENS)
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tok


def tiny_qwenvl_processor(processor_cls: type[ProcessorMixin], video_processor_cls: type, vision_config: Any,
                          min_pixels: int, max_pixels: int) -> ProcessorMixin:
    """A processor of `processor_cls` (e.g. Qwen2VLProcessor) around the tiny tokenizer, an image processor and a
    video processor (`video_processor_cls`; the processor classes require one) whose patch, merge and temporal patch
    sizes are the vision config's."""
    patch = vision_config.patch_size
    sizes = {"patch_size": patch if isinstance(patch, int) else patch[0],
             "merge_size": vision_config.spatial_merge_size, "temporal_patch_size": vision_config.temporal_patch_size}
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **sizes)
    return processor_cls(image_processor=image_processor, tokenizer=tiny_qwenvl_tokenizer(),
                         video_processor=video_processor_cls(**sizes), chat_template=QWEN_VL_CHAT_TEMPLATE)


def tiny_qwenvl_overrides(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Turn a qwen-vl model config (e.g. the 2B preset) into its tiny offline twin of the same class and settings.

    The path goes, the architecture becomes the tiny preset of its `model_type`, and the processor is built
    in-process; box format, pixels and LoRA targets are kept. Float32 and sdpa, for the CPU.
    """
    cfg = copy.deepcopy(model_cfg)
    q = cfg.setdefault("qwenvl", {})
    model_type = (q.get("config") or {}).get("model_type") or q.get("model_type")
    if model_type is None:
        raise ValueError("qwenvl: the tiny twin of a `path` model needs `model_type` (qwen2_vl, qwen2_5_vl, qwen3_vl)")
    q.update(path=None, processor=None, config=tiny_qwenvl_config(model_type), tiny_processor=True,
             dtype="float32", attn_implementation="sdpa")
    return cfg
