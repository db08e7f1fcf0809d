"""What the importers of other codebases' checkpoints share (`medm import medm-vl | tinyllava`): reading their weights
and the base models' configs, renaming weights with a full account of every key, and writing the medm checkpoint.

Weights are read from `model.safetensors`, `pytorch_model.bin`, or either one sharded with its `*.index.json`;
`.bin` files go through `torch.load(weights_only=True)`, so no pickled code runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN
from medm.interop._llava_hf_format import DTYPE_NAMES, MODEL_YAML, ImportFormatError
from medm.registry import LLM, TEMPLATE, VISION

logger = logging.getLogger(__name__)

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")
# Keys a config dict carries that are not architecture (or that transformers writes itself).
_NOT_ARCHITECTURE = ("transformers_version", "_name_or_path", "architectures", "model_name_or_path",
                     "model_name_or_path2", "auto_map", "torch_dtype", "dtype", "_attn_implementation_autoset")


# ---- reading --------------------------------------------------------------------------------------------------
def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ImportFormatError(f"{path}: not valid JSON ({e})") from None


def _load_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImportFormatError(f"{path}: not a state dict of tensors")
    return state


def load_weights(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: one file, or the shards its index names.

    Raises:
        FileNotFoundError: the directory holds none of model.safetensors, pytorch_model.bin or their indexes.
    """
    for name in _INDEXES:
        index = os.path.join(directory, name)
        if os.path.isfile(index):
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise ImportFormatError(f"{index}: an index with an empty weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_file(os.path.join(directory, shard)))
            return state
    for name in _SINGLE:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return _load_file(path)
    raise FileNotFoundError(f"{directory}: no weights ({', '.join(_SINGLE + _INDEXES)})")


def config_json(source: str, what: str) -> dict[str, Any]:
    """`config.json` of a local directory or a hub id (read as JSON: no model code runs).

    Raises:
        ImportFormatError: neither is reachable; the message names `what` needs it and how to give it.
    """
    if os.path.isdir(source):
        path = os.path.join(source, "config.json")
        if not os.path.isfile(path):
            raise ImportFormatError(f"{what}: {source} has no config.json")
        return read_json(path)
    try:
        from transformers.utils import cached_file  # defers transformers

        path = cached_file(source, "config.json")
    except (OSError, ValueError) as e:
        raise ImportFormatError(f"{what}: {source!r} is neither a local directory nor a reachable hub id "
                                f"({e})") from None
    return read_json(path)


def hf_config(cfg: dict[str, Any], what: str, vision: bool = False):
    """A transformers config object from its dict (which names its `model_type`); with `vision`, a full CLIP /
    SigLIP config (text and vision towers) gives its vision part."""
    from transformers import AutoConfig  # defers transformers

    cfg = {k: v for k, v in cfg.items() if k not in _NOT_ARCHITECTURE}
    if "model_type" not in cfg:
        raise ImportFormatError(f"{what}: the config has no model_type")
    model_type = cfg.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except ValueError as e:
        raise ImportFormatError(f"{what}: model_type {model_type!r} is not a transformers model ({e})") from None
    return (getattr(config, "vision_config", None) or config) if vision else config


def config_dict(config) -> dict[str, Any]:
    """A config object as the plain dict a medm section stores (what differs from the class defaults)."""
    return {k: v for k, v in config.to_diff_dict().items() if k not in _NOT_ARCHITECTURE}


def load_tokenizer(sources: Iterable[str | None], where: str):
    """The tokenizer of the first source directory (or hub id) that has one."""
    from transformers import AutoTokenizer  # defers transformers

    tried = []
    for source in sources:
        if not source or source in tried:
            continue
        tried.append(source)
        if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in (
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
            continue
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError):
            continue
    raise ImportFormatError(f"{where}: no tokenizer found (tried {', '.join(tried) or 'nothing'}); pass --llm-path "
                            "with the base LLM's tokenizer")


def image_processor(source: str | None, where: str):
    """The base encoder's transformers image processor (its preprocessor_config.json), or None: medm then uses the
    encoder's default mean / std."""
    if not source or (os.path.isdir(source) and
                      not os.path.isfile(os.path.join(source, "preprocessor_config.json"))):
        return None
    from transformers import AutoImageProcessor  # defers transformers

    try:
        return AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as e:
        logger.warning("%s: cannot read the image processor of %s (%s)", where, source, e)
        return None


def adds_bos(tokenizer) -> bool:
    """Does the tokenizer put its BOS token in front of plain text (Llama, Gemma) when asked for special tokens?"""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


# ---- renaming -------------------------------------------------------------------------------------------------
@dataclass
class WeightMap:
    """Source weights renamed to medm names, with every source key accounted for.

    Attributes:
        state: medm name -> tensor.
        names: source name -> medm name.
        unused: source name -> why it is not part of the medm model (a text tower of a CLIP checkpoint, a buffer
            transformers recomputes).
    """

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)

    def add(self, src: str, dst: str, tensor: torch.Tensor) -> None:
        if dst in self.state:
            raise ImportFormatError(f"weights {self.src_of(dst)!r} and {src!r} both map to medm's {dst!r}")
        self.state[dst] = tensor
        self.names[src] = dst

    def src_of(self, dst: str) -> str:
        return next(s for s, d in self.names.items() if d == dst)


# Non-persistent buffers that older transformers versions saved; today's rebuild them, so they carry nothing.
_BUFFERS = ("embeddings.position_ids", "rotary_emb.inv_freq")


def rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], where: str,
           out: WeightMap | None = None) -> WeightMap:
    """Rename by prefix (first matching rule wins); a key no rule matches is an error naming it."""
    out = out or WeightMap()
    for key, tensor in state.items():
        if key.endswith(_BUFFERS):
            out.unused[key] = "a buffer transformers recomputes"
            continue
        for src, dst in rules:
            if key.startswith(src):
                out.add(key, dst + key[len(src):], tensor)
                break
        else:
            known = ", ".join(sorted({s for s, _ in rules}))
            raise ImportFormatError(f"{where}: weight {key!r} belongs to no part medm imports (known prefixes: "
                                    f"{known})")
    return out


def hf_legacy_names(weights: WeightMap, prefix: str, model_class) -> None:
    """Rename, in place, the medm weights under `prefix` (a transformers model of `model_class`, e.g. a CLIP / SigLIP
    vision tower) from the names older transformers saved to today's, with transformers' own checkpoint conversion
    for that class (4.x `CLIPVisionModel` / `SiglipVisionModel` state dicts carry a `vision_model.` level that 5.x
    dropped and maps only inside its `from_pretrained`)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping  # defers transformers

    transforms = get_checkpoint_conversion_mapping(model_class.__name__) or []
    if not transforms:
        return
    for src, dst in list(weights.names.items()):
        if not dst.startswith(prefix):
            continue
        key = dst[len(prefix):]
        for transform in transforms:
            key, _ = transform.rename_source_key(key)
        if prefix + key != dst:
            if prefix + key in weights.state:
                raise ImportFormatError(f"weights {weights.src_of(prefix + key)!r} and {src!r} both map to medm's "
                                        f"{prefix + key!r}")
            weights.state[prefix + key] = weights.state.pop(dst)
            weights.names[src] = prefix + key


# ---- writing --------------------------------------------------------------------------------------------------
@dataclass
class ImportSpec:
    """Everything the medm checkpoint is built from.

    Args:
        text_config: the LLM's transformers config.
        vision, connector, vision3d, connector3d: medm sections (`name` + keys), None where absent.
        template: registered chat template rendering the source's prompts.
        tokenizer: the source's tokenizer (media tokens are added here).
        weights: the renamed weights.
    """

    text_config: Any
    vision: dict | None
    connector: dict | None
    vision3d: dict | None
    connector3d: dict | None
    template: str
    tokenizer: Any
    weights: WeightMap


def write_medm_checkpoint(spec: ImportSpec, src: str, out: str, *, fmt: str, family: str | None = None,
                          system_prompt: str | None = None, dtype: str | None = None,
                          notes: list[str] | None = None) -> str:
    """Build the medm model from `spec`, check every medm weight is given, save it with its tokenizer, `model.yaml`
    and README.md.

    A missing `llm.lm_head.weight` is tied to the input embeddings (the source saved it once). When the source
    tokenizer puts a BOS token in front of the text, the tokenizer's chat template becomes the registered one behind
    `{{ bos_token }}` (and the config names no template), so the ids match the source's too.
    """
    from medm.interop.model_card import write_model_card  # defers transformers
    from medm.models.builder import add_media_tokens, save_model  # defers transformers
    from medm.models.configuration_medm import MedMConfig  # defers transformers
    from medm.models.llm import resolve_dtype  # defers transformers
    from medm.models.modeling_medm import MedMForConditionalGeneration, register_auto_classes  # defers transformers

    tokenizer, weights, text_config = spec.tokenizer, spec.weights, spec.text_config
    template: str | None = spec.template
    jinja = TEMPLATE.get(template).jinja
    if adds_bos(tokenizer):
        tokenizer.chat_template = "{{- bos_token -}}" + jinja
        template = None
    add_media_tokens(tokenizer)

    state = weights.state
    if dtype is not None:
        target = resolve_dtype(dtype)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    tied = "llm.lm_head.weight" not in state
    if tied and not getattr(text_config, "tie_word_embeddings", False):
        logger.warning("%s: no lm_head weights, so the output layer is the input embeddings (tied), though the "
                       "LLM config says tie_word_embeddings: false", src)
        text_config.tie_word_embeddings = True
    emb = state.get("llm.model.embed_tokens.weight")
    stored = emb.dtype if emb is not None else next(iter(state.values())).dtype
    fam = family or (text_config.model_type if text_config.model_type in LLM.names() else "auto")
    llm = {"family": fam, "path": None, "dtype": DTYPE_NAMES.get(stored, "float32"), "attn_implementation": "sdpa",
           "trust_remote_code": False, "lora_target_modules": LLM.get(fam).lora_target_modules}
    register_auto_classes()
    vision, vision3d = (_resolved(section) for section in (spec.vision, spec.vision3d))
    config = MedMConfig(text_config=text_config, llm=llm, vision=vision, connector=spec.connector,
                        vision3d=vision3d, connector3d=spec.connector3d, template=template,
                        system_prompt=system_prompt, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                        image3d_token_id=tokenizer.convert_tokens_to_ids(IMAGE3D_TOKEN))
    with torch.device("meta"):
        model = MedMForConditionalGeneration(config)
    if not tied and getattr(config.text_config, "tie_word_embeddings", False):
        # A saved head that differs from the embeddings (MedM-VL's finetune re-initialises the head its pretrain
        # checkpoint omitted, under a config that still says tied) is a head of its own: written into config.json and
        # model.yaml, so every way of reopening the checkpoint keeps it apart.
        emb_key = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()) + ".weight"
        if emb_key in state and not torch.equal(state[emb_key], state["llm.lm_head.weight"]):
            logger.warning("%s: lm_head differs from the input embeddings though the LLM config says "
                           "tie_word_embeddings: true; imported untied (tie_word_embeddings: false)", src)
            text_config.tie_word_embeddings = False
            config.text_config.tie_word_embeddings = False
            notes = list(notes or []) + ["The source's `lm_head` differs from its input embeddings though its LLM "
                                         "config says tied (a head re-initialised after a checkpoint that omitted "
                                         "it): imported untied, `tie_word_embeddings: false`."]
            with torch.device("meta"):
                model = MedMForConditionalGeneration(config)
        elif emb_key in state:
            state = {k: v for k, v in state.items() if k != "llm.lm_head.weight"}  # the same tensor, saved twice
            tied = True
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (tied and k == "llm.lm_head.weight")]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise ImportFormatError(f"{src}: the weights do not fit the medm model built from its config: "
                                f"missing {missing[:4]} ({len(missing)}), unexpected {extra[:4]} ({len(extra)})")
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise ImportFormatError(f"{src}: weight shapes differ from the architecture its config describes: "
                                f"{'; '.join(shapes[:4])}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.llm.tie_weights()
    fit_vocabulary(model, tokenizer, src)
    save_model(model.eval(), tokenizer, out)
    model_yaml = write_model_yaml(model.config, out)
    if weights.unused:
        first = next(iter(weights.unused))
        logger.info("%s: %d source weights are not part of the medm model, e.g. %s (%s)", src, len(weights.unused),
                    first, weights.unused[first])
    card_notes = [f"Imported from the {fmt} checkpoint `{src}` with `medm import {fmt}`."]
    if weights.unused:
        reasons = sorted(set(weights.unused.values()))
        card_notes.append(f"{len(weights.unused)} source weights were left out: {'; '.join(reasons)}.")
    card_notes += list(notes or [])
    card_notes.append(f"Train on from these weights: `medm train TRAIN.yaml model={model_yaml} stage.init_from={out}`.")
    write_model_card(out, config=model.config, fmt="full", source=src, notes=card_notes)
    return out


def _resolved(section: dict | None) -> dict | None:
    """An encoder section with every setting written out, as `build_model` stores it."""
    if section is None:
        return None
    resolved = VISION.get(section["name"]).resolve_config(dict(section))
    return {"name": section["name"], **{k: v for k, v in resolved.items() if k != "name"}}


def fit_vocabulary(model, tokenizer, src: str) -> None:
    """Make the embedding rows and the tokenizer agree: a larger tokenizer grows the embeddings (mean-initialised
    rows); embedding rows past the vocabulary (padding to a multiple of 64, ...) get placeholder tokens
    `<|medm_unused_i|>`, so `model.yaml`, which sizes the vocabulary from the tokenizer, rebuilds these shapes."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        model.llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    elif len(tokenizer) < rows:
        n = rows - len(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": [f"<|medm_unused_{i}|>" for i in range(n)]},
                                     replace_extra_special_tokens=False)
        logger.info("%s: %d embedding rows have no token; added <|medm_unused_0..%d|> for them", src, n, n - 1)


def write_model_yaml(config, out: str) -> str:
    """`OUT/model.yaml`: the model config `medm train` builds this checkpoint's architecture from (its weights then
    come from `stage.init_from=OUT`); every tower section the model has, 2D and 3D."""
    text = {k: v for k, v in config.text_config.to_diff_dict().items()
            if k not in ("transformers_version", "architectures", "dtype", "_name_or_path")}
    text["model_type"] = config.text_config.model_type
    llm = config.llm
    cfg: dict[str, Any] = {"llm": {"family": llm["family"], "config": text, "tokenizer": os.path.abspath(out),
                                   "dtype": llm["dtype"],
                                   "attn_implementation": llm.get("attn_implementation", "sdpa")}}
    for slot in ("vision", "connector", "vision3d", "connector3d"):
        if getattr(config, slot) is not None:
            cfg[slot] = dict(getattr(config, slot))
    cfg.update(template=config.template, system_prompt=config.system_prompt)
    path = os.path.join(out, MODEL_YAML)
    with open(path, "w") as f:
        f.write("# The architecture of the medm checkpoint in this directory; continue training from its weights:\n"
                f"#   medm train TRAIN.yaml model={path} stage.init_from={os.path.abspath(out)}\n")
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path
