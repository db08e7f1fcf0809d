"""The generic transformers vision encoder (`vision.name: hf`) on tiny DINOv2, ViT, CLIP and SigLIP configs, and the
`clip` / `siglip` presets of it: features are the reference model's hidden states, token counts, layer / feature
selection, unused parameters, `model_type` from `path`, checkpoint round trips."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, Dinov2Config, Dinov2Model

from medm.config import ConfigError
from medm.models import build_model, load_model, save_model
from medm.models.tiny import tiny_model_config, tiny_overrides, tiny_vision
from medm.registry import VISION
from medm.train.args import StagePlan
from medm.train.stages import apply_plan

# model_type -> leading non-grid tokens (CLS) of its hidden states
MODEL_TYPES = {"dinov2": 1, "vit": 1, "clip_vision_model": 1, "siglip_vision_model": 0}
# model_type -> the modules after the blocks that the features never reach (beyond the blocks after select_layer);
# DINOv2's mask_token serves masked-image pretraining only
AFTER = {"dinov2": ["layernorm"], "dinov2_with_registers": ["layernorm"], "vit": ["layernorm", "pooler"],
         "clip_vision_model": ["post_layernorm"],
         "siglip_vision_model": ["post_layernorm", "head"]}


def hf_section(model_type, **overrides):
    return {"name": "hf", **tiny_vision("hf", {"model_type": model_type}), **overrides}


def build(section, seed=0):
    cls = VISION.get(section["name"])
    cfg = cls.resolve_config(section)
    torch.manual_seed(seed)
    return cls(**{k: v for k, v in cfg.items() if k != "name"}).eval()


def reference(enc, model_type):
    """The transformers model AutoModel builds from the same config, with the encoder's weights."""
    settings = {k: v for k, v in enc.model.config.to_diff_dict().items() if k != "model_type"}
    ref = AutoModel.from_config(AutoConfig.for_model(model_type, **settings)).eval()
    ref.load_state_dict(enc.model.state_dict())
    return ref


PX = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
@pytest.mark.parametrize("select_layer", [0, -1, -2])
def test_features_are_the_reference_hidden_states(model_type, select_layer):
    n_cls = MODEL_TYPES[model_type]
    enc = build(hf_section(model_type, select_layer=select_layer))
    ref = reference(enc, model_type)
    assert type(enc.model) is type(ref)  # what AutoModel builds from the config
    with torch.no_grad():
        hidden = ref(pixel_values=PX, output_hidden_states=True).hidden_states[select_layer]
        assert enc.grid == (4, 4) and enc.num_cls_tokens == n_cls
        assert enc.num_prefix_tokens == 0 and enc.num_tokens == 16
        assert torch.equal(enc(PX), hidden[:, n_cls:])  # `patch`: CLS dropped
        for feature, prefix, expected in [("cls_patch", n_cls, hidden), ("skip_first", n_cls - 1, hidden[:, 1:])]:
            other = build(hf_section(model_type, select_layer=select_layer, select_feature=feature))
            other.load_state_dict(enc.state_dict())
            out = other(PX)
            assert other.num_prefix_tokens == prefix and out.shape[1] == other.num_tokens == 16 + prefix
            assert torch.equal(out, expected)


def test_register_tokens_are_measured_not_assumed():
    """DINOv2 with registers: CLS + 4 registers precede the grid; `patch` drops all five."""
    section = hf_section("dinov2_with_registers")
    enc = build({**section, "config": {**section["config"], "num_register_tokens": 4}})
    ref = reference(enc, "dinov2_with_registers")
    with torch.no_grad():
        hidden = ref(pixel_values=PX, output_hidden_states=True).hidden_states[-2]
        assert hidden.shape[1] == 21 and enc.num_cls_tokens == 5 and enc.num_tokens == 16
        assert torch.equal(enc(PX), hidden[:, 5:])


@pytest.mark.parametrize("preset, model_type", [("clip", "clip_vision_model"), ("siglip", "siglip_vision_model")])
def test_presets_are_the_generic_encoder_with_model_type_pinned(preset, model_type):
    """`clip` / `siglip` keep their config keys and weight names: the same weights load into `hf` and agree."""
    named = build({"name": preset, **tiny_vision(preset)})
    generic = build({"name": "hf", "model_type": model_type, **tiny_vision(preset)})
    assert list(named.state_dict()) == list(generic.state_dict())
    generic.load_state_dict(named.state_dict())
    assert (named.num_cls_tokens, named.num_tokens) == (generic.num_cls_tokens, generic.num_tokens)
    with torch.no_grad():
        assert torch.equal(named(PX), generic(PX))
    cls = VISION.get(preset)
    assert "model_type" not in cls.resolve_config(tiny_vision(preset))
    assert cls.preprocessor(cls.resolve_config(tiny_vision(preset))) == VISION.get("hf").preprocessor(
        VISION.get("hf").resolve_config({"model_type": model_type, **tiny_vision(preset)}))


@pytest.mark.parametrize("model_type", [*MODEL_TYPES, "dinov2_with_registers"])
@pytest.mark.parametrize("select_layer", [-1, -2, 0])
def test_unused_parameters_are_exactly_those_without_gradient(model_type, select_layer):
    enc = build(hf_section(model_type, select_layer=select_layer)).train()
    n_blocks = 2
    first_unused = select_layer % (n_blocks + 1)
    layers = enc.architecture.layers
    expected_modules = [f"{layers}.{i}" for i in range(first_unused, n_blocks)] + AFTER[model_type]
    expected = [f"model.{m}.{n}" for m in expected_modules for n, _ in enc.model.get_submodule(m).named_parameters()]
    if model_type.startswith("dinov2"):
        expected.insert(0, "model.embeddings.mask_token")
    assert enc.unused_parameter_names() == expected
    enc(PX).sum().backward()
    assert sorted(n for n, p in enc.named_parameters() if p.grad is None) == sorted(expected)


def test_an_architecture_medm_does_not_know_builds_and_claims_nothing_unused():
    enc = build(hf_section("vit_msn"))
    assert enc.architecture is None and enc.num_cls_tokens == 1 and enc.num_tokens == 16
    assert enc(PX).shape == (2, 16, 32) and enc.unused_parameter_names() == []
    assert VISION.get("hf").preprocessor(VISION.get("hf").resolve_config(hf_section("vit_msn"))).mean == (0.5,) * 3


def test_model_type_and_normalisation_are_read_from_path(tmp_path):
    torch.manual_seed(3)
    saved = Dinov2Model(Dinov2Config(**tiny_vision("hf", {"model_type": "dinov2"})["config"]))
    saved.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                   "image_std": [0.4, 0.5, 0.6]}))
    cls = VISION.get("hf")
    cfg = cls.resolve_config({"name": "hf", "path": str(tmp_path)})
    assert cfg["model_type"] == "dinov2" and cfg["config"]["patch_size"] == 8
    assert (cfg["image_mean"], cfg["image_std"]) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    with pytest.raises(ValueError, match=r"vision.model_type 'vit', but vision.path .* 'dinov2'"):
        cls.resolve_config({"name": "hf", "path": str(tmp_path), "model_type": "vit"})
    model_cfg = tiny_model_config()
    model_cfg["vision"] = {"name": "hf", "path": str(tmp_path), "select_layer": -1}
    model, _ = build_model(model_cfg)
    assert model.config.vision["model_type"] == "dinov2"
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.vision.model.state_dict()[name], tensor), name


def test_missing_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="vision encoder 'hf': set `model_type`"):
        build({"name": "hf", "config": {"hidden_size": 32}})
    with pytest.raises(ValueError, match="needs vision.model_type"):
        tiny_vision("hf")
    with pytest.raises(ValueError, match="model_type 'no_such_model'"):
        build({"name": "hf", "model_type": "no_such_model", "config": {"hidden_size": 32}})
    with pytest.raises(ValueError, match=r"image_size None \(resnet\): medm takes a ViT-style tower"):
        build({"name": "hf", "model_type": "resnet", "config": {"hidden_sizes": [8], "depths": [1]}})


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_checkpoint_round_trip_is_exact(tmp_path, model_type):
    cfg = tiny_model_config()
    cfg["vision"] = hf_section(model_type, select_feature="cls_patch")
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    model.eval()
    n = model.vision.num_tokens
    assert n == 16 + MODEL_TYPES[model_type]
    ids = torch.tensor([[tok.convert_tokens_to_ids("<image>")] * n + tok("Is there a lesion?")["input_ids"]])
    px = VISION.get("hf").preprocessor(model.config.vision)(Image.new("L", (40, 40), 90)).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px).logits
    save_model(model, tok, str(tmp_path))
    again, _ = load_model(str(tmp_path))
    assert again.config.vision == model.config.vision and again.config.vision["model_type"] == model_type
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids, pixel_values=px).logits, out)


def test_tiny_twin_keeps_model_type():
    """A real `hf` YAML section (hub path, no config) becomes a tiny offline twin of the same architecture."""
    twin = tiny_overrides({"llm": {"family": "qwen2", "path": "Qwen/Qwen2.5-0.5B-Instruct"},
                           "vision": {"name": "hf", "model_type": "dinov2", "path": "facebook/dinov2-small",
                                      "select_layer": -1},
                           "connector": {"name": "mlp"}})
    assert twin["vision"]["model_type"] == "dinov2" and "path" not in twin["vision"]
    model, _ = build_model(twin)
    assert isinstance(model.vision.model, Dinov2Model) and model.num_image_tokens == 16


def test_a_trained_dinov2_tower_leaves_no_trainable_parameter_without_gradient():
    """Stage `vision: full` on DINOv2's hidden_states[-2]: the last block, the final norm and the mask token stay
    frozen (no 'got no gradient' warning, no DDP error); all else gets a gradient; partial:1 on the unused block
    is refused."""
    cfg = tiny_model_config()
    cfg["vision"] = hf_section("dinov2", select_layer=-2)
    torch.manual_seed(0)
    model = apply_plan(build_model(cfg)[0], StagePlan(vision="full", llm="frozen"))
    frozen = {n for n, p in model.vision.named_parameters() if not p.requires_grad}
    assert frozen == set(model.vision.unused_parameter_names()) and "model.embeddings.mask_token" in frozen
    ids = torch.tensor([[model.config.image_token_id] * model.num_image_tokens + [5, 6, 7]])
    model(input_ids=ids, pixel_values=PX[:1], labels=ids).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    with pytest.raises(ConfigError, match="trains only blocks the features never use"):
        apply_plan(build_model(cfg)[0], StagePlan(vision="partial:1", llm="frozen"))
