"""Original LLaVA / LLaVA-Med checkpoints (`LlavaLlamaForCausalLM`, `LlavaMistralForCausalLM`; github.com/haotian-liu/
LLaVA, github.com/microsoft/LLaVA-Med) as medm checkpoints.

    medm import llava /models/llava-med-v1.5-mistral-7b runs/llava-med --encoder-path /models/clip-vit-large-patch14-336
    medm import llava checkpoints/llava-v1.5-7b-pretrain runs/pre --llm-path /models/vicuna-7b-v1.5 \\
        --encoder-path /models/clip-vit-large-patch14-336

Two layouts are read. A merged directory holds `config.json` (`model_type` llava_llama / llava_mistral: the LLM's
config plus the `mm_*` keys), the weights and the tokenizer. A projector-only directory (LLaVA's pretrain stage,
`tune_mm_mlp_adapter`) holds `config.json` and `mm_projector.bin`; the LLM's weights and tokenizer then come from
`--llm-path`.

The CLIP tower. LLaVA names it by `mm_vision_tower` (a hub id) and its loader always reloads it from there; a
checkpoint may also carry it as `model.vision_tower.vision_tower.vision_model.*` (the same weights when the tower
was frozen, as in LLaVA-1.5 and LLaVA-Med v1.5). `--encoder-path` (a local CLIP directory: config.json,
preprocessor_config.json, and weights) is read in place of `mm_vision_tower`; the tower weights are the
checkpoint's when present, else that directory's (a `CLIPVisionModel` or a full `CLIPModel`, whose text tower is
left out).

What maps (weights are copied unchanged):

| LLaVA                                              | medm                                               |
|----------------------------------------------------|----------------------------------------------------|
| `model.*`, `lm_head.*` (Llama / Mistral)           | `llm.model.*`, `llm.lm_head.*`                     |
| `model.vision_tower.vision_tower.*` (4.x names)    | `vision.model.*`                                   |
| `mm_vision_select_layer`                           | `select_layer`                                     |
| `mm_vision_select_feature` patch / cls_patch       | `select_feature` patch (CLS dropped) / cls_patch   |
| `model.mm_projector.{0,2}` (`mlp{N}x_gelu`)        | `connector.mlp.{0,2}` (`mlp`, same type)           |
| `model.mm_projector` (`linear`)                    | `connector.mlp.0` (`mlp`, type `linear`)           |
| `image_aspect_ratio` pad / square                  | `vision.resize` pad (mean colour) / crop           |
| conversation modes                                 | templates `llava_v1`, `vicuna_v1`, `mistral_instruct` |

Refused, with the reason: `mm_patch_merge_type` spatial / spatial_unpad and `image_aspect_ratio: anyres` (LLaVA-NeXT
tiling; medm's 2D tower sees one image), `mm_use_im_start_end` (the `<im_start>` / `<im_end>` tokens),
LlavaMpt and other LLMs, the `identity` projector, LoRA adapter directories (merge them with LLaVA first).
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
from medm.interop.llava_hf import _RESAMPLE_CODES, ImportFormatError, _encoder_for
from medm.registry import TEMPLATE, VISION

logger = logging.getLogger(__name__)

# LLaVA model_type -> the LLM's model_type, and the conversation mode its released checkpoints were trained with
# (LLaVA-1.5: llava_v1; LLaVA-Med v1.5: mistral_instruct, the mode its model_vqa evaluation is run with).
LLMS = {"llava_llama": ("llama", "llava_v1"), "llava_mistral": ("mistral", "mistral_instruct")}
_MLP = re.compile(r"mlp(\d+)x_gelu")
# LLaVA's `square` (and unset) runs the CLIP processor on the image as it is: short side resized, centre-cropped.
_ASPECT = {"pad": "pad", "square": "crop", None: "crop"}
# LLaVA's own keys in its config.json: not part of the LLM's config.
_LLAVA_KEYS = ("image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length",
               "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "use_mm_proj",
               "mm_projector_lr", "architectures", "_name_or_path")
TOWER_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_FILE = "mm_projector.bin"


def check_llava_config(cfg: dict[str, Any], src: str) -> None:
    """Raise ImportFormatError naming the first setting medm cannot represent."""
    mt = cfg.get("model_type")
    if mt not in LLMS:
        hint = ("; a transformers llava-hf directory: use `medm import llava-hf`" if "text_config" in cfg
                else "; model_type llava without text_config is LLaVA v0 / LLaVA-Med v1.0, which medm does not import"
                if mt == "llava" else "")
        raise ImportFormatError(f"{src}: model_type {mt!r}; medm imports original LLaVA checkpoints of model_type "
                                f"{', '.join(LLMS)}{hint}")
    if not cfg.get("mm_vision_tower"):
        raise ImportFormatError(f"{src}: config.json names no vision tower (mm_vision_tower); a text-only model")
    merge = cfg.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise ImportFormatError(f"{src}: mm_patch_merge_type {merge!r} (LLaVA-NeXT anyres tiling) is refused: "
                                "medm imports the flat patch merge only")
    aspect = cfg.get("image_aspect_ratio")
    if aspect not in _ASPECT:
        raise ImportFormatError(f"{src}: image_aspect_ratio {aspect!r} is refused (anyres tiling); medm imports pad "
                                "and square")
    if cfg.get("mm_use_im_start_end"):
        raise ImportFormatError(f"{src}: mm_use_im_start_end true (<im_start> / <im_end> around each image) is "
                                "refused; medm's prompts hold the image placeholder alone")
    proj = cfg.get("mm_projector_type", "linear")
    if proj != "linear" and not (isinstance(proj, str) and _MLP.fullmatch(proj)):
        raise ImportFormatError(f"{src}: mm_projector_type {proj!r}; medm imports LLaVA's linear and mlp{{N}}x_gelu "
                                "projectors")
    layer, feature = cfg.get("mm_vision_select_layer", -2), cfg.get("mm_vision_select_feature", "patch")
    if not isinstance(layer, int) or feature not in ("patch", "cls_patch"):
        raise ImportFormatError(f"{src}: mm_vision_select_layer {layer!r} / mm_vision_select_feature {feature!r}; "
                                "expected an integer layer and patch or cls_patch")


def clip_settings(processor, image_size: int, src: str) -> dict[str, Any]:
    """medm `vision` keys (mean, std, resample) of the tower's CLIPImageProcessor, which LLaVA runs after its own
    aspect step; its resize-and-crop is `vision.resize: crop` (or a plain resize after `pad`)."""
    crop = dict(getattr(processor, "crop_size", None) or {})
    if crop and (crop.get("height"), crop.get("width")) != (image_size, image_size):
        logger.warning("%s: the image processor crops to %s, the tower takes %d px; medm uses the tower's", src,
                       crop, image_size)
    resample = {v: k for k, v in _RESAMPLE_CODES.items()}.get(int(getattr(processor, "resample", 3)))
    if resample is None:
        logger.warning("%s: resample %s is not one medm has; using bicubic", src, processor.resample)
    return {"resample": resample or "bicubic", "image_mean": [float(x) for x in processor.image_mean],
            "image_std": [float(x) for x in processor.image_std]}


def text_config_of(cfg: dict[str, Any], src: str):
    """The LLM's transformers config: LLaVA's config.json less its `mm_*` and training keys."""
    text = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in _LLAVA_KEYS}
    text["model_type"] = LLMS[cfg["model_type"]][0]
    return hf_config(text, f"{src}: config.json (the LLM part)")


def tower_weights(encoder_path: str | None, tower: str, src: str) -> dict[str, torch.Tensor]:
    """The CLIP tower's weights under LLaVA's names, from the `--encoder-path` directory, else `mm_vision_tower` when
    that is a local directory (CLIPVisionModel or CLIPModel, 4.x or 5.x names); a full CLIP's text tower and
    projections are dropped."""
    encoder_path = encoder_path or (tower if os.path.isdir(tower) else None)
    if not encoder_path or not os.path.isdir(encoder_path):
        raise ImportFormatError(f"{src}: the checkpoint carries no vision tower weights ({TOWER_PREFIX}*); pass "
                                f"--encoder-path with a local copy of the tower mm_vision_tower names ({tower!r})")
    try:
        state = load_weights(encoder_path)
    except FileNotFoundError:
        raise ImportFormatError(f"{src}: the checkpoint carries no vision tower weights and --encoder-path "
                                f"{encoder_path} has none either (model.safetensors / pytorch_model.bin)") from None
    vision = {k: v for k, v in state.items()
              if not k.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale"))}
    # A 5.x CLIPVisionModel saves without the `vision_model.` level; put it back so one renaming serves both.
    return {TOWER_PREFIX + (k if k.startswith("vision_model.") else "vision_model." + k): v
            for k, v in vision.items()}


def llava_weights(src: str, llm_path: str | None) -> tuple[dict[str, torch.Tensor], bool]:
    """The model's weights under LLaVA's names, and whether the source is the projector-only layout."""
    try:
        return load_weights(src), False
    except FileNotFoundError:
        pass
    projector = os.path.join(src, PROJECTOR_FILE)
    if not os.path.isfile(projector):
        raise ImportFormatError(f"{src}: no weights: neither model.safetensors / pytorch_model.bin (merged) nor "
                                f"{PROJECTOR_FILE} (LLaVA's pretrain stage)")
    if not llm_path:
        raise ImportFormatError(f"{src}: a projector-only checkpoint ({PROJECTOR_FILE}); pass --llm-path with the "
                                "base LLM it was trained on (its weights and tokenizer)")
    try:
        state = load_weights(llm_path)
    except FileNotFoundError:
        raise ImportFormatError(f"{src}: --llm-path {llm_path} holds no weights; a projector-only checkpoint takes "
                                "the LLM's weights from there") from None
    proj = torch.load(projector, map_location="cpu", weights_only=True)
    bad = [k for k in proj if "mm_projector" not in k]
    if bad:
        raise ImportFormatError(f"{projector}: weight {bad[0]!r} is not a projector weight")
    # Saved under the model's names ("model.mm_projector.0.weight"); some tools strip the "model." level.
    state.update({(k if k.startswith("model.") else "model." + k): v for k, v in proj.items()})
    return state, True


def import_llava(src: str, out: str, *, llm_path: str | None = None, encoder_path: str | None = None,
                 family: str | None = None, template: str | None = None, system_prompt: str | None = None,
                 dtype: str | None = None) -> str:
    """`medm import llava SRC OUT`: a medm checkpoint that answers LLaVA's prompts as the LLaVA model does.

    Args:
        llm_path: base LLM directory: the weights and tokenizer of a projector-only checkpoint (else unused but for
            a tokenizer the checkpoint lacks).
        encoder_path: local CLIP directory read in place of `mm_vision_tower` (config, image processor, and the
            tower weights when the checkpoint has none).
        family, template, system_prompt, dtype: as `medm import llava-hf`; template default `llava_v1` (Llama),
            `mistral_instruct` (Mistral).

    Raises:
        ImportFormatError: a setting or weight medm cannot represent, naming it.
    """
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
        raise ImportFormatError(f"{src}: no config.json; not a LLaVA checkpoint directory")
    if os.path.isfile(os.path.join(src, "adapter_config.json")):
        raise ImportFormatError(f"{src}: a LoRA adapter directory; merge it with LLaVA's scripts/merge_lora_weights.py "
                                "first, then import the merged directory")
    cfg = read_json(cfg_path)
    check_llava_config(cfg, src)
    if template is not None:
        TEMPLATE.get(template)
    tower = cfg["mm_vision_tower"]
    text_config = text_config_of(cfg, src)
    vcfg = hf_config(config_json(encoder_path or tower, f"{src}: mm_vision_tower {tower!r} (a local copy: "
                                                       "--encoder-path)"), f"{src}: vision tower config", vision=True)
    enc_name = _encoder_for(vcfg)
    if cfg.get("mm_hidden_size") not in (None, vcfg.hidden_size):
        raise ImportFormatError(f"{src}: mm_hidden_size {cfg['mm_hidden_size']} but the vision tower's hidden_size "
                                f"is {vcfg.hidden_size}: --encoder-path is not the tower this checkpoint was built on")
    vision = {"name": enc_name, "config": config_dict(vcfg), "select_layer": cfg.get("mm_vision_select_layer", -2),
              "select_feature": cfg.get("mm_vision_select_feature", "patch")}
    processor = image_processor(encoder_path or tower, src)
    if processor is None:
        logger.warning("%s: no image processor found (pass --encoder-path with the CLIP tower's "
                       "preprocessor_config.json); using %s's default mean / std", src, enc_name)
    else:
        vision.update(clip_settings(processor, vcfg.image_size, src))
    vision["resize"] = _ASPECT[cfg.get("image_aspect_ratio")]

    state, projector_only = llava_weights(src, llm_path)
    own_tower = any(k.startswith(TOWER_PREFIX) for k in state)
    if not own_tower:
        state.update(tower_weights(encoder_path, tower, src))
    proj = cfg.get("mm_projector_type", "linear")
    weights: WeightMap = rename(state, [
        (TOWER_PREFIX, "vision.model."),
        ("model.mm_projector.", "connector.mlp.0." if proj == "linear" else "connector.mlp."),
        ("model.", "llm.model."), ("lm_head.", "llm.lm_head.")], src)
    # LLaVA saves the tower under transformers 4.x names (`vision_model.*`); today's drop that level.
    hf_legacy_names(weights, "vision.model.", VISION.get(enc_name).model_class)
    tokenizer = load_tokenizer([llm_path, src] if projector_only else [src, llm_path], src)
    if getattr(tokenizer, "legacy", None) is not None:
        # LLaVA tokenizes the text around each <image> on its own (tokenizer_image_token), so every piece, the first
        # after <s> included, starts with SentencePiece's space, whatever the tokenizer's `legacy` setting: the
        # legacy prefix scheme (a space after every special token) gives those ids. (A `legacy: false` tokenizer,
        # as LLaVA-1.5's, writes no space after a `</s>` inside a piece; see docs/migrating.md.) Written out
        # explicitly: transformers 5 does not save `legacy: true` back.
        tokenizer.legacy = True
        tokenizer.init_kwargs["legacy"] = True
    spec = ImportSpec(text_config=text_config, vision=vision, connector={"name": "mlp", "type": proj},
                      vision3d=None, connector3d=None, template=template or LLMS[cfg["model_type"]][1],
                      tokenizer=tokenizer, weights=weights)
    notes = ["LLaVA's loader reloads the vision tower from `mm_vision_tower`; the tower imported here is "
             + ("the checkpoint's own (the same weights when it was frozen)."
                if own_tower else
                f"the one in `{encoder_path}`.")]
    return write_medm_checkpoint(spec, src, out, fmt="llava", family=family, system_prompt=system_prompt,
                                 dtype=dtype, notes=notes)

