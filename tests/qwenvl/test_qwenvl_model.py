"""The qwen-vl kind: config parsing, tiny builds of every Qwen-VL class, stage-plan components, checkpoints."""

import json

import pytest
import torch
from qwenvl_helpers import REPO, build_tiny, tiny_cfg

from medm.config import ConfigError, load_yaml
from medm.models import build_model, load_model, parse_model_args, save_model
from medm.models.builder import checkpoint_kind
from medm.models.tiny import tiny_overrides
from medm.qwenvl.model import QWENVL_CLASSES, QwenVLMixin
from medm.qwenvl.tiny import TINY_QWENVL, tiny_qwenvl_config
from medm.train.args import LoraArgs, StagePlan
from medm.train.stages import apply_plan, component_paths, resolve_plan, trainable_parameter_names


@pytest.mark.parametrize("model_type", sorted(TINY_QWENVL))
def test_every_qwen_vl_class_builds_tiny_and_its_components_cover_every_weight(model_type):
    model, processor = build_model({"kind": "qwen-vl", "qwenvl": {
        "config": tiny_qwenvl_config(model_type), "tiny_processor": True, "box_format": "json1000"}})
    assert isinstance(model, QWENVL_CLASSES[model_type].model) and isinstance(model, QwenVLMixin)
    # Named like the transformers class, so config.json's `architectures` opens with plain transformers.
    assert type(model).__name__ == type(model).__mro__[2].__name__
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.text_config.vocab_size == len(tok)
    owner = {}
    for comp, paths in component_paths(model).items():
        for path in paths:
            for name, _ in model.get_submodule(path).named_parameters():
                owner.setdefault(f"{path}.{name}", []).append(comp)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head counts too
    assert set(owner) == set(params), set(params) ^ set(owner)  # every weight in exactly one component
    assert all(len(v) == 1 for v in owner.values())
    assert {c for v in owner.values() for c in v} == {"vision", "connector", "llm"}


def test_the_tiny_yamls_are_the_tiny_presets():
    for model_type, stem in (("qwen2_vl", "tiny-qwen2-vl"), ("qwen2_5_vl", "tiny-qwen2.5-vl")):
        cfg = load_yaml(str(REPO / f"configs/model/{stem}.yaml"))
        assert cfg["qwenvl"]["config"] == tiny_qwenvl_config(model_type), stem
    real = load_yaml(str(REPO / "configs/model/qwen2-vl-2b.yaml"))
    twin = tiny_overrides(real)
    assert twin["qwenvl"]["path"] is None and twin["qwenvl"]["config"]["model_type"] == "qwen2_vl"
    assert twin["qwenvl"]["box_format"] == "tokens1000"


@pytest.mark.parametrize("cfg,message", [
    ({"kind": "qwenvl"}, r"model.kind: 'qwenvl' is not allowed; did you mean qwen-vl\? \(allowed: medm, qwen-vl\)"),
    ({"kind": "qwen-vl"}, r"configured in the `qwenvl` section only; add it"),
    ({"kind": "qwen-vl", "llm": {"family": "qwen2"}, "qwenvl": {}}, r"remove `llm`"),
    ({"kind": "qwen-vl", "qwenvl": {"path": "x", "box_format": "json_resized", "pth": 1}},
     r"model.qwenvl.pth: unknown key; did you mean path\?"),
    ({"kind": "qwen-vl", "qwenvl": {"path": "x"}}, r"model.qwenvl.box_format: None; set one of: tokens1000"),
    ({"kind": "qwen-vl", "qwenvl": {"path": "x", "config": {}, "box_format": "json1000"}}, r"exactly one of `path`"),
    ({"kind": "qwen-vl", "qwenvl": {"config": {"model_type": "llava"}, "tiny_processor": True,
                                    "box_format": "json1000"}}, r"config.model_type: 'llava'; supported: qwen2_vl"),
    ({"kind": "qwen-vl", "qwenvl": {"path": "x", "box_format": "json1000", "min_pixels": 10, "max_pixels": 5}},
     r"0 < min_pixels <= max_pixels"),
    ({"qwenvl": {"path": "x"}}, r"model.qwenvl: only for kind qwen-vl"),
])
def test_bad_qwen_vl_configs_are_named(cfg, message):
    with pytest.raises(ConfigError, match=message):
        parse_model_args(cfg)


def _modes(model, **stage):
    lora = stage.pop("lora", {})
    plan = StagePlan(**stage, lora=LoraArgs(r=4, alpha=8, **lora))
    return plan, {k: m.name for k, m in resolve_plan(model, plan).items()}


def test_stage_plans_on_a_qwen_vl_model():
    model, _ = build_tiny("qwen2_5_vl")
    plan, modes = _modes(model, llm="lora", vision="frozen", connector="frozen")
    assert modes == {"vision": "frozen", "connector": "frozen", "llm": "lora"}
    peft = apply_plan(model, plan)
    names = trainable_parameter_names(peft)
    assert names and all("lora_" in n and ".language_model." in n for n in names)
    adapted = {n.split(".")[-4] for n in names}  # ...q_proj.lora_A.default.weight
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n in names)

    # LoRA on the vision tower (its fused qkv) and the merger; the LLM frozen.
    model, _ = build_tiny("qwen2_5_vl")
    plan, _ = _modes(model, llm="frozen", vision="lora", connector="lora", lora={"encoder_target_modules": ["qkv"]})
    names = trainable_parameter_names(apply_plan(model, plan))
    assert {n.split(".lora_")[0].split("base_model.model.")[1] for n in names} == {
        "model.visual.blocks.0.attn.qkv", "model.visual.blocks.1.attn.qkv", "model.visual.merger.mlp.0",
        "model.visual.merger.mlp.2"}

    # partial:1 trains the last vision block; a full merger rides along under LLM LoRA as modules_to_save.
    model, _ = build_tiny("qwen2_5_vl")
    plan, _ = _modes(model, llm="lora", vision="partial:1", connector="full")
    names = trainable_parameter_names(apply_plan(model, plan))
    assert any("visual.blocks.1." in n and "modules_to_save" in n for n in names)
    assert not any("visual.blocks.0." in n for n in names)
    assert any("visual.merger." in n and "modules_to_save" in n for n in names)

    model, _ = build_tiny("qwen2_5_vl")
    with pytest.raises(ConfigError, match=r"stage.vision3d: set to 'full' but the model has no vision3d"):
        resolve_plan(model, StagePlan(vision3d="full"))


def test_full_vision_training_under_llm_lora_keeps_the_tower_callable():
    """A trained tower is saved with the adapter block by block (a ModuleList cannot be wrapped whole)."""
    model, processor = build_tiny("qwen2_vl")
    plan, _ = _modes(model, llm="lora", vision="full", connector="full")
    peft = apply_plan(model, plan)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a lesion?"}]}]
    from PIL import Image

    enc = processor(text=[processor.apply_chat_template(msgs, add_generation_prompt=True)],
                    images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    out = peft(**enc, labels=enc["input_ids"])
    out.loss.backward()
    trained = [(n, p) for n, p in peft.named_parameters() if p.requires_grad and ".visual." in n]
    assert {n.split("visual.")[1].split(".")[0] for n, _ in trained} == {"blocks", "patch_embed", "merger"}
    assert all(p.grad is not None for _, p in trained)


def test_save_and_reopen_keeps_the_medm_settings(tmp_path):
    model, processor = build_tiny("qwen2_vl", lora_target_modules=["q_proj", "v_proj"])
    save_model(model, processor, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert checkpoint_kind(str(tmp_path)) == "qwen-vl"
    again, proc2 = load_model(str(tmp_path))
    assert type(again) is type(model) and again.medm_settings["box_format"] == "tokens1000"
    assert again.llm_lora_targets() == ["q_proj", "v_proj"]
    assert proc2.image_processor.size["shortest_edge"] == 56 * 56 and proc2.image_processor.patch_size == 14
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    cfg = tiny_cfg("qwen2_vl")
    cfg["system_prompt"] = "Answer briefly."
    model, _ = build_model(cfg)
    assert model.medm_settings["system_prompt"] == "Answer briefly."
