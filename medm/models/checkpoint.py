"""Checkpoints in three formats: save, load, kind detection; `load_trained` opens any of them.

- `full`: `save_model` output (config.json, model.safetensors, tokenizer). `load_model` opens it.
- `components`: a stage whose LLM is frozen (e.g. pretrain: connector only) saves just the trained components in
  `components.safetensors` (model-level names such as `connector.mlp.0.weight`; `model.visual.merger...` for a
  Qwen-VL model), plus config and tokenizer (a processor for the qwen-vl kind).
- `lora`: a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`; fully trained components ride
  along as `modules_to_save`), plus config and tokenizer.

The last two name their frozen weights in `medm_checkpoint.json`: `base` is a full checkpoint (path relative
to the checkpoint directory): the stage's `init_from` when that was a full checkpoint, else the `base/`
directory the run wrote when it started. A directory without `medm_checkpoint.json` is `full`.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer

from medm.models.configuration_medm import MedMConfig
from medm.models.llm import remote_code, resolve_dtype
from medm.models.modeling_medm import MedMForConditionalGeneration, register_auto_classes
from medm.registry import DEFAULT_KIND, KIND

# The three formats (what a stage plan saves as: medm.train.stages.checkpoint_format).
FULL, COMPONENTS_ONLY, LORA = "full", "components", "lora"
META_FILE = "medm_checkpoint.json"
COMPONENTS_FILE = "components.safetensors"
BASE_DIR = "base"


def write_meta(out_dir: str, fmt: str, base: str | None = None, components: list[str] | None = None) -> None:
    """Record the format; `base` (a directory) is stored relative to `out_dir`."""
    meta = {"format": fmt, "base": os.path.relpath(base, out_dir) if base else None, "components": components}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def relocate_meta(ckpt_dir: str, new_dir: str) -> None:
    """Rewrite the `base` path `ckpt_dir`'s meta holds (relative) for the directory's next place, `new_dir`; a
    checkpoint written in a staging directory is renamed into place afterwards (medm.train.safety)."""
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        meta = json.load(f)
    if not meta.get("base"):
        return
    base = os.path.normpath(os.path.join(ckpt_dir, meta["base"]))
    meta["base"] = os.path.relpath(base, new_dir)
    with open(path, "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(path):
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"checkpoint directory {ckpt_dir!r} does not exist")
        if not os.path.isfile(os.path.join(ckpt_dir, "config.json")):
            raise FileNotFoundError(f"{ckpt_dir!r} is not a checkpoint: it has neither config.json nor {META_FILE}; "
                                    "give a training run's output_dir, a checkpoint-N or an exported model")
        return {"format": FULL, "base": None, "components": None}
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") not in (FULL, COMPONENTS_ONLY, LORA):
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def base_dir(ckpt_dir: str, meta: dict | None = None) -> str:
    """The full checkpoint holding a components / LoRA checkpoint's frozen weights."""
    meta = meta or read_meta(ckpt_dir)
    if not meta.get("base"):
        raise ValueError(f"{ckpt_dir}: a {meta['format']} checkpoint without a `base` in {META_FILE}")
    path = os.path.normpath(os.path.join(ckpt_dir, meta["base"]))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{ckpt_dir}: its base weights {path!r} are missing (moved or deleted?); give "
                                "their new place with --base DIR (medm infer, chat, serve, export; base= in "
                                "load_trained)")
    return path


def save_components(model: nn.Module, tokenizer, out_dir: str, components: list[str], base: str,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the trained components' weights, config, tokenizer and meta (a `components` checkpoint).

    Args:
        components: module paths whose weights are saved (`connector`; `model.visual.merger` for Qwen-VL).
    """
    os.makedirs(out_dir, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    keep = {k: v.detach().cpu().contiguous() for k, v in state.items()
            if any(k.startswith(c + ".") for c in components)}
    save_file(keep, os.path.join(out_dir, COMPONENTS_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_meta(out_dir, COMPONENTS_ONLY, base, components)


def load_full_state(ckpt_dir: str) -> dict[str, torch.Tensor]:
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(ckpt_dir, shard)))
        return state
    single = os.path.join(ckpt_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{ckpt_dir}: no model.safetensors (nor an index) in this full checkpoint")
    return load_file(single)


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy named weights into `model`; every key must exist there with the same shape."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} weights do not fit this model, e.g. {unexpected[0]!r}; "
                         "is the stage's model config the one that checkpoint was trained with?")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{where}: {k!r} has shape {tuple(v.shape)} there, {tuple(own[k].shape)} in this model")
    model.load_state_dict(state, strict=False)


def load_components(model: nn.Module, ckpt_dir: str) -> None:
    load_state_into(model, load_file(os.path.join(ckpt_dir, COMPONENTS_FILE)), ckpt_dir)


def load_trained(ckpt_dir: str, dtype: str | None = None, device: str | torch.device | None = None,
                 base: str | None = None, merge: bool = True, trust_remote_code: bool = False):
    """Open any training checkpoint as (model, tokenizer).

    Args:
        ckpt_dir: a full, components or LoRA checkpoint (a run's output_dir or one of its checkpoint-N).
        base: the full checkpoint with the frozen weights; default: the one its `medm_checkpoint.json` names.
        merge: for LoRA, fold the adapter into the weights (a plain medm model); False keeps the PeftModel.
        trust_remote_code: run Python files the checkpoint ships (`--trust-remote-code`); off by default.
    """
    meta = read_meta(ckpt_dir)
    if meta["format"] == FULL:
        return load_model(ckpt_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    model, _ = load_model(base or base_dir(ckpt_dir, meta), dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_processing(ckpt_dir, trust_remote_code)
    if meta["format"] == COMPONENTS_ONLY:
        load_components(model, ckpt_dir)
    else:
        from peft import PeftModel  # defers peft

        model = PeftModel.from_pretrained(model, ckpt_dir)
        if merge:
            model = model.merge_and_unload()
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def load_init_weights(model: nn.Module, ckpt_dir: str) -> dict:
    """`stage.init_from`: copy the weights an earlier stage's checkpoint holds into a freshly built model."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"stage.init_from: {ckpt_dir!r} does not exist; train the earlier stage first, "
                                "point stage.init_from at its output_dir, or set stage.init_from=null")
    meta = read_meta(ckpt_dir)
    if meta["format"] == FULL:
        state = KIND.get(checkpoint_kind(ckpt_dir)).full_state(ckpt_dir)
    elif meta["format"] == COMPONENTS_ONLY:
        state = load_file(os.path.join(ckpt_dir, COMPONENTS_FILE))
    else:
        state = load_trained(ckpt_dir, merge=True)[0].state_dict()
    load_state_into(model, state, f"stage.init_from {ckpt_dir}")
    return meta


def save_model(model, tokenizer, out_dir: str) -> None:
    """A self-contained checkpoint: config.json, safetensors weights, tokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_model(path: str, dtype: str | None = None, device: str | torch.device | None = None,
               trust_remote_code: bool = False):
    """Reopen a checkpoint written by `save_model` as (model, tokenizer or processor); its kind's loader opens it
    (no hub access; safetensors only).

    Args:
        trust_remote_code: run Python files the checkpoint ships (`auto_map` in its configs); off unless the
            user says so (`--trust-remote-code`), whatever the saved config says.

    Raises:
        ValueError: the weights lack tensors the model has (e.g. the connector's): never loaded as random ones.
    """
    return KIND.get(checkpoint_kind(path)).load(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def load_medm(path: str, dtype: str | None = None, device: str | torch.device | None = None,
              trust_remote_code: bool = False):
    """`load_model` for the medm kind: a MedMForConditionalGeneration and its tokenizer."""
    register_auto_classes()
    config = MedMConfig.from_pretrained(path)
    config.llm = {**(config.llm or {}), "trust_remote_code": remote_code(trust_remote_code, path)}
    model, info = MedMForConditionalGeneration.from_pretrained(path, config=config, use_safetensors=True,
                                                               output_loading_info=True,
                                                               dtype=resolve_dtype(dtype) if dtype else None)
    refuse_missing_weights(path, info)
    if device is not None:
        model.to(device)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def refuse_missing_weights(path: str, loading_info: dict) -> None:
    """Raise ValueError naming the weights a checkpoint lacks (`from_pretrained(output_loading_info=True)`):
    transformers would start them at random and answer anyway, and a model without its connector answers noise."""
    missing = sorted(loading_info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weight(s) this model needs: {shown}. A "
                         "truncated copy or an incomplete save? Use a complete checkpoint directory")


def checkpoint_kind(path: str) -> str:
    """The model kind a checkpoint directory holds: the registered kind that claims it (`ModelKind.owns`), else
    `medm`."""
    owners = [name for name in KIND.names() if KIND.get(name).owns(path)]
    return owners[0] if owners else DEFAULT_KIND


def load_processing(path: str, trust_remote_code: bool = False):
    """The tokenizer (medm kind) or processor (qwen-vl kind) saved in a checkpoint directory."""
    return KIND.get(checkpoint_kind(path)).load_processing(path, trust_remote_code)
