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

import json
import logging
import os
import re
from typing import Any

import torch
from torch import nn

from medm.models.builder import IMAGE3D_TOKEN, IMAGE_TOKEN

logger = logging.getLogger(__name__)

# medm resample names <-> PIL resampling codes (what transformers' image processors store).
_RESAMPLE_CODES = {"nearest": 0, "bilinear": 2, "bicubic": 3}
# medm MLP activations (medm.models.connectors._mlp) <-> transformers ACT2FN names computing the same function.
_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu"}
MODEL_YAML = "model.yaml"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Prefix renames medm -> LLaVA; `{llm}` is the LLM's `base_model_prefix`.
_VISION = ("vision.model.", "model.vision_tower.")
_PROJ_1 = ("connector.mlp.0.", "model.multi_modal_projector.linear_1.")
_PROJ_2 = ("connector.mlp.2.", "model.multi_modal_projector.linear_2.")
_LM_HEAD = ("llm.lm_head.", "lm_head.")
_LANGUAGE_MODEL = "model.language_model."


class ExportError(ValueError):
    """A medm model part that transformers' LLaVA format cannot hold; the message says which part and why."""


class ImportFormatError(ValueError):
    """A transformers checkpoint that medm cannot open as a medm model; the message says which setting and why."""


# ---- chat templates -------------------------------------------------------------------------------------------
_EXPORT_BEGIN = "{#- medm export: contents may be strings or lists of {type: image | text} parts -#}\n"
_EXPORT_END = "{#- medm export: the model's own template follows -#}\n"
# Turns list contents (what `processor.apply_chat_template` users write) into medm's strings: an image part is
# "<image>\n", as in LLaVA records; then adds the model's default system prompt where the chat has none.
_EXPORT_BODY = """\
{%- set _medm = namespace(messages=[]) -%}
{%- for _m in messages -%}
{%- if _m['content'] is string or _m['content'] is none -%}{%- set _c = _m['content'] -%}
{%- else -%}{%- set _t = namespace(text='') -%}
{%- for _p in _m['content'] -%}
{%- if _p['type'] == 'image' -%}{%- set _t.text = _t.text + IMAGE_PART -%}
{%- elif _p['type'] == 'text' -%}{%- set _t.text = _t.text + _p['text'] -%}{%- endif -%}
{%- endfor -%}{%- set _c = _t.text -%}
{%- endif -%}
{%- set _medm.messages = _medm.messages + [{'role': _m['role'], 'content': _c}] -%}
{%- endfor -%}
{%- if _medm_system is not none and (not _medm.messages or _medm.messages[0]['role'] != 'system') -%}
{%- set _medm.messages = [{'role': 'system', 'content': _medm_system}] + _medm.messages -%}
{%- endif -%}
{%- set messages = _medm.messages -%}
"""
_SYSTEM_LINE = re.compile(r"\{%- set _medm_system = (.*) -%\}\n")

# The reverse, for templates that read only list contents (llava-hf's own): a medm string "<image>\nq" becomes
# [{type: image}, {type: text, text: q}] (one newline after an image belongs to the placeholder, as above).
_LIST_ADAPTER = """\
{#- medm import: string contents become lists of {type: image | text} parts -#}
{%- set _medm = namespace(messages=[]) -%}
{%- for _m in messages -%}
{%- if _m['content'] is string -%}{%- set _t = namespace(items=[]) -%}
{%- for _s in _m['content'].split(IMAGE) -%}
{%- if not loop.first -%}{%- set _t.items = _t.items + [{'type': 'image'}] -%}{%- endif -%}
{%- set _s = _s[1:] if (not loop.first and _s.startswith('\\n')) else _s -%}
{%- if _s -%}{%- set _t.items = _t.items + [{'type': 'text', 'text': _s}] -%}{%- endif -%}
{%- endfor -%}
{%- set _medm.messages = _medm.messages + [{'role': _m['role'], 'content': _t.items}] -%}
{%- else -%}{%- set _medm.messages = _medm.messages + [_m] -%}{%- endif -%}
{%- endfor -%}
{%- set messages = _medm.messages -%}
"""


def _jinja_str(value: str | None) -> str:
    # JSON string escapes are a subset of what jinja string literals accept.
    return "none" if value is None else json.dumps(value)


def export_chat_template(jinja: str, system_prompt: str | None) -> str:
    """The model's chat template, taking string or list contents and adding its default system prompt.

    Idempotent: a template this function wrote is unwrapped first, so export -> import -> export does not nest.
    """
    jinja, _ = split_export_template(jinja)
    return (_EXPORT_BEGIN + "{%- set _medm_system = " + _jinja_str(system_prompt) + " -%}\n"
            + _EXPORT_BODY.replace("IMAGE_PART", _jinja_str(IMAGE_TOKEN + "\n")) + _EXPORT_END + jinja)


def split_export_template(jinja: str) -> tuple[str, str | None]:
    """(the model's own template, its default system prompt) from an `export_chat_template` result; other
    templates come back unchanged with None."""
    if not jinja.startswith(_EXPORT_BEGIN) or _EXPORT_END not in jinja:
        return jinja, None
    head, own = jinja.split(_EXPORT_END, 1)
    m = _SYSTEM_LINE.search(head)
    system = json.loads(m.group(1)) if m and m.group(1) != "none" else None
    return own, system


def list_content_adapter(jinja: str) -> str:
    """Wrap a template that reads only list contents so it renders medm's string contents."""
    return _LIST_ADAPTER.replace("IMAGE", _jinja_str(IMAGE_TOKEN)) + jinja


# ---- what LLaVA can hold --------------------------------------------------------------------------------------
def _vision_class(config):
    from medm.models.vision._hf import HFVisionEncoder
    from medm.registry import VISION

    name = config.vision["name"]
    cls = VISION.get(name)
    if not (isinstance(cls, type) and issubclass(cls, HFVisionEncoder)):
        raise ExportError(f"vision encoder {name!r} ({getattr(cls, '__name__', cls)}) is not a transformers vision "
                          "model; LLaVA builds its vision_tower with AutoModel from a transformers vision_config, so "
                          "only HF CLIP / SigLIP towers (vision.name: clip, siglip) export")
    return cls


def _projector(config) -> tuple[int, str]:
    """(MLP depth, LLaVA projector_hidden_act) of the 2D connector, or ExportError."""
    from medm.models.connectors._mlp import parse_mlp_type
    from medm.models.connectors.mlp import MLPConnector
    from medm.registry import CONNECTOR

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
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

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
    from transformers import LlavaConfig

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
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

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


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], what: str,
            error: type[ValueError]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for src, dst in rules:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            raise error(f"{what}: weight {k!r} has no place in the other format")
    return out


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
        from medm.interop._grayscale import patch_embedding_key, rgb_patch_weight

        key = patch_embedding_key(model.vision.model, _VISION[1])
        state[key] = rgb_patch_weight(state[key])
    if depth == 1:
        w = state["model.multi_modal_projector.linear_1.weight"]
        d = w.shape[0]
        state["model.multi_modal_projector.linear_2.weight"] = torch.eye(d, dtype=w.dtype, device=w.device)
        state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(d, dtype=w.dtype, device=w.device)
    return state


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


# ---- processor ------------------------------------------------------------------------------------------------
def _chat_format(config, tokenizer):
    from medm.data.templates import ChatFormat, TemplateError

    try:
        return ChatFormat(tokenizer, config.template, config.system_prompt)
    except TemplateError as e:
        raise ExportError(f"chat template: {e}") from None


def llava_processor(config, tokenizer, num_image_tokens: int):
    """A `LlavaProcessor` that preprocesses images as medm does and expands `<image>` to the connector's count.

    The tokenizer is copied; the copy's chat template becomes `export_chat_template` of the model's template.
    """
    import copy

    from transformers import LlavaImageProcessor, LlavaProcessor

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
    from transformers import GenerationConfig

    fmt = _chat_format(config, tokenizer)
    stop = sorted({i for i in (tokenizer.eos_token_id, fmt.end_of_turn_id) if i is not None})
    media = sorted(i for i in (config.image_token_id, config.image3d_token_id) if i is not None)
    return GenerationConfig(eos_token_id=stop if len(stop) > 1 else stop[0], pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, suppress_tokens=media or None, do_sample=False)


def _on_meta(build):
    """Build a module with parameters on the meta device: no random init, no memory until weights are assigned."""
    with torch.device("meta"):
        return build()


def _assign(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{what}: missing weights {missing[:3]}, unexpected {unexpected[:3]}")


# ---- export ---------------------------------------------------------------------------------------------------
def to_llava(model, tokenizer):
    """(LlavaForConditionalGeneration sharing the medm model's weights, LlavaProcessor)."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava_config(model.config, model.num_image_tokens)
    cfg.dtype = _DTYPE_NAMES.get(model.dtype, "float32")
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
    from transformers import AutoConfig

    from medm.interop.model_card import write_model_card
    from medm.models.configuration_medm import MedMConfig
    from medm.models.modeling_medm import register_auto_classes
    from medm.train.checkpoint import load_trained

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


# ---- import ---------------------------------------------------------------------------------------------------
def _encoder_for(vision_config) -> str:
    """The registered medm encoder whose transformers config class is this vision_config's."""
    from medm.models.vision._hf import HFVisionEncoder
    from medm.registry import VISION

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
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    from medm.interop.model_card import write_model_card
    from medm.models.builder import add_media_tokens, save_model
    from medm.models.configuration_medm import MedMConfig
    from medm.models.llm import resolve_dtype
    from medm.models.modeling_medm import MedMForConditionalGeneration, register_auto_classes
    from medm.registry import LLM, TEMPLATE, VISION

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
    from medm.interop._grayscale import gray_patch_weight, is_grayscale_export, patch_embedding_key

    patch = llava.model.vision_tower.get_input_embeddings().weight
    grayscale = is_grayscale_export(patch, vision.get("image_mean"), vision.get("image_std"))
    if grayscale:  # a medm grayscale tower exported as RGB (equal channel weights, one mean / std): back to 1 channel
        vision["config"]["num_channels"] = 1
        vision["image_mean"], vision["image_std"] = vision["image_mean"][:1], vision["image_std"][:1]
    fam = family or (text_config.model_type if text_config.model_type in LLM.names() else "auto")
    llm_settings = {"family": fam, "path": None, "dtype": _DTYPE_NAMES.get(llava.dtype, "float32"),
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
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        model.llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    elif len(tokenizer) < rows:
        # Embedding rows past the vocabulary (padding to a multiple of 64, ...) get placeholder tokens, so
        # `model.yaml`, which sizes the vocabulary from the tokenizer, rebuilds exactly these shapes.
        n = rows - len(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": [f"<|medm_unused_{i}|>" for i in range(n)]},
                                     replace_extra_special_tokens=False)
        logger.info("%s: %d embedding rows have no token; added <|medm_unused_0..%d|> for them", src, n, n - 1)
    save_model(model.eval(), tokenizer, out)
    model_yaml = write_model_yaml(model.config, out)
    write_model_card(out, config=model.config, fmt="full", source=src, notes=[
        f"Imported from the transformers LLaVA checkpoint `{src}` with `medm import llava-hf`.",
        f"Train on from these weights: `medm train TRAIN.yaml model={model_yaml} stage.init_from={out}`."])
    return out


def write_model_yaml(config, out: str) -> str:
    """`OUT/model.yaml`: the model config that `medm train` builds this checkpoint's architecture from (its
    weights then come from `stage.init_from=OUT`)."""
    import yaml

    text = {k: v for k, v in config.text_config.to_diff_dict().items()
            if k not in ("transformers_version", "architectures", "dtype", "_name_or_path")}
    text["model_type"] = config.text_config.model_type
    llm = config.llm
    cfg = {"llm": {"family": llm["family"], "config": text, "tokenizer": os.path.abspath(out), "dtype": llm["dtype"],
                   "attn_implementation": llm.get("attn_implementation", "sdpa")},
           "vision": dict(config.vision), "connector": dict(config.connector), "template": config.template,
           "system_prompt": config.system_prompt}
    path = os.path.join(out, MODEL_YAML)
    with open(path, "w") as f:
        f.write("# The architecture of the medm checkpoint in this directory; continue training from its weights:\n"
                f"#   medm train TRAIN.yaml model={path} stage.init_from={os.path.abspath(out)}\n")
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path
