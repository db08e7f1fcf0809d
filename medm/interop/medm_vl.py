"""MedM-VL checkpoints (`LVLMForConditionalGeneration`, github.com/MSIIP/MedM-VL) as medm checkpoints.

    medm import medm-vl /models/MedM-VL-2D-3B-en runs/medm-vl-2d
    medm import medm-vl /models/MedM-VL-CT-Chest-3B-en runs/ct-chest --image3d-slices 32

A MedM-VL directory is what the HF Trainer saved (LoRA is merged before saving): `config.json`, safetensors (one file
or shards with an index) or `pytorch_model.bin`, and the tokenizer. Both config formats are read: the current one
(`model_type: lvlm`, keys `lvlm_llm_type`, `lvlm_encoder_image_name_or_path`, ...) names the base models, whose
configs then come from `--llm-path` / `--encoder-path` / `--encoder3d-path` (or the names, where they resolve); the
released models' format (the same keys without `lvlm_`) carries them as `llm_config`, `encoder_image_config`,
`encoder_image3d_config`.

What maps, exactly (weights are copied unchanged):

| MedM-VL                                            | medm                                                        |
|----------------------------------------------------|-------------------------------------------------------------|
| `llm.*` (any HF causal LM; `lm_head` may be tied)   | `llm.*`                                                     |
| `encoder_image.encoder.*` (HF SigLIP / CLIP, 4.x    | `vision.model.*` (transformers' own 4.x -> 5.x renaming);   |
| `vision_model.*` names)                            | `select_layer`, `select_feature` as is                      |
| `select_feature` patch on SigLIP (drops a patch)   | `select_feature` skip_first                                 |
| `connector_image` `mlp` (`connector.{0,2}`)        | `connector` `mlp` (`mlp.{0,2}`)                             |
| `connector_image` `attn_pooling` (`query`,         | `attention_pool`, `layout: medm-vl`, 8 heads, the same      |
| `attn.*`, `connector.*`)                           | names; `num_queries` from `query`                           |
| `connector_image3d` `spatial_pooling` (2x average  | `spatial_pool` (`avg`, stride 2, `uneven: floor`; `mlp.*`)  |
| pooling of the 3D grid, then `connector.*`)        |                                                             |
| `encoder_image3d` `m3dclip` / `medmclip`           | `vit3d` (`checkpoint_format: m3d` / `medm-clip-ct`)         |
| volumes through `encoder_image` (CT-Chest)         | `--image3d-slices N`: `vision3d: slices` + `connector3d`,   |
| (HU clipped since b1b0770; as stored at 193feb7)   | `medm_vl_ct: hu / stored` (`--ct-intensity`)                |
| conv_version `qwen2` prompt, EOS `<|im_end|>`      | template `medm-vl` with the tokenizer's EOS                 |
| `lm_head` re-initialised apart from the embeddings | `tie_word_embeddings: false`                                |
| image token id -200                                | the `<image>` / `<image3d>` special tokens, expanded        |

MedM-VL's `patch` feature selection drops the first token; SigLIP has no CLS token, so there it drops a patch:
medm's `select_feature: skip_first` (the released models use `cls_patch`: every token).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from medm.data._medm_vl_ct import MEDM_VL_CT
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
from medm.interop.llava_hf import ImportFormatError, _preprocess_settings
from medm.registry import TEMPLATE, VISION

logger = logging.getLogger(__name__)

# MedM-VL encoder types -> medm encoders.
ENCODERS_2D = {"siglip": "siglip", "clip": "clip"}
ENCODERS_3D = {"m3dclip": "m3d", "medmclip": "medm-clip-ct"}  # -> vit3d checkpoint_format
CONNECTORS = ("mlp", "attn_pooling", "spatial_pooling")
# MedM-VL's AttnPooling hard-codes 8 heads (its query count, 256, is read from the `query` weight).
ATTN_POOL_HEADS = 8
# The option giving each base model a checkpoint may only name.
_OPTION = {"llm": "llm-path", "encoder_image": "encoder-path", "encoder_image3d": "encoder3d-path"}
# Every 3D route (slices, m3dclip, medmclip) reads MedM-VL's CT .npy volumes with MedM-VL's own dataset and processor
# steps (`medm_vl_ct`, medm.data._medm_vl_ct; see docs/migrating.md for raw NIfTI / DICOM), by MedM-VL version:
_CT_NOTE = {"hu": "HU clipped to -1000..1000 and scaled to 0..255, as MedM-VL b1b0770 and later",
            "stored": "the stored values as they are, as MedM-VL 193feb7 (the release era)"}


def read_settings(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The MedM-VL settings of a config.json, in either format, under the unprefixed names (`llm_type`, ...)."""
    model_type = cfg.get("model_type")
    if model_type not in (None, "lvlm"):
        hint = "; use `medm import tinyllava`" if model_type == "tinyllava" else ""
        raise ImportFormatError(f"{where}: model_type {model_type!r} is not a MedM-VL checkpoint (model_type lvlm, "
                                f"or none in the released models){hint}")
    out = {(k[len("lvlm_"):] if k.startswith("lvlm_") else k): v for k, v in cfg.items()}
    if not out.get("llm_type"):
        raise ImportFormatError(f"{where}: no llm_type / lvlm_llm_type; not a MedM-VL config")
    return out


def _section_config(settings: dict[str, Any], part: str, path: str | None, where: str) -> dict[str, Any]:
    """The base config of `part` (llm, encoder_image, encoder_image3d): nested in the checkpoint's config, else read
    from `path` (a --*-path option) or the name the checkpoint recorded."""
    nested = settings.get(f"{part}_config")
    if isinstance(nested, dict) and nested:
        return nested
    source = path or settings.get(f"{part}_name_or_path")
    if not source:
        raise ImportFormatError(f"{where}: the checkpoint carries no {part} config and names no base model; pass "
                                f"--{_OPTION[part]}")
    return config_json(source, f"{where}: {part} config ({source}; override with --{_OPTION[part]})")



def encoder_2d(kind: str, config: dict[str, Any], select_layer: Any, select_feature: Any,
               processor_source: str | None, where: str) -> dict[str, Any]:
    """The medm `vision` section of a MedM-VL 2D encoder (HF SigLIP or CLIP)."""
    if kind not in ENCODERS_2D:
        raise ImportFormatError(f"{where}: encoder type {kind!r}; medm imports MedM-VL's {', '.join(ENCODERS_2D)} "
                                f"2D encoders and {', '.join(ENCODERS_3D)} 3D encoders")
    name = ENCODERS_2D[kind]
    cls = VISION.get(name)
    vcfg = hf_config(config, f"{where}: encoder config", vision=True)
    if type(vcfg) is not cls.config_class:
        raise ImportFormatError(f"{where}: encoder type {kind!r} with a {type(vcfg).__name__} config")
    if not isinstance(select_layer, int) or select_feature not in ("patch", "cls_patch"):
        raise ImportFormatError(f"{where}: encoder select_layer {select_layer!r} / select_feature {select_feature!r}; "
                                "expected an integer layer and patch or cls_patch")
    if select_feature == "patch" and cls.num_cls_tokens == 0:
        select_feature = "skip_first"  # MedM-VL's `patch` drops the first token: on SigLIP (no CLS), a patch
    section = {"name": name, "config": config_dict(vcfg), "select_layer": select_layer,
               "select_feature": select_feature}
    processor = image_processor(processor_source, where)
    if processor is None:
        logger.warning("%s: no image processor found (pass --encoder-path with the base encoder's "
                       "preprocessor_config.json); using %s's default mean / std and a squash resize", where, name)
    else:
        section.update(_preprocess_settings(processor, vcfg.image_size, where))
    return section


def encoder_3d(kind: str, config: dict[str, Any], select_layer: Any, select_feature: Any,
               where: str) -> dict[str, Any]:
    """The medm `vision3d` section (`vit3d`) of a MedM-VL 3D CLIP encoder."""
    from medm.models.vision.vit3d import FORMAT_SWITCHES  # defers transformers

    if kind not in ENCODERS_3D:
        raise ImportFormatError(f"{where}: 3D encoder type {kind!r}; medm imports {', '.join(ENCODERS_3D)}")
    fmt = ENCODERS_3D[kind]
    try:
        if fmt == "m3d":
            geometry = {"image_size": list(config["img_size"]), "patch_size": list(config["patch_size"]),
                        "in_channels": int(config.get("in_channels", 1)), "hidden_size": config["hidden_size"],
                        "num_layers": config["num_layers"], "num_heads": config["num_heads"],
                        "mlp_dim": config["mlp_dim"]}
        else:  # MedM-VL lists image_size / patch_size (D, H, W); MedM-CLIP-CT's own config has them apart
            size, patch = config["image_size"], config.get("patch_size")
            if not isinstance(size, list):
                size = [config["frame_size"], size, size]
            if not isinstance(patch, list):
                patch = [config["frame_patch_size"], config["image_patch_size"], config["image_patch_size"]]
            geometry = {"image_size": size, "patch_size": patch, "in_channels": 1,
                        "hidden_size": config["hidden_size"], "num_layers": config["image_num_layers"],
                        "num_heads": config["image_num_heads"], "mlp_dim": config["image_mlp_dim"]}
    except KeyError as e:
        raise ImportFormatError(f"{where}: the {kind} config lacks {e.args[0]!r}") from None
    if not isinstance(select_layer, int) or select_feature not in ("patch", "cls_patch"):
        raise ImportFormatError(f"{where}: 3D encoder select_layer {select_layer!r} / select_feature "
                                f"{select_feature!r}; expected an integer layer and patch or cls_patch")
    return {"name": "vit3d", **geometry, **FORMAT_SWITCHES[fmt], "checkpoint_format": fmt,
            "select_layer": select_layer, "select_feature": select_feature, "volume": {}}


def check_connector(kind: Any, mlp_type: Any, where: str) -> None:
    """A MedM-VL connector type and MLP name medm can hold, or ImportFormatError."""
    from medm.models.connectors._mlp import parse_mlp_type  # defers transformers

    if kind not in CONNECTORS:
        raise ImportFormatError(f"{where}: connector type {kind!r}; medm imports {', '.join(CONNECTORS)}")
    try:
        parse_mlp_type(mlp_type)
    except (ValueError, TypeError) as e:
        raise ImportFormatError(f"{where}: connector name {mlp_type!r}: {e}") from None


def connector(projector: str, mlp_type: str, src: str, dst: str, state: dict[str, torch.Tensor],
              where: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """(medm connector section, weight prefix renames) of a MedM-VL connector under prefix `src`."""
    check_connector(projector, mlp_type, where)
    if projector == "mlp":
        return {"name": "mlp", "type": mlp_type}, [(f"{src}.connector.", f"{dst}.mlp.")]
    if projector == "spatial_pooling":
        return ({"name": "spatial_pool", "pool": "avg", "stride": 2, "mlp_type": mlp_type, "uneven": "floor"},
                [(f"{src}.connector.", f"{dst}.mlp.")])
    query = state.get(f"{src}.query")
    if query is None or query.ndim != 2:
        raise ImportFormatError(f"{where}: an attn_pooling connector without its {src}.query weight")
    # medm's medm-vl layout uses AttnPooling's own names: only the prefix changes.
    return ({"name": "attention_pool", "layout": "medm-vl", "num_queries": int(query.shape[0]),
             "num_heads": ATTN_POOL_HEADS, "mlp_type": mlp_type}, [(f"{src}.", f"{dst}.")])


def _vit3d_weights(section: dict[str, Any], state: dict[str, torch.Tensor], weights: WeightMap) -> None:
    """`encoder_image3d.encoder.*` (a whole 3D CLIP: vision tower, text tower, projections) -> `vision3d.*`."""
    prefix = "encoder_image3d.encoder."
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    with torch.device("meta"):
        vit = VISION.build("vit3d", **{k: v for k, v in section.items() if k != "name"})
    for key, tensor in sub.items():
        converted, _ = vit.convert_checkpoint({key: tensor})  # one key at a time: source name -> medm name
        if converted:
            (name, value), = converted.items()
            weights.add(prefix + key, "vision3d." + name, value)
        else:
            weights.unused[prefix + key] = "the 3D CLIP's text tower, projections and final norm (unused by the LVLM)"


def import_medm_vl(src: str, out: str, *, llm_path: str | None = None, encoder_path: str | None = None,
                   encoder3d_path: str | None = None, image3d_slices: int | None = None,
                   ct_intensity: str | None = None, family: str | None = None, template: str | None = None,
                   system_prompt: str | None = None, dtype: str | None = None) -> str:
    """`medm import medm-vl SRC OUT`: a medm checkpoint (config, weights, tokenizer, model.yaml, README.md) that
    answers MedM-VL's prompts as the MedM-VL model does.

    Args:
        llm_path, encoder_path, encoder3d_path: base model directories (or hub ids) for the configs, tokenizer and
            image processor the checkpoint does not carry.
        image3d_slices: MedM-VL runs volumes through its 2D encoder slice by slice (MedM-VL-CT-Chest, 32 slices):
            the imported model then has that encoder and connector as its 3D tower (`vision3d: slices`), reading
            `<image3d>` volumes of this many slices, and no 2D tower.
        ct_intensity: for volumes, how the checkpoint's MedM-VL version read its CT `.npy` volumes
            (reproduced by `medm.data._medm_vl_ct`): `hu` (b1b0770 and later: HU clipped to -1000..1000 and scaled
            to 0..255) or `stored` (193feb7, the release era: the stored values, uint8 for CT-Chest). The same
            for the 3D encoders (m3dclip, medmclip), whose processor steps follow. Default from the checkpoint's
            config.json: `hu` for the current format (`lvlm_` keys, introduced by b1b0770 with the clipping),
            `stored` for the released models' format.
        family, template, system_prompt, dtype: as `medm import llava-hf`; template default `medm-vl`.

    Raises:
        ImportFormatError: a setting or weight medm cannot represent, naming it.
    """
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
        raise ImportFormatError(f"{src}: no config.json; not a MedM-VL checkpoint directory")
    raw = read_json(cfg_path)
    s = read_settings(raw, src)
    if ct_intensity is None:
        ct_intensity = "hu" if any(k.startswith("lvlm_") for k in raw) else "stored"
    elif ct_intensity not in MEDM_VL_CT:
        raise ImportFormatError(f"--ct-intensity must be one of {', '.join(MEDM_VL_CT)}, got {ct_intensity!r}")
    if template is not None:
        TEMPLATE.get(template)
    text_config = hf_config(_section_config(s, "llm", llm_path, src), f"{src}: LLM config")
    if s.get("hidden_size") not in (None, text_config.hidden_size):
        raise ImportFormatError(f"{src}: hidden_size {s['hidden_size']} differs from the LLM config's "
                                f"{text_config.hidden_size}")
    # Every setting is checked before the weights (gigabytes) are read.
    enc2d = enc3d = None
    if image3d_slices is not None and (not isinstance(image3d_slices, int) or image3d_slices < 1):
        raise ImportFormatError(f"--image3d-slices must be a positive integer, got {image3d_slices!r}")
    if s.get("encoder_image_type"):
        enc2d = encoder_2d(s["encoder_image_type"], _section_config(s, "encoder_image", encoder_path, src),
                           s.get("encoder_image_select_layer"), s.get("encoder_image_select_feature"),
                           encoder_path or s.get("encoder_image_name_or_path"), src)
        check_connector(s.get("connector_image_type"), s.get("connector_image_name"), src)
    elif image3d_slices:
        raise ImportFormatError(f"{src}: --image3d-slices needs a 2D encoder (encoder_image_type), which this "
                                "checkpoint has not")
    if s.get("encoder_image3d_type"):
        if image3d_slices:
            raise ImportFormatError(f"{src}: the checkpoint has its own 3D encoder ({s['encoder_image3d_type']}); "
                                    "--image3d-slices would give the model two 3D towers")
        enc3d = encoder_3d(s["encoder_image3d_type"], _section_config(s, "encoder_image3d", encoder3d_path, src),
                           s.get("encoder_image3d_select_layer"), s.get("encoder_image3d_select_feature"), src)
        check_connector(s.get("connector_image3d_type"), s.get("connector_image3d_name"), src)
    if enc2d is None and enc3d is None:
        raise ImportFormatError(f"{src}: neither encoder_image_type nor encoder_image3d_type; nothing to see with")

    state = load_weights(src)
    rules = [("llm.", "llm.")]
    weights = WeightMap()
    vision = conn = vision3d = conn3d = None
    notes = []
    if enc2d is not None:
        slot = "connector3d" if image3d_slices else "connector"
        c_section, c_rules = connector(s["connector_image_type"], s["connector_image_name"], "connector_image", slot,
                                       state, src)
        rules += c_rules
        if image3d_slices:
            vision3d = {"name": "slices", "encoder": enc2d, "num_slices": image3d_slices, "volume": {},
                        "medm_vl_ct": ct_intensity}
            conn3d = c_section
            rules.append(("encoder_image.encoder.", "vision3d.encoder.model."))
            notes.append(f"MedM-VL ran volumes through its 2D encoder: here `vision3d: slices` ({image3d_slices} "
                         f"slices), reading MedM-VL's CT .npy volumes with its own steps (`medm_vl_ct: "
                         f"{ct_intensity}`: {_CT_NOTE[ct_intensity]}); see docs/migrating.md for raw CT.")
        else:
            vision, conn = enc2d, c_section
            rules.append(("encoder_image.encoder.", "vision.model."))
    if enc3d is not None:
        vision3d = {**enc3d, "medm_vl_ct": ct_intensity}
        conn3d, c_rules = connector(s["connector_image3d_type"], s["connector_image3d_name"], "connector_image3d",
                                    "connector3d", state, src)
        rules += c_rules
        _vit3d_weights(vision3d, state, weights)
        state = {k: v for k, v in state.items() if not k.startswith("encoder_image3d.encoder.")}
        notes.append(f"Volumes are read with MedM-VL's own {s['encoder_image3d_type']} steps (`medm_vl_ct: "
                     f"{ct_intensity}`: {_CT_NOTE[ct_intensity]}); see docs/migrating.md for raw CT.")
    rename(state, rules, src, weights)
    if enc2d is not None:  # transformers 4.x CLIP / SigLIP names (`encoder.vision_model.*`), as MedM-VL saves them

        hf_legacy_names(weights, "vision3d.encoder.model." if image3d_slices else "vision.model.",
                        VISION.get(enc2d["name"]).model_class)
    tokenizer = load_tokenizer([src, llm_path, s.get("llm_name_or_path")], src)
    spec = ImportSpec(text_config=text_config, vision=vision, connector=conn, vision3d=vision3d, connector3d=conn3d,
                      template=template or "medm-vl", tokenizer=tokenizer, weights=weights)
    return write_medm_checkpoint(spec, src, out, fmt="medm-vl", family=family, system_prompt=system_prompt,
                                 dtype=dtype, notes=notes)
