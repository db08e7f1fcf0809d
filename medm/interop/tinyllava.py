"""TinyLLaVA_Factory checkpoints (`TinyLlavaForConditionalGeneration`, github.com/TinyLLaVA/TinyLLaVA_Factory) as
medm checkpoints.

    medm import tinyllava /models/TinyLLaVA-Qwen2-0.5B-SigLIP runs/tinyllava
    medm import tinyllava runs/tinyllava-pretrain runs/imported --llm-path /models/Qwen2.5-0.5B

Two layouts are read. A finetune-stage directory holds `config.json` (`model_type: tinyllava`, with `text_config`
and `vision_config`), safetensors or `pytorch_model.bin` (one file or shards with an index) and the tokenizer. A
pretrain-stage directory holds instead three folders, `language_model/`, `vision_tower/` and `connector/`, each
with a `pytorch_model.bin` of that part's own (unprefixed) names, the first two with their `config.json`.

What maps, exactly (weights are copied unchanged):

| TinyLLaVA_Factory                                   | medm                                              |
|-----------------------------------------------------|---------------------------------------------------|
| `language_model.*` (any HF causal LM)               | `llm.*` (a missing `lm_head` is tied)             |
| `vision_tower._vision_tower.*` (HF SigLIP / CLIP;   | `vision.model.*` (transformers' own 4.x -> 5.x    |
| 4.x `vision_model.*` names, as TinyLLaVA saves)     | renaming)                                         |
| `vision_feature_layer`                              | `select_layer`                                    |
| `vision_feature_select_strategy` patch / cls_patch  | `select_feature` patch (CLS dropped) / cls_patch  |
| `patch` on a tower without CLS (SigLIP)             | `select_feature` skip_first (top-left patch dropped) |
| `connector._connector.{0,2}` (`mlp{N}x_gelu`)       | `connector.mlp.{0,2}` (`mlp`, same type)          |
| `connector._connector` (`linear`)                   | `connector.mlp.0` (`mlp`, type `linear`)          |
| `image_aspect_ratio` pad / square                   | `vision.resize` pad (mean-colour square) / squash |
| phi / qwen2_base / qwen2_instruct / llama templates | template `tinyllava` with the tokenizer's EOS     |

TinyLLaVA's `patch` strategy drops the first token; SigLIP has no CLS token, so there it drops the top-left patch
(TinyLLaVA's SigLIP models see 728 of 729 patches), which `select_feature: skip_first` reproduces. Connectors other
than MLPs (resampler, Q-Former, MoF), two vision towers and LoRA adapter directories are refused with the reason.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch

from medm.interop._source import (
    ImportSpec,
    WeightMap,
    config_dict,
    config_json,
    hf_config,
    hf_legacy_names,
    image_processor,
    load_tokenizer,
    load_weights,
    read_json,
    rename,
    write_medm_checkpoint,
)
from medm.interop.llava_hf import ImportFormatError, _encoder_for, _preprocess_settings
from medm.registry import TEMPLATE, VISION

logger = logging.getLogger(__name__)

PRETRAIN_FOLDERS = ("language_model", "vision_tower", "connector")
# Prefixes the finetune layout uses for each pretrain-layout folder.
_FOLDER_PREFIX = {"language_model": "language_model.", "vision_tower": "vision_tower._vision_tower.",
                  "connector": "connector."}
_MLP = re.compile(r"mlp(\d+)x_gelu")
_ASPECT = {"pad": "pad", "square": "squash"}


def _base_name(name: str | None) -> str | None:
    # TinyLLaVA accepts "kind:name_or_path" (e.g. "google/siglip-so400m-patch14-384" or "siglip:/path").
    return name.split(":")[-1] if name else None


def load_tinyllava_weights(src: str) -> dict[str, torch.Tensor]:
    """The model's weights under finetune-layout names, from either layout."""
    try:
        return load_weights(src)
    except FileNotFoundError:
        pass
    folders = [f for f in PRETRAIN_FOLDERS if os.path.isdir(os.path.join(src, f))]
    if not folders:
        raise ImportFormatError(f"{src}: no weights: neither model.safetensors / pytorch_model.bin (finetune "
                                f"layout) nor the {', '.join(PRETRAIN_FOLDERS)} folders (pretrain layout)")
    missing = [f for f in PRETRAIN_FOLDERS if f not in folders]
    if missing:
        raise ImportFormatError(f"{src}: a pretrain-layout checkpoint without its {', '.join(missing)} folder(s)")
    state = {}
    for folder in PRETRAIN_FOLDERS:
        for key, value in load_weights(os.path.join(src, folder)).items():
            state[_FOLDER_PREFIX[folder] + key] = value
    return state


def _part_config(cfg: dict[str, Any], key: str, folder: str, path: str | None, name: str | None, src: str,
                 option: str) -> dict[str, Any]:
    """`text_config` / `vision_config`: from config.json, else the pretrain folder's config.json, else the base."""
    if isinstance(cfg.get(key), dict) and cfg[key]:
        return cfg[key]
    folder_cfg = os.path.join(src, folder, "config.json")
    if os.path.isfile(folder_cfg):
        return read_json(folder_cfg)
    source = path or name
    if not source:
        raise ImportFormatError(f"{src}: config.json has no {key} and names no base model; pass --{option}")
    return config_json(source, f"{src}: {key} ({source}; override with --{option})")


def import_tinyllava(src: str, out: str, *, llm_path: str | None = None, encoder_path: str | None = None,
                     family: str | None = None, template: str | None = None, system_prompt: str | None = None,
                     dtype: str | None = None) -> str:
    """`medm import tinyllava SRC OUT`: a medm checkpoint (config, weights, tokenizer, model.yaml, README.md) that
    answers TinyLLaVA's prompts as the TinyLLaVA model does.

    Args:
        llm_path, encoder_path: base model directories (or hub ids) for what the checkpoint does not carry (its
            text / vision config, tokenizer, image processor).
        family, template, system_prompt, dtype: as `medm import llava-hf`; template default `tinyllava`.

    Raises:
        ImportFormatError: a setting or weight medm cannot represent, naming it.
    """
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
        raise ImportFormatError(f"{src}: no config.json; not a TinyLLaVA_Factory checkpoint directory")
    cfg = read_json(cfg_path)
    if cfg.get("model_type") != "tinyllava":
        hint = "; use `medm import medm-vl`" if cfg.get("model_type") in (None, "lvlm") else ""
        raise ImportFormatError(f"{src}: model_type {cfg.get('model_type')!r} is not a TinyLLaVA_Factory checkpoint "
                                f"(model_type tinyllava){hint}")
    if os.path.isfile(os.path.join(src, "adapter_config.json")):
        raise ImportFormatError(f"{src}: a LoRA adapter directory; merge it into the model with TinyLLaVA_Factory "
                                "first (its merge_lora_weights script), then import the merged directory")
    if template is not None:
        TEMPLATE.get(template)
    if cfg.get("vision_model_name_or_path2"):
        raise ImportFormatError(f"{src}: two vision towers (vision_model_name_or_path2 "
                                f"{cfg['vision_model_name_or_path2']!r}); medm's 2D tower is one encoder")
    connector_type = cfg.get("connector_type")
    if connector_type != "linear" and not (isinstance(connector_type, str) and _MLP.fullmatch(connector_type)):
        raise ImportFormatError(f"{src}: connector_type {connector_type!r}; medm imports TinyLLaVA's linear and "
                                "mlp{N}x_gelu connectors")
    layer, strategy = cfg.get("vision_feature_layer", -2), cfg.get("vision_feature_select_strategy", "patch")
    if not isinstance(layer, int) or strategy not in ("patch", "cls_patch"):
        raise ImportFormatError(f"{src}: vision_feature_layer {layer!r} / vision_feature_select_strategy "
                                f"{strategy!r}; expected an integer layer and patch or cls_patch")
    aspect = cfg.get("image_aspect_ratio", "square")
    if aspect not in _ASPECT:
        raise ImportFormatError(f"{src}: image_aspect_ratio {aspect!r}; medm has {', '.join(_ASPECT)}")

    vision_name = _base_name(cfg.get("vision_model_name_or_path"))
    text_config = hf_config(_part_config(cfg, "text_config", "language_model", llm_path,
                                         cfg.get("llm_model_name_or_path"), src, "llm-path"), f"{src}: text_config")
    vcfg = hf_config(_part_config(cfg, "vision_config", "vision_tower", encoder_path, vision_name, src,
                                  "encoder-path"), f"{src}: vision_config", vision=True)
    enc_name = _encoder_for(vcfg)
    # TinyLLaVA's `patch` drops the first token: the CLS of a CLIP tower, a patch of a SigLIP one (no CLS).
    select_feature = strategy if strategy == "cls_patch" or VISION.get(enc_name).num_cls_tokens else "skip_first"
    vision = {"name": enc_name, "config": config_dict(vcfg), "select_layer": layer, "select_feature": select_feature}
    processor = image_processor(encoder_path or vision_name, src)
    if processor is None:
        logger.warning("%s: no image processor found (pass --encoder-path with the base encoder's "
                       "preprocessor_config.json); using %s's default mean / std", src, enc_name)
    else:
        vision.update(_preprocess_settings(processor, vcfg.image_size, src))
    vision["resize"] = _ASPECT[aspect]

    mlp_prefix = "connector.mlp.0." if connector_type == "linear" else "connector.mlp."
    weights: WeightMap = rename(load_tinyllava_weights(src), [
        ("language_model.", "llm."), ("vision_tower._vision_tower.", "vision.model."),
        ("connector._connector.", mlp_prefix)], src)
    # TinyLLaVA saves its tower under transformers 4.x names (`vision_model.*`); today's drop that level.
    hf_legacy_names(weights, "vision.model.", VISION.get(enc_name).model_class)
    tokenizer = load_tokenizer([src, llm_path, cfg.get("tokenizer_name_or_path"), cfg.get("llm_model_name_or_path")],
                               src)
    spec = ImportSpec(text_config=text_config, vision=vision, connector={"name": "mlp", "type": connector_type},
                      vision3d=None, connector3d=None, template=template or "tinyllava", tokenizer=tokenizer,
                      weights=weights)
    return write_medm_checkpoint(spec, src, out, fmt="tinyllava", family=family, system_prompt=system_prompt,
                                 dtype=dtype)
