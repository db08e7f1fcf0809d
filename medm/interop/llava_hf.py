"""transformers' LLaVA format: export a medm model to `LlavaForConditionalGeneration` + `LlavaProcessor`, and import
such a checkpoint back into medm.

    medm export --to llava-hf runs/finetune_lora runs/finetune_llava
    medm import llava-hf /models/llava-interleave-qwen-0.5b-hf runs/imported

What maps, exactly (weights are copied, never changed, except where noted):

| medm                                        | transformers LLaVA                                        |
|---------------------------------------------|-----------------------------------------------------------|
| `vision.model.*` (HF CLIP / SigLIP tower)   | `model.vision_tower.*` (`vision_config`)                  |
| `select_layer`                              | `vision_feature_layer`                                    |
| `select_feature` patch (CLS dropped)        | `vision_feature_select_strategy: default`                 |
| `select_feature` cls_patch, or no CLS       | `vision_feature_select_strategy: full`                    |
| `select_feature` skip_first                 | `default` (on SigLIP: the top-left patch dropped)         |
| `connector.mlp.0` / `.2` (`mlp2x_{act}`)    | `model.multi_modal_projector.linear_1` / `linear_2`       |
| `connector.mlp.0` (`linear`)                | `linear_1`, `projector_hidden_act: linear`, `linear_2` = I |
| `llm.<base_model_prefix>.*`, `llm.lm_head.*` | `model.language_model.*`, `lm_head.*`                    |
| chat template (+ default system prompt)     | processor / tokenizer chat template (string or list parts) |
| `ImagePreprocess` (squash / pad, resample)  | `LlavaImageProcessor` (no centre crop, `do_pad` for pad)  |

The processor expands `<image>` to `(side // patch)^2 + num_additional_image_tokens - (1 if default)` tokens, which
equals the connector's token count. Its PIL backend (`AutoProcessor.from_pretrained(dir, backend="pil")`) gives
pixel values identical to medm's; the torchvision backend, transformers' default when torchvision is installed,
resizes with antialiasing and differs by up to about one grey level.

What LLaVA's format cannot hold is refused with the reason (`ExportError`): 3D towers, encoders that are not
transformers vision models (open_clip, timm), 1-channel encoders, pooling connectors, MLPs deeper than two layers.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from medm.data.annotations import IMAGE_TOKEN
from medm.data.templates import ChatFormat, TemplateError
from medm.interop._grayscale import patch_embedding_key, rgb_patch_weight
from medm.interop._llava_hf_format import (
    _ACTIVATIONS,
    _LANGUAGE_MODEL,
    _LM_HEAD,
    _PROJ_1,
    _PROJ_2,
    _RESAMPLE_CODES,
    _VISION,
    DTYPE_NAMES,
    ExportError,
    ImportFormatError,  # noqa: F401  (re-exported, as the importer's names below)
    _assign,
    _on_meta,
    _rename,
    export_chat_template,
)

# The importer's names stay importable from here (`medm import llava-hf`, the other importers, tests).
from medm.interop._llava_hf_import import (  # noqa: F401
    _encoder_for,
    _preprocess_settings,
    from_llava_state_dict,
    import_llava_hf,
    write_model_yaml,
)
from medm.registry import CONNECTOR, VISION


# ---- what LLaVA can hold --------------------------------------------------------------------------------------
def _vision_class(config):
    from medm.models.vision._hf import HFEncoder, HFVisionEncoder  # defers transformers

    name = config.vision["name"]
    cls = VISION.get(name)
    if isinstance(cls, type) and issubclass(cls, HFEncoder) and not issubclass(cls, HFVisionEncoder):
        # the generic `hf` encoder on a CLIP / SigLIP config is its preset: same config, same weight names
        presets = [VISION.get(n) for n in VISION.names()]
        cls = next((c for c in presets if isinstance(c, type) and issubclass(c, HFVisionEncoder)
                    and c.model_type == config.vision.get("model_type")), cls)
    if isinstance(cls, type) and issubclass(cls, HFEncoder) and not issubclass(cls, HFVisionEncoder):
        raise ExportError(f"vision encoder {name!r} with model_type {config.vision.get('model_type')!r}: medm's "
                          "LLaVA export is checked for CLIP and SigLIP towers only, so only HF CLIP / SigLIP towers "
                          "(vision.name: clip, siglip, or hf with model_type clip_vision_model / siglip_vision_model) "
                          "export")
    if not (isinstance(cls, type) and issubclass(cls, HFVisionEncoder)):
        raise ExportError(f"vision encoder {name!r} ({getattr(cls, '__name__', cls)}) is not a transformers vision "
                          "model; LLaVA builds its vision_tower with AutoModel from a transformers vision_config, so "
                          "only HF CLIP / SigLIP towers (vision.name: clip, siglip) export")
    return cls


def _projector(config) -> tuple[int, str]:
    """(MLP depth, LLaVA projector_hidden_act) of the 2D connector, or ExportError."""
    from medm.models.connectors._mlp import parse_mlp_type  # defers transformers
    from medm.models.connectors.mlp import MLPConnector  # defers transformers

    name = config.connector["name"]
    if CONNECTOR.get(name) is not MLPConnector:
        raise ExportError(f"connector {name!r}: LLaVA's multi_modal_projector maps each visual token on its own "
                          "(Linear, activation, Linear); a connector that pools or resamples tokens has no place "
                          "in that format. Only connector.name: mlp exports")
    mlp_type = config.connector.get("type", "mlp2x_gelu")
    depth, act = parse_mlp_type(mlp_type)
    if depth > 2:
        raise ExportError(f"connector type {mlp_type!r} has {depth} Linear layers; LLaVA's projector has exactly two "
                          "(linear_1, activation, linear_2). Use mlp2x_* or linear")
    if depth == 2 and act not in _ACTIVATIONS:
        raise ExportError(f"connector type {mlp_type!r}: activation {act!r} has no transformers ACT2FN equivalent")
    return depth, _ACTIVATIONS[act] if depth == 2 else "linear"


def check_exportable(config) -> dict[str, Any]:
    """Check a `MedMConfig` fits transformers' LLaVA format; returns the LLaVA settings it maps to.

    Returns:
        {"vision_config", "vision_feature_layer", "vision_feature_select_strategy", "num_additional_image_tokens",
         "patch_size", "projector_depth", "projector_hidden_act", "preprocess" (the encoder's ImagePreprocess)}.

    Raises:
        ExportError: naming the part (vision3d, vision, connector, channels, ...) and why LLaVA cannot hold it.
    """
    from transformers.models.auto.modeling_auto import MODEL_MAPPING  # defers transformers

    if config.vision3d is not None:
        raise ExportError(f"the model has a 3D tower (vision3d: {config.vision3d['name']!r}, connector3d: "
                          f"{config.connector3d['name']!r}); transformers' LLaVA holds one 2D image tower only")
    if config.vision is None:
        raise ExportError("the model has no 2D vision encoder; a LLaVA checkpoint needs one (export the LLM alone "
                          "with transformers instead)")
    cls = _vision_class(config)
    vcfg = cls.config_class(**config.vision["config"])
    if MODEL_MAPPING.get(type(vcfg), None) is not cls.model_class:
        raise ExportError(f"vision encoder {config.vision['name']!r}: AutoModel does not build "
                          f"{cls.model_class.__name__} from a {type(vcfg).__name__}, so LLaVA's vision_tower would "
                          "differ")
    pre = cls.preprocessor(config.vision)
    grayscale = vcfg.num_channels == 1 and pre.channels == 1
    if not grayscale and (vcfg.num_channels != 3 or pre.channels != 3):
        raise ExportError(f"vision encoder {config.vision['name']!r} takes {vcfg.num_channels}-channel images "
                          f"({pre.channels} normalisation values); LLaVA's image processors give RGB, which "
                          "feeds a 3-channel encoder or, through its grayscale conversion, a 1-channel one")
    if grayscale:
        # LLaVA feeds RGB: a 3-channel tower whose channel weights are the 1-channel ones / 3 (medm.interop._grayscale)
        vcfg = cls.config_class(**{**config.vision["config"], "num_channels": 3})
    if pre.resize not in ("squash", "pad"):
        raise ExportError(f"vision.resize {pre.resize!r} has no LLaVA image processor setting")
    if pre.resample not in _RESAMPLE_CODES:
        raise ExportError(f"vision.resample {pre.resample!r} has no PIL resampling code")
    select_layer = config.vision.get("select_layer", -2)
    select_feature = config.vision.get("select_feature", "patch")
    if select_feature == "skip_first" or (select_feature == "patch" and cls.num_cls_tokens == 1):
        strategy = "default"  # LLaVA drops hidden_states[:, 0]: the CLS token, or SigLIP's top-left patch
    elif select_feature == "cls_patch" or cls.num_cls_tokens == 0:
        strategy = "full"  # every token (an encoder without CLS, e.g. SigLIP, has only patches)
    else:
        raise ExportError(f"vision encoder {config.vision['name']!r} has {cls.num_cls_tokens} prefix tokens; LLaVA's "
                          "`default` strategy drops exactly one")
    depth, act = _projector(config)
    return {"vision_config": vcfg, "vision_feature_layer": select_layer, "vision_feature_select_strategy": strategy,
            "num_additional_image_tokens": cls.num_cls_tokens, "patch_size": vcfg.patch_size,
            "projector_depth": depth, "projector_hidden_act": act, "preprocess": pre, "grayscale": grayscale,
            "image_mean": list(pre.mean) * (3 if grayscale else 1),
            "image_std": list(pre.std) * (3 if grayscale else 1)}


def llava_config(config, num_image_tokens: int):
    """The `LlavaConfig` of a medm model config (`check_exportable` first)."""
    from transformers import LlavaConfig  # defers transformers

    spec = check_exportable(config)
    text = config.text_config
    return LlavaConfig(
        vision_config=spec["vision_config"], text_config=text.to_dict(), image_token_id=config.image_token_id,
        image_seq_length=num_image_tokens, projector_hidden_act=spec["projector_hidden_act"],
        vision_feature_layer=spec["vision_feature_layer"],
        vision_feature_select_strategy=spec["vision_feature_select_strategy"], multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


def _llm_prefix(llm: nn.Module) -> str:
    """The LLM's base-model attribute; LLaVA's language_model is that module, built by AutoModel."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING  # defers transformers

    prefix = getattr(llm, "base_model_prefix", "")
    base = getattr(llm, prefix, None) if prefix else None
    if base is None or llm.get_output_embeddings() is not getattr(llm, "lm_head", None):
        raise ExportError(f"LLM {type(llm).__name__}: not a base model + `lm_head` causal LM, which LLaVA's "
                          "language_model + lm_head require")
    if getattr(llm.lm_head, "bias", None) is not None:
        raise ExportError(f"LLM {type(llm).__name__}: its lm_head has a bias; LLaVA's lm_head is a Linear without one")
    auto_cls = MODEL_MAPPING.get(type(llm.config), None)
    if auto_cls is not type(base):
        raise ExportError(f"LLM {type(llm).__name__}: AutoModel builds {getattr(auto_cls, '__name__', None)} from "
                          f"its config, not {type(base).__name__}, so LLaVA's language_model would differ")
    return prefix


def to_llava_state_dict(model) -> dict[str, torch.Tensor]:
    """`LlavaForConditionalGeneration` weights from a medm model (tensors shared, not copied).

    A `linear` connector gets an identity `linear_2` with zero bias, so LLaVA's Linear-act(linear)-Linear
    computes exactly the same projection.
    """
    depth, _ = _projector(model.config)
    prefix = _llm_prefix(model.llm)
    rules = [_VISION, _PROJ_1, (f"llm.{prefix}.", _LANGUAGE_MODEL), _LM_HEAD]
    if depth == 2:
        rules.append(_PROJ_2)
    state = _rename(model.state_dict(), rules, "medm -> LLaVA", ExportError)
    if model.vision.model.config.num_channels == 1:  # grayscale tower: 3 channels of weights / 3 (_grayscale)

        key = patch_embedding_key(model.vision.model, _VISION[1])
        state[key] = rgb_patch_weight(state[key])
    if depth == 1:
        w = state["model.multi_modal_projector.linear_1.weight"]
        d = w.shape[0]
        state["model.multi_modal_projector.linear_2.weight"] = torch.eye(d, dtype=w.dtype, device=w.device)
        state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(d, dtype=w.dtype, device=w.device)
    return state


# ---- processor ------------------------------------------------------------------------------------------------
def _chat_format(config, tokenizer):
    try:
        return ChatFormat(tokenizer, config.template, config.system_prompt)
    except TemplateError as e:
        raise ExportError(f"chat template: {e}") from None


def llava_processor(config, tokenizer, num_image_tokens: int):
    """A `LlavaProcessor` that preprocesses images as medm does and expands `<image>` to the connector's count.

    The tokenizer is copied; the copy's chat template becomes `export_chat_template` of the model's template.
    """
    from transformers import LlavaImageProcessor, LlavaProcessor  # defers transformers

    spec = check_exportable(config)
    pre = spec["preprocess"]
    h, w = pre.image_size
    image_processor = LlavaImageProcessor(
        do_resize=True, size={"height": h, "width": w}, resample=_RESAMPLE_CODES[pre.resample],
        # No centre crop: medm resizes the whole image (squash) or pads it to a square first (pad, do_pad).
        do_center_crop=False, crop_size={"height": h, "width": w}, do_pad=pre.resize == "pad",
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=spec["image_mean"],
        image_std=spec["image_std"], do_convert_rgb=True)
    tok = copy.deepcopy(tokenizer)
    jinja = export_chat_template(_chat_format(config, tokenizer).jinja, config.system_prompt)
    tok.chat_template = jinja
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=spec["patch_size"],
                               vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                               chat_template=jinja, image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=spec["num_additional_image_tokens"])
    expands = len(processor.replace_image_token({"pixel_values": [torch.zeros(3, h, w)]}, 0)) // len(IMAGE_TOKEN)
    if expands != num_image_tokens:
        raise ExportError(f"LlavaProcessor would expand <image> to {expands} tokens, the connector emits "
                          f"{num_image_tokens}")
    return processor


def generation_config(config, tokenizer):
    """Greedy decoding that stops where medm's Predictor stops (EOS or the template's end-of-turn token) and never
    emits a media placeholder."""
    from transformers import GenerationConfig  # defers transformers

    fmt = _chat_format(config, tokenizer)
    stop = sorted({i for i in (tokenizer.eos_token_id, fmt.end_of_turn_id) if i is not None})
    media = sorted(i for i in (config.image_token_id, config.image3d_token_id) if i is not None)
    return GenerationConfig(eos_token_id=stop if len(stop) > 1 else stop[0], pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, suppress_tokens=media or None, do_sample=False)


# ---- export ---------------------------------------------------------------------------------------------------
def to_llava(model, tokenizer):
    """(LlavaForConditionalGeneration sharing the medm model's weights, LlavaProcessor)."""
    from transformers import LlavaForConditionalGeneration  # defers transformers

    cfg = llava_config(model.config, model.num_image_tokens)
    cfg.dtype = DTYPE_NAMES.get(model.dtype, "float32")
    llava = _on_meta(lambda: LlavaForConditionalGeneration(cfg))
    _assign(llava, to_llava_state_dict(model), "medm -> LLaVA")
    if cfg.tie_word_embeddings:
        llava.tie_weights()
    llava.generation_config = generation_config(model.config, tokenizer)
    return llava.eval(), llava_processor(model.config, tokenizer, model.num_image_tokens)


def export_llava_hf(src: str, out: str, *, base: str | None = None, dtype: str | None = None,
                    eval_metrics: list[str] | None = None) -> str:
    """`medm export --to llava-hf SRC OUT`: a transformers LLaVA directory (model, processor, generation config,
    README.md) from any medm checkpoint (LoRA adapters are merged first).

    Raises:
        ExportError: before any weight is read, when the model has a part LLaVA's format cannot hold.
    """
    from transformers import AutoConfig  # defers transformers

    from medm.interop.model_card import write_model_card  # defers transformers
    from medm.models.checkpoint import load_trained  # defers transformers
    from medm.models.configuration_medm import MedMConfig  # defers transformers
    from medm.models.modeling_medm import register_auto_classes  # defers transformers

    register_auto_classes()
    config = AutoConfig.from_pretrained(src, trust_remote_code=False)
    if not isinstance(config, MedMConfig):
        raise ExportError(f"{src}: config.json has model_type {config.model_type!r}, not a medm checkpoint")
    check_exportable(config)  # fail before loading any weight
    model, tokenizer = load_trained(src, dtype=dtype, base=base, merge=True)
    llava, processor = to_llava(model, tokenizer)
    os.makedirs(out, exist_ok=True)
    llava.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    # transformers 5 nests the image processor in processor_config.json; older readers look for this file.
    processor.image_processor.save_pretrained(out)
    notes = []
    if llava.config.projector_hidden_act == "linear":
        notes.append("The connector is a single Linear layer, stored as LLaVA's two-layer projector with the "
                     "`linear` (identity) activation and an identity `linear_2`. transformers runs it exactly; "
                     "serving engines whose activation tables lack `linear` cannot load it.")
    write_model_card(out, config=model.config, fmt="llava-hf", source=src, eval_metrics=eval_metrics, notes=notes)
    return out
