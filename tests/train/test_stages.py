"""Stage plans: exactly the planned parameters train; bad plans fail with errors naming the field."""

import pytest
import torch

from medm.config import ConfigError
from medm.models import build_model
from medm.models.tiny import tiny_model_config
from medm.train.args import LoraArgs, StagePlan
from medm.train.stages import apply_plan, checkpoint_format, encoder_blocks, parse_mode, resolve_plan

LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(family="qwen2", select_layer=-1):
    """The tiny model; its 2-block CLIP tower gives the last block's output (every block and parameter but
    post_layernorm reaches the features)."""
    torch.manual_seed(0)
    cfg = tiny_model_config(family=family)
    cfg["vision"]["select_layer"] = select_layer
    return build_model(cfg)[0]


def _trainable(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


def _names(model, prefix: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def test_pretrain_trains_the_connector_only():
    model = _model()
    out = apply_plan(model, StagePlan(vision="frozen", connector="full", llm="frozen"))
    assert out is model
    assert _trainable(out) == _names(model, "connector.")
    assert checkpoint_format(resolve_plan(model, StagePlan(llm="frozen"))) == "components"


def test_finetune_trains_connector_and_llm_not_vision():
    model = _model()
    apply_plan(model, StagePlan())  # defaults: vision frozen, connector full, llm full
    assert _trainable(model) == _names(model, "connector.") | _names(model, "llm.")
    assert not _trainable(model) & _names(model, "vision.")
    assert checkpoint_format(resolve_plan(model, StagePlan())) == "full"


def test_partial_trains_only_the_last_blocks():
    model = _model()
    blocks = encoder_blocks(model.vision)
    assert len(blocks) == 2
    last = next(n for n, m in model.named_modules() if m is blocks[-1])
    apply_plan(model, StagePlan(vision="partial:1", llm="frozen"))
    assert _trainable(model) == _names(model, "connector.") | _names(model, last + ".")


@pytest.mark.parametrize("plan", [StagePlan(vision="full"), StagePlan(vision="full", llm="lora")])
def test_a_trained_tower_keeps_what_its_features_never_use_frozen(plan):
    """CLIP features from hidden_states[-2]: the last block and post_layernorm get no gradient, so they stay frozen
    (no 'no gradient' warning, no DDP error); everything left trainable gets a gradient in a step."""
    model = _model(select_layer=-2)
    trained = apply_plan(model, plan)
    tower = {n: p.requires_grad for n, p in trained.named_parameters() if "vision." in n}
    unused = [n for n in tower if "post_layernorm." in n or "encoder.layers.1." in n]
    assert unused and not any(tower[n] for n in unused)
    assert any(tower[n] for n in tower if "encoder.layers.0." in n)
    ids = torch.tensor([[model.config.image_token_id] * model.num_image_tokens + [5, 6, 7]])
    trained(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids).loss.backward()
    assert [n for n, p in trained.named_parameters() if p.requires_grad and p.grad is None] == []


def test_partial_blocks_the_features_never_use_is_an_error():
    with pytest.raises(ConfigError, match=r"stage.vision: 'partial:1' trains only blocks the features never use"):
        apply_plan(_model(select_layer=-2), StagePlan(vision="partial:1", llm="frozen"))


def test_lora_trains_adapters_and_connector_only():
    model = _model()
    peft_model = apply_plan(model, StagePlan(llm="lora", lora=LoraArgs(r=4, alpha=8)))
    trainable = _trainable(peft_model)
    adapters = {n for n in trainable if ".lora_" in n}
    connector = {n for n in trainable if n.startswith("connector.")}
    assert trainable == adapters | connector
    # Every default target of every layer is adapted (A and B), nothing else: not the head, not the vision tower.
    layers = model.config.text_config.num_hidden_layers
    assert len(adapters) == 2 * len(LLM_TARGETS) * layers
    assert all(n.startswith("llm.model.layers.") for n in adapters)
    # The connector trains as a PEFT modules_to_save copy, so the adapter checkpoint carries it.
    assert connector and all(".modules_to_save.default." in n for n in connector)
    assert checkpoint_format(resolve_plan(model, StagePlan(llm="lora"))) == "lora"


def test_lora_targets_follow_the_family_and_can_be_overridden():
    phi3 = _model("phi3")
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in _trainable(apply_plan(phi3, StagePlan(llm="lora")))
               if ".lora_" in n}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # Phi-3's fused projections
    model = _model()
    peft_model = apply_plan(model, StagePlan(llm="lora", lora=LoraArgs(target_modules=["q_proj", "v_proj"])))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in _trainable(peft_model) if ".lora_" in n}
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match=r"stage.lora \(llm\): no linear layer of the llm matches \['q_proj'\]"):
        apply_plan(_model("phi3"), StagePlan(llm="lora", lora=LoraArgs(target_modules=["q_proj"])))


def test_encoder_lora_and_partial_blocks_with_llm_lora():
    model = _model()
    trainable = _trainable(apply_plan(model, StagePlan(vision="lora", llm="frozen")))
    assert {n.split(".")[0] for n in trainable if ".lora_" in n} == {"vision"}
    assert {n for n in trainable if ".lora_" not in n} and all(
        n.startswith("connector.") for n in trainable if ".lora_" not in n)
    model = _model()
    last = next(n for n, m in model.named_modules() if m is encoder_blocks(model.vision)[-1])
    trainable = _trainable(apply_plan(model, StagePlan(vision="partial:1", llm="lora")))
    block = {n for n in trainable if n.startswith("vision.")}
    assert block and all(n.startswith(last + ".modules_to_save.default.") for n in block)


@pytest.mark.parametrize("field,value,message", [
    ("llm", "partial:1", r"stage.llm: 'partial:1' is not a mode for the llm; valid: frozen, full, lora, qlora"),
    ("connector", "qlora", r"stage.connector: 'qlora' is not a mode"),
    ("vision", "partial:0", r"stage.vision: 'partial:0' must be partial:N with N >= 1"),
    ("vision", "full:2", r"only partial takes a ':N'"),
])
def test_bad_modes_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_mode(field, value)


def test_plans_that_do_not_fit_the_model():
    model = _model()
    with pytest.raises(ConfigError, match="stage.vision3d: set to 'full' but the model has no vision3d"):
        resolve_plan(model, StagePlan(vision3d="full"))
    with pytest.raises(ConfigError, match="every component is frozen"):
        resolve_plan(model, StagePlan(connector="frozen", llm="frozen"))
    with pytest.raises(ConfigError, match="partial:3 but the encoder has 2 blocks"):
        apply_plan(model, StagePlan(vision="partial:3"))


def test_qlora_needs_a_model_loaded_in_4_bits():
    with pytest.raises(ConfigError, match="qlora needs the LLM loaded in 4 bits"):
        apply_plan(_model(), StagePlan(llm="qlora"))


@pytest.mark.parametrize("vision_mode", ["frozen", "full"])
def test_frozen_batch_norm_keeps_its_running_statistics(vision_mode):
    """A frozen CNN encoder's batch norms stay in eval mode under `model.train()`; a trained one's do not."""
    cfg = tiny_model_config()
    cfg["vision"] = {"name": "timm", "model_name": "test_resnet", "image_size": 64}
    torch.manual_seed(0)
    model = build_model(cfg)[0]
    apply_plan(model, StagePlan(vision=vision_mode))
    model.train()
    norms = [m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    before = [m.running_mean.clone() for m in norms]
    model.get_image_features(torch.randn(4, 3, 64, 64) * 3 + 1)
    moved = [not torch.equal(b, m.running_mean) for b, m in zip(before, norms)]
    assert all(m.training == (vision_mode == "full") for m in norms)
    assert any(moved) if vision_mode == "full" else not any(moved)  # stages past select_layer never run
    assert model.llm.training and model.connector.training
    model.eval()
    assert not any(m.training for m in model.modules())
