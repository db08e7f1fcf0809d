"""Qwen-VL models as the `qwen-vl` model kind: transformers' own classes plus the hooks medm asks a model for.

Each class here is the transformers class with `QwenVLMixin` added and the same class name, so a saved
`config.json` names the transformers architecture and the checkpoint opens with plain transformers (or vLLM).
The mixin tells medm's shared code what it needs, so that code never branches on model names:

- `stage_components()`: which modules are the stage plan's `vision` (the vision blocks), `connector` (the merger)
  and `llm` (the language model and its head);
- `llm_lora_targets()`: default LoRA targets of the language model.

medm's own settings for the model (`kind`, `box_format`, `system_prompt`, ...) ride in `config.medm`, so a
checkpoint reopens with them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoProcessor, PretrainedConfig, ProcessorMixin
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl
from transformers.models.qwen3_vl import modeling_qwen3_vl

from medm.config import ConfigError
from medm.models.checkpoint import refuse_missing_weights
from medm.models.llm import check_attn_implementation, resolve_dtype, warn_remote_code
from medm.qwenvl.args import (
    MODEL_TYPES,
    QwenVLArgs,
    is_qwenvl_checkpoint,  # noqa: F401  (exported here too)
)
from medm.qwenvl.args import NAME as KIND
from medm.qwenvl.tiny import tiny_qwenvl_processor

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Token ids the model config must share with the tokenizer.
_TOKEN_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
              "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


class QwenVLMixin:
    """What medm's stages, checkpoints, data and inference code ask of a qwen-vl model (see the module doc)."""

    # Stage-plan component -> module paths; the first `vision` path holds the blocks that `partial:N` counts.
    _stage_paths: dict[str, tuple[str, ...]] = {}
    # transformers marks these classes False, so its Trainer would average the loss per rank and per accumulation
    # step; their loss does take `num_items_in_batch`, and with it a step's loss is the mean over all its tokens,
    # whatever the number of ranks (`average_tokens_across_devices`) or accumulation steps.
    accepts_loss_kwargs = True
    medm_kind = KIND  # its entry in medm.registry.KIND (medm.qwenvl.kind)

    def stage_components(self) -> dict[str, list[str]]:
        return {name: list(paths) for name, paths in self._stage_paths.items()}

    @property
    def medm_settings(self) -> dict[str, Any]:
        """`config.medm`: kind, box_format, system_prompt, lora_target_modules, and where the weights came from."""
        return dict(getattr(self.config, "medm", None) or {})

    def llm_lora_targets(self) -> list[str]:
        return list(self.medm_settings.get("lora_target_modules") or DEFAULT_LORA_TARGETS)

    def idle_tower_zero(self) -> torch.Tensor:
        """A 0 that depends on every vision-tower parameter: its merged (and deepstack) features for one blank
        image of `spatial_merge_size`^2 patches, summed, times 0. Nothing when the tower is frozen and whole on this
        rank (see medm.models.modeling_medm.idle_tower_zero)."""
        visual = self.model.visual
        device = self.get_input_embeddings().weight.device
        if not any(p.requires_grad or hasattr(p, "ds_id") for p in visual.parameters()):
            return torch.zeros((), device=device)
        embed, merge = visual.patch_embed, visual.spatial_merge_size
        pixels = torch.zeros(merge * merge, embed.in_channels * embed.temporal_patch_size * embed.patch_size ** 2,
                             device=device)
        grid = torch.tensor([[1, merge, merge]], device=device)
        out = self.model.get_image_features(pixels, grid, return_dict=True)
        parts = [*out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]
        return sum(p.sum() for p in parts) * 0


def _runs_idle_tower(forward):
    """`forward` of a Qwen-VL class, except that a training batch without images or videos still runs the vision
    tower, on a blank image whose features are added to the token embeddings times 0: every rank of a distributed
    run then gathers (ZeRO-3) and reduces (DDP) the same parameters whatever its batch holds. The signature is
    `forward`'s own (functools.wraps), which generation and the Trainer inspect.

    The blank runs right after the token embedding (a forward hook), where transformers runs the tower on real
    images: ZeRO-3 prefetches parameters in the module order it traced, which must not change from step to step."""

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        if not self.training or any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos",
                                                                           "inputs_embeds")):
            return forward(self, *args, **kwargs)
        handle = self.get_input_embeddings().register_forward_hook(
            lambda module, inputs, embeds: embeds + self.idle_tower_zero().to(embeds.dtype))
        try:
            return forward(self, *args, **kwargs)
        finally:
            handle.remove()

    return wrapped


_QWEN2_PATHS = {"vision": ("model.visual.blocks", "model.visual.patch_embed"),
                "connector": ("model.visual.merger",), "llm": ("model.language_model", "lm_head")}


class Qwen2VLForConditionalGeneration(QwenVLMixin, modeling_qwen2_vl.Qwen2VLForConditionalGeneration):
    _stage_paths = _QWEN2_PATHS
    forward = _runs_idle_tower(modeling_qwen2_vl.Qwen2VLForConditionalGeneration.forward)


class Qwen2_5_VLForConditionalGeneration(QwenVLMixin, modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):
    _stage_paths = _QWEN2_PATHS
    forward = _runs_idle_tower(modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration.forward)


class Qwen3VLForConditionalGeneration(QwenVLMixin, modeling_qwen3_vl.Qwen3VLForConditionalGeneration):
    # Qwen3-VL adds learned position embeddings to the tower and deepstack mergers beside the final one.
    _stage_paths = {"vision": ("model.visual.blocks", "model.visual.patch_embed", "model.visual.pos_embed"),
                    "connector": ("model.visual.merger", "model.visual.deepstack_merger_list"),
                    "llm": ("model.language_model", "lm_head")}
    forward = _runs_idle_tower(modeling_qwen3_vl.Qwen3VLForConditionalGeneration.forward)


@dataclass(frozen=True)
class QwenVLClasses:
    """The model, processor and video processor classes of one Qwen-VL `model_type`."""

    model: type
    processor: str
    video_processor: str

    def processor_classes(self) -> tuple[type, type]:
        return getattr(transformers, self.processor), getattr(transformers, self.video_processor)


QWENVL_CLASSES = {
    "qwen2_vl": QwenVLClasses(Qwen2VLForConditionalGeneration, "Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": QwenVLClasses(Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": QwenVLClasses(Qwen3VLForConditionalGeneration, "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}


def classes_for(model_type: str, where: str) -> QwenVLClasses:
    if model_type not in QWENVL_CLASSES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not a Qwen-VL class medm builds; supported: "
                          f"{', '.join(QWENVL_CLASSES)}")
    return QWENVL_CLASSES[model_type]


def set_image_pixels(processor: ProcessorMixin, min_pixels: int, max_pixels: int) -> None:
    """Make the image processor resize every image to an area in [min_pixels, max_pixels]."""
    processor.image_processor.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}


def _tie_tokens(config: PretrainedConfig, tokenizer) -> None:
    """A random-init config takes its vocabulary size and special token ids from the tokenizer."""
    for key, token in _TOKEN_IDS.items():
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tokenizer.convert_ids_to_tokens(tid) != token:
            raise ConfigError(f"the tokenizer has no {token} token; a Qwen-VL tokenizer needs it")
        setattr(config, key, tid)
    text = config.text_config
    text.vocab_size = len(tokenizer)
    text.eos_token_id = tokenizer.eos_token_id
    text.pad_token_id = tokenizer.pad_token_id
    text.bos_token_id = tokenizer.bos_token_id


def build_qwenvl(args: QwenVLArgs, system_prompt: str | None = None, where: str = "model.qwenvl",
                 quantization_config=None):
    """(model, processor) from a `qwenvl:` section: pretrained from `path`, or random init from `config`.

    `quantization_config` (a QLoRA stage's `BitsAndBytesConfig`, medm.train._qlora) quantizes the language model as
    it loads; the vision tower, the merger(s) and the output head stay in full precision (`quantization_skip`).
    """
    args.check(where)
    dtype = resolve_dtype(args.dtype)
    attn = check_attn_implementation(args.attn_implementation)
    if args.trust_remote_code:
        warn_remote_code(args.path or args.processor or "the configured processor", "model and processor")
    if args.path is not None:
        config = AutoConfig.from_pretrained(args.path, trust_remote_code=args.trust_remote_code)
        if args.model_type not in (None, config.model_type):
            raise ConfigError(f"{where}.model_type: {args.model_type!r}, but {args.path} holds a "
                              f"{config.model_type!r} model")
        classes = classes_for(config.model_type, f"{where}.path {args.path}")
        extra = {}
        if quantization_config is not None:
            if quantization_config.llm_int8_skip_modules is None:
                quantization_config.llm_int8_skip_modules = quantization_skip(classes.model)
            extra["quantization_config"] = quantization_config
        model = classes.model.from_pretrained(args.path, config=config, dtype=dtype, attn_implementation=attn,
                                              trust_remote_code=args.trust_remote_code, **extra)
        processor = AutoProcessor.from_pretrained(args.processor or args.path,
                                                  trust_remote_code=args.trust_remote_code)
    else:
        cfg = dict(args.config)
        model_type = cfg.pop("model_type")
        classes = classes_for(model_type, f"{where}.config")
        config = AutoConfig.for_model(model_type, **cfg)
        if args.tiny_processor:
            processor = tiny_qwenvl_processor(*classes.processor_classes(), config.vision_config, args.min_pixels,
                                              args.max_pixels)
        else:
            processor = AutoProcessor.from_pretrained(args.processor, trust_remote_code=args.trust_remote_code)
        _tie_tokens(config, processor.tokenizer)
        model = classes.model._from_config(config, attn_implementation=attn)
        model.to(dtype)
    set_image_pixels(processor, args.min_pixels, args.max_pixels)
    model.config.medm = {"kind": KIND, "box_format": args.box_format, "system_prompt": system_prompt,
                         "lora_target_modules": args.lora_target_modules, "path": args.path}
    return model, processor


def quantization_skip(model_class: type) -> list[str]:
    """Module paths a 4-bit load leaves in full precision: the stage plan's `vision` and `connector` modules (the
    tower and its mergers) and the output head."""
    paths = model_class._stage_paths
    return [*paths["vision"], *paths["connector"], "lm_head"]


def load_qwenvl(path: str, dtype: str | None = None, device: str | torch.device | None = None,
                trust_remote_code: bool = False):
    """Reopen a qwen-vl checkpoint written by medm (config.json with `medm`, safetensors, processor)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    classes = classes_for(config.model_type, f"checkpoint {path}")
    model, info = classes.model.from_pretrained(path, config=config, use_safetensors=True, output_loading_info=True,
                                                dtype=resolve_dtype(dtype) if dtype else None)
    refuse_missing_weights(path, info)
    if device is not None:
        model.to(device)
    return model, load_qwenvl_processor(path, trust_remote_code)


def load_qwenvl_processor(path: str, trust_remote_code: bool = False) -> ProcessorMixin:
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


__all__ = ["DEFAULT_LORA_TARGETS", "KIND", "MODEL_TYPES", "QWENVL_CLASSES", "Qwen2VLForConditionalGeneration",
           "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration", "QwenVLMixin", "build_qwenvl",
           "is_qwenvl_checkpoint", "load_qwenvl", "load_qwenvl_processor", "set_image_pixels"]
