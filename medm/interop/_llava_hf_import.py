"""`medm import llava-hf SRC OUT`: a transformers LLaVA checkpoint as a medm checkpoint (the mapping table is in
`medm.interop.llava_hf`'s docstring); the encoder and preprocessing lookups are shared with the other importers."""

from __future__ import annotations

import logging
from typing import Any

import torch

from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN
from medm.interop._grayscale import gray_patch_weight, is_grayscale_export, patch_embedding_key
from medm.interop._llava_hf_format import (
    _ACTIVATIONS,
    _LANGUAGE_MODEL,
    _LM_HEAD,
    _PROJ_1,
    _PROJ_2,
    _RESAMPLE_CODES,
    _VISION,
    DTYPE_NAMES,
    ImportFormatError,
    _assign,
    _on_meta,
    _rename,
    list_content_adapter,
    split_export_template,
)
from medm.interop._source import fit_vocabulary, write_model_yaml
from medm.registry import LLM, TEMPLATE, VISION

logger = logging.getLogger(__name__)


def from_llava_state_dict(state: dict[str, torch.Tensor], linear_connector: bool, llm_prefix: str = "model",
                          projector_bias: bool = True) -> dict[str, torch.Tensor]:
    """medm weights from `LlavaForConditionalGeneration` weights (the inverse of `to_llava_state_dict`).

    Args:
        linear_connector: the projector is a `linear` export (identity `linear_2`, checked, then dropped).
        projector_bias: False when the LLaVA projector has no biases; medm's MLP gets zero biases (same function).
    """
    state = dict(state)
    if linear_connector:
        w = state.pop("model.multi_modal_projector.linear_2.weight")
        b = state.pop("model.multi_modal_projector.linear_2.bias", None)
        if not torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype, device=w.device)) or (
                b is not None and bool(b.any())):
            raise ImportFormatError("projector_hidden_act 'linear' with a linear_2 that is not the identity: two "
                                    "stacked Linear layers, which medm's connectors do not hold")
    if not projector_bias:
        for layer in ("linear_1",) if linear_connector else ("linear_1", "linear_2"):
            w = state[f"model.multi_modal_projector.{layer}.weight"]
            state[f"model.multi_modal_projector.{layer}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    rules = [(dst, src) for src, dst in (_VISION, _PROJ_1, _PROJ_2, _LM_HEAD)]
    rules.insert(2, (_LANGUAGE_MODEL, f"llm.{llm_prefix}."))
    return _rename(state, rules, "LLaVA -> medm", ImportFormatError)


def _encoder_for(vision_config) -> str:
    """The registered medm encoder whose transformers config class is this vision_config's."""
    from medm.models.vision._hf import HFVisionEncoder  # defers transformers

    for name in VISION.names():
        cls = VISION.get(name)
        if isinstance(cls, type) and issubclass(cls, HFVisionEncoder) and cls.config_class is type(vision_config):
            return name
    raise ImportFormatError(f"vision_config model_type {vision_config.model_type!r}: no medm encoder wraps it "
                            "(medm holds transformers CLIP and SigLIP towers)")


def _preprocess_settings(image_processor, image_size: int, where: str) -> dict[str, Any]:
    """medm `vision` preprocessing keys from a transformers image processor (warns where medm differs)."""
    codes = {v: k for k, v in _RESAMPLE_CODES.items()}
    if image_processor is None:
        logger.warning("%s: no image processor; medm uses the encoder's default mean / std and squash resize", where)
        return {}
    resample = codes.get(int(getattr(image_processor, "resample", 3)))
    if resample is None:
        logger.warning("%s: resample %s is not one medm has (nearest, bilinear, bicubic); using bicubic", where,
                       image_processor.resample)
        resample = "bicubic"
    pad = bool(getattr(image_processor, "do_pad", False))
    size = dict(getattr(image_processor, "size", None) or {})
    crop = bool(getattr(image_processor, "do_center_crop", False))
    if crop or size.get("shortest_edge") is not None:
        logger.warning("%s: the image processor resizes the short side and centre-crops; medm resizes the whole "
                       "image to %d x %d (%s), so non-square images are framed differently", where, image_size,
                       image_size, "after padding to a square" if pad else "squash")
    elif (size.get("height"), size.get("width")) != (image_size, image_size):
        logger.warning("%s: the image processor resizes to %s, the encoder takes %d px; medm uses the encoder's",
                       where, size, image_size)
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    out = {"resize": "pad" if pad else "squash", "resample": resample}
    if mean is not None:
        out["image_mean"] = [float(x) for x in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)]
    if std is not None:
        out["image_std"] = [float(x) for x in (std if isinstance(std, (list, tuple)) else [std] * 3)]
    return out


def _renders(tokenizer, jinja: str) -> bool:
    """Does `jinja` render medm's string contents (image placeholder and text kept)?"""
    probe = [{"role": "user", "content": IMAGE_TOKEN + "\nmedm probe question"},
             {"role": "assistant", "content": "medm probe answer"}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=jinja, tokenize=False)
    except Exception:  # any template error means: not usable as is
        return False
    return text.count(IMAGE_TOKEN) == 1 and "medm probe question" in text and "medm probe answer" in text


def _chat_template(tokenizer, processor_template: str | None, where: str) -> tuple[str | None, str | None]:
    """(template for the medm tokenizer, default system prompt) from what the checkpoint ships."""
    for jinja in (getattr(tokenizer, "chat_template", None), processor_template):
        if isinstance(jinja, dict):
            jinja = jinja.get("default")
        if not jinja:
            continue
        own, system = split_export_template(jinja)
        if _renders(tokenizer, own):
            return own, system
        adapted = list_content_adapter(own)
        if _renders(tokenizer, adapted):
            return adapted, system
    return None, None


def import_llava_hf(src: str, out: str, *, family: str | None = None, template: str | None = None,
                    system_prompt: str | None = None, dtype: str | None = None) -> str:
    """`medm import llava-hf SRC OUT`: a medm checkpoint (config, weights, tokenizer, README.md) from a transformers
    LLaVA directory, ready for `stage.init_from` or `medm infer`.

    Args:
        family: medm LLM family (LoRA targets); default: the text config's `model_type` when medm registers it,
            else `auto`.
        template: registered medm chat template; default: the checkpoint's own (tokenizer, else processor).
        system_prompt: default system prompt; default: the one a medm export recorded, else none.
        dtype: weights dtype; default: as stored.

    Raises:
        ImportFormatError: a setting medm cannot represent (multi-layer features, SigLIP with the `default`
            strategy, a projector activation medm lacks, an unknown vision tower), naming it.
    """
    from transformers import (  # defers transformers
        AutoConfig,
        AutoProcessor,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from medm.interop.model_card import write_model_card  # defers transformers
    from medm.models.builder import add_media_tokens, save_model  # defers transformers
    from medm.models.configuration_medm import MedMConfig  # defers transformers
    from medm.models.llm import resolve_dtype  # defers transformers
    from medm.models.modeling_medm import MedMForConditionalGeneration, register_auto_classes  # defers transformers

    cfg = AutoConfig.from_pretrained(src, trust_remote_code=False)
    if not isinstance(cfg, LlavaConfig):
        raise ImportFormatError(f"{src}: config.json has model_type {cfg.model_type!r}; `medm import llava-hf` reads "
                                "transformers LLaVA checkpoints (model_type 'llava')")
    enc_name = _encoder_for(cfg.vision_config)
    enc_cls = VISION.get(enc_name)
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ImportFormatError(f"{src}: vision_feature_layer {layer!r} concatenates several layers; medm encoders "
                                "select one (select_layer)")
    strategy = cfg.vision_feature_select_strategy
    if strategy == "default":
        # LLaVA drops the first token: the CLS of a CLIP tower, the top-left patch of a SigLIP one (no CLS).
        select_feature = "patch" if enc_cls.num_cls_tokens == 1 else "skip_first"
    else:
        select_feature = "patch" if enc_cls.num_cls_tokens == 0 else "cls_patch"
    act = cfg.projector_hidden_act
    inverse_acts = {v: k for k, v in _ACTIVATIONS.items()}
    if act != "linear" and act not in inverse_acts:
        raise ImportFormatError(f"{src}: projector_hidden_act {act!r} is not one medm's MLP has "
                                f"({', '.join(inverse_acts)}, or linear)")
    connector_type = "linear" if act == "linear" else f"mlp2x_{inverse_acts[act]}"

    try:
        processor = AutoProcessor.from_pretrained(src, backend="pil", trust_remote_code=False)
        tokenizer = processor.tokenizer
        image_processor = getattr(processor, "image_processor", None)
        processor_template = getattr(processor, "chat_template", None)
    except (OSError, ValueError, TypeError, KeyError):
        processor, image_processor, processor_template = None, None, None
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    if template is not None:
        TEMPLATE.get(template)
        jinja, saved_system = None, None
    else:
        jinja, saved_system = _chat_template(tokenizer, processor_template, src)
        if jinja is None:
            raise ImportFormatError(f"{src}: no chat template that renders medm conversations (the tokenizer's and "
                                    f"the processor's were tried); pass --template ({', '.join(TEMPLATE.names())})")
        tokenizer.chat_template = jinja
    add_media_tokens(tokenizer)

    llava = LlavaForConditionalGeneration.from_pretrained(src, dtype=resolve_dtype(dtype) if dtype else "auto")
    text_config = llava.config.text_config
    vision = {"name": enc_name,
              "config": {k: v for k, v in cfg.vision_config.to_diff_dict().items() if k != "transformers_version"},
              "select_layer": layer, "select_feature": select_feature,
              **_preprocess_settings(image_processor, cfg.vision_config.image_size, src)}

    patch = llava.model.vision_tower.get_input_embeddings().weight
    grayscale = is_grayscale_export(patch, vision.get("image_mean"), vision.get("image_std"))
    if grayscale:  # a medm grayscale tower exported as RGB (equal channel weights, one mean / std): back to 1 channel
        vision["config"]["num_channels"] = 1
        vision["image_mean"], vision["image_std"] = vision["image_mean"][:1], vision["image_std"][:1]
    fam = family or (text_config.model_type if text_config.model_type in LLM.names() else "auto")
    llm_settings = {"family": fam, "path": None, "dtype": DTYPE_NAMES.get(llava.dtype, "float32"),
                    "attn_implementation": "sdpa", "trust_remote_code": False,
                    "lora_target_modules": LLM.get(fam).lora_target_modules}
    register_auto_classes()
    config = MedMConfig(text_config=text_config, llm=llm_settings, vision=vision,
                        connector={"name": "mlp", "type": connector_type}, template=template,
                        system_prompt=system_prompt if system_prompt is not None else saved_system,
                        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                        image3d_token_id=tokenizer.convert_tokens_to_ids(IMAGE3D_TOKEN))
    model = _on_meta(lambda: MedMForConditionalGeneration(config))
    state = from_llava_state_dict(llava.state_dict(), connector_type == "linear", model.llm.base_model_prefix,
                                  cfg.multimodal_projector_bias)
    if grayscale:
        key = patch_embedding_key(model.vision.model, "vision.model.")
        state[key] = gray_patch_weight(state[key])
    _assign(model, state, f"{src} -> medm")
    if getattr(text_config, "tie_word_embeddings", False):
        model.llm.tie_weights()
    fit_vocabulary(model, tokenizer, src)
    save_model(model.eval(), tokenizer, out)
    model_yaml = write_model_yaml(model.config, out)
    write_model_card(out, config=model.config, fmt="full", source=src, notes=[
        f"Imported from the transformers LLaVA checkpoint `{src}` with `medm import llava-hf`.",
        f"Train on from these weights: `medm train TRAIN.yaml model={model_yaml} stage.init_from={out}`."])
    return out
