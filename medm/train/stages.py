"""Stage plans: which components train, and how (`frozen | full | lora | qlora | partial:N`).

`apply_plan(model, plan)` freezes the model, unfreezes what the plan trains, and wraps the model in a PEFT
`PeftModel` when a component is `lora` / `qlora`. Under LoRA, components that train fully (e.g. the connector)
and partially trained encoder blocks become PEFT `modules_to_save`, so the adapter checkpoint holds them too
and `merge_and_unload` gives back a plain medm model.

A component is one or more modules of the model (`component_paths`): the medm model's attributes of the same
name, or what a model of another kind reports through `stage_components()` (Qwen-VL: `vision` is the vision
blocks, `connector` the merger, `llm` the language model and its head).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from medm.config import ConfigError
from medm.models.checkpoint import COMPONENTS_ONLY, FULL, LORA  # noqa: F401  (LORA: also imported from here)
from medm.train._modes import (  # noqa: F401  (also imported from here)
    ALLOWED,
    COMPONENTS,
    CONNECTORS,
    DEFAULT_MODES,
    ENCODERS,
    Mode,
    parse_mode,
)
from medm.train._qlora import prepare_qlora
from medm.train.args import StagePlan

logger = logging.getLogger(__name__)

def component_paths(model: nn.Module) -> dict[str, list[str]]:
    """Component name -> the paths of its modules in `model`, for the components the model has.

    A model that defines `stage_components()` (medm.qwenvl) says it; otherwise the components are the model's
    attributes `vision`, `connector`, `llm`, ... (the medm model), each one module.
    """
    own = getattr(model, "stage_components", None)
    if own is not None:
        return own()
    return {name: [name] for name in COMPONENTS if getattr(model, name, None) is not None}


def llm_lora_targets(model: nn.Module) -> list[str] | None:
    """The LLM's default LoRA targets: the model's own `llm_lora_targets()` (medm.qwenvl), else its medm config's."""
    own = getattr(model, "llm_lora_targets", None)
    return own() if own is not None else model.config.llm.get("lora_target_modules")


def resolve_plan(model: nn.Module, plan: StagePlan) -> dict[str, Mode]:
    """Each component the model has -> its Mode (defaults filled); setting a component it lacks is an error."""
    modes = {}
    paths = component_paths(model)
    for name in COMPONENTS:
        value = getattr(plan, name)
        present = name in paths
        if not present:
            if value is not None:
                raise ConfigError(f"stage.{name}: set to {value!r} but the model has no {name}")
            continue
        modes[name] = parse_mode(name, value if value is not None else DEFAULT_MODES[name])
    if not any(m.trains for m in modes.values()):
        raise ConfigError("stage: every component is frozen; nothing would train")
    return modes


def checkpoint_format(modes: dict[str, Mode]) -> str:
    """`lora` when anything uses an adapter; `components` when the LLM is frozen (save only what trains);
    else `full`."""
    if any(m.adapter for m in modes.values()):
        return LORA
    return COMPONENTS_ONLY if not modes["llm"].trains else FULL


def encoder_blocks(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's transformer blocks: its `blocks` attribute when it has one, else its longest ModuleList of
    same-type modules (HF `encoder.layers`, open_clip `resblocks`, timm `blocks`)."""
    blocks = getattr(encoder, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return blocks
    lists = [m for m in encoder.modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    if not lists:
        raise ValueError(f"{type(encoder).__name__} has no list of blocks; partial:N cannot pick its last blocks")
    longest = max(len(m) for m in lists)
    candidates = [m for m in lists if len(m) == longest]
    if len(candidates) > 1:
        raise ValueError(f"{type(encoder).__name__} has {len(candidates)} block lists of length {longest}; "
                         "give the encoder a `blocks` attribute so partial:N knows which to use")
    return candidates[0]


def _linear_names(modules: list[tuple[str, nn.Module]], targets: list[str] | None, exclude: set[int],
                  where: str) -> list[str]:
    """Full names of the nn.Linear layers under the `(path, module)` pairs matching `targets` (name suffixes; None or
    all-linear: all)."""
    every = targets is None or list(targets) == ["all-linear"]
    names, hit = [], set()
    for prefix, module in modules:
        for name, sub in module.named_modules():
            if not isinstance(sub, nn.Linear) or id(sub) in exclude:
                continue
            full = f"{prefix}.{name}" if name else prefix
            if every:
                names.append(full)
                continue
            for t in targets:
                if name == t or name.endswith("." + t):
                    names.append(full)
                    hit.add(t)
    missing = [] if every else [t for t in targets if t not in hit]
    if missing or not names:
        what = " + ".join(p for p, _ in modules)
        raise ConfigError(f"{where}: no linear layer of the {what} matches {missing or targets}")
    return names


def apply_plan(model: nn.Module, plan: StagePlan, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Set `requires_grad` as the plan says; returns the model to train (a PeftModel when LoRA is used).

    `compute_dtype` is kept for callers; a qlora LLM gets its compute dtype at load time (medm.train._qlora).
    """
    modes = resolve_plan(model, plan)
    paths = component_paths(model)
    head = model.get_output_embeddings()
    if modes["llm"].name == "qlora":
        # The LLM was loaded in 4 bits (medm.train._qlora.qlora_load_config at from_pretrained); this freezes it and
        # keeps the rest in float32 before the adapters go on.

        model = prepare_qlora(model)
    model.requires_grad_(False)
    lora_targets: list[str] = []
    to_save: list[str] = []
    for name, mode in modes.items():
        modules = [(path, model.get_submodule(path)) for path in paths[name]]
        if mode.name == "full":
            for path, module in modules:
                module.requires_grad_(True)
                # PEFT wraps each saved module; a ModuleList is iterated, not called, so its items are saved.
                to_save += ([f"{path}.{i}" for i in range(len(module))] if isinstance(module, nn.ModuleList)
                            else [path])
        elif mode.name == "partial":
            blocks = encoder_blocks(modules[0][1])
            if mode.blocks > len(blocks):
                raise ConfigError(f"stage.{name}: partial:{mode.blocks} but the encoder has {len(blocks)} blocks")
            prefix = next(n for n, m in model.named_modules() if m is blocks)
            for i in range(len(blocks) - mode.blocks, len(blocks)):
                blocks[i].requires_grad_(True)
                to_save.append(f"{prefix}.{i}")
        elif mode.adapter:
            exclude = {id(head)} if name == "llm" else set()
            # Connectors adapt every linear layer; encoders take encoder_target_modules; the LLM target_modules.
            targets = (plan.lora.target_modules if name == "llm" else None if name in CONNECTORS
                       else plan.lora.encoder_target_modules)
            if name == "llm" and targets is None:
                targets = llm_lora_targets(model)
            lora_targets += _linear_names(modules, targets, exclude, f"stage.lora ({name})")
    freeze_unused(model)
    for name, mode in modes.items():
        if mode.name in ("full", "partial") and not any(
                p.requires_grad for path in paths[name] for p in model.get_submodule(path).parameters()):
            raise ConfigError(f"stage.{name}: {plan_value(plan, name)!r} trains only blocks the features never use "
                              f"(model.{name}.select_layer picks an earlier layer); train more blocks")
    if not lora_targets:
        return model
    from peft import LoraConfig, get_peft_model  # defers peft

    config = LoraConfig(r=plan.lora.r, lora_alpha=plan.lora.alpha, lora_dropout=plan.lora.dropout,
                        target_modules=lora_targets, modules_to_save=to_save or None, bias="none")
    # Only the base model's embeddings feed the LLM; PEFT's own model-type tweaks are not wanted (task_type None).
    # PEFT unfreezes its copies of the saved modules and adds adapters to unused blocks too: freeze those again.
    return freeze_unused(get_peft_model(model, config), log=False)


def plan_value(plan: StagePlan, name: str) -> str:
    value = getattr(plan, name)
    return value if value is not None else DEFAULT_MODES[name]


def freeze_unused(model: nn.Module, log: bool = True) -> nn.Module:
    """Freeze what a trained encoder's features never reach (`unused_parameter_names`: e.g. CLIP's post_layernorm,
    the blocks after `select_layer`): no gradient would reach them."""
    frozen = []
    for path, module in model.named_modules():
        if not callable(getattr(module, "unused_parameter_names", None)):
            continue
        for name in module.unused_parameter_names():
            param = module.get_parameter(name)
            if param.requires_grad:
                param.requires_grad_(False)
                frozen.append(f"{path}.{name}")
    if frozen and log:
        logger.info("%d encoder parameter tensors stay frozen: the features never use them (e.g. %s)", len(frozen),
                    ", ".join(frozen[:2]))
    return model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def describe(model: nn.Module) -> str:
    """`trainable 1.2M / 150M params (0.8%)` for the log."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {train / 1e6:.3g}M / {total / 1e6:.3g}M params ({100 * train / max(total, 1):.2g}%)"
