"""Export to transformers' LLaVA format and import back: parity with transformers' own classes, round trips,
and refusals of what the format cannot hold."""

import json
import shutil

import pytest
import torch
from interop_helpers import QUESTION, VARIANTS, noisy_image, variant_model
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from medm.cli import main
from medm.config import load_yaml
from medm.data.templates import ChatFormat
from medm.infer.generate import GenerationSettings, Predictor
from medm.interop.llava_hf import (
    ExportError,
    check_exportable,
    export_llava_hf,
    import_llava_hf,
    to_llava_state_dict,
)
from medm.models import build_model, load_model, save_model
from medm.models.tiny import tiny_model_config, tiny_vision
from medm.train.checkpoint import load_init_weights


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """variant name -> (medm model, tokenizer, medm checkpoint dir, LLaVA export dir); built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model, tok = variant_model(name)
            root = tmp_path_factory.mktemp(name)
            save_model(model, tok, str(root / "medm"))
            export_llava_hf(str(root / "medm"), str(root / "llava"))
            cache[name] = (model, tok, root / "medm", root / "llava")
        return cache[name]

    return get


def _messages(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_alone_reproduces_the_medm_model(exported, name):
    model, tok, _, out = exported(name)
    *_, strategy, layer = VARIANTS[name]
    llava = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    assert type(llava).__name__ == "LlavaForConditionalGeneration" and type(processor).__name__ == "LlavaProcessor"
    assert (llava.config.vision_feature_select_strategy, llava.config.vision_feature_layer) == (strategy, layer)

    image = noisy_image()
    inputs = processor.apply_chat_template(_messages(image), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    pred = Predictor(model, tok)
    ids = pred.encode([{"role": "user", "content": "<image>\n" + QUESTION}])
    pixels = pred.images([image])
    # Same prompt ids (chat template, system prompt, <image> expanded to the connector's count) and pixels.
    assert inputs["input_ids"][0].tolist() == ids
    assert ids.count(model.config.image_token_id) == model.num_image_tokens
    assert processor._get_num_multimodal_tokens(image_sizes=[(45, 61)]).num_image_tokens == [model.num_image_tokens]
    assert torch.equal(inputs["pixel_values"], pixels)

    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
        theirs = llava(**inputs).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5

    # Greedy decoding with each side's own settings (LLaVA: the exported generation_config) gives the same tokens.
    new = pred.generate_ids([ids], pixels, GenerationSettings(max_new_tokens=8))[0]
    with torch.no_grad():
        out_ids = llava.generate(**inputs, max_new_tokens=8)
    assert out_ids[0, len(ids):].tolist() == new
    assert len(set(new)) > 1
    eos = llava.generation_config.eos_token_id
    assert set(eos if isinstance(eos, list) else [eos]) == set(pred.stop_ids)


def test_default_torchvision_backend_is_close(exported):
    """transformers' default image backend (torchvision) antialiases its resize: same ids, pixels within ~1 level."""
    model, tok, _, out = exported("clip-mlp2x-qwen2")
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor.apply_chat_template(_messages(noisy_image()), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    pred = Predictor(model, tok)
    assert inputs["input_ids"][0].tolist() == pred.encode([{"role": "user", "content": "<image>\n" + QUESTION}])
    # One grey level is 1/255/std ~ 0.015 in normalised units.
    assert (inputs["pixel_values"] - pred.images([noisy_image()])).abs().max().item() < 0.05


@pytest.mark.parametrize("name", list(VARIANTS))
def test_import_then_export_gives_back_the_same_weights(exported, tmp_path, name, caplog):
    model, tok, _, out = exported(name)
    with caplog.at_level("WARNING", logger="medm.interop"):
        rc = main(["import", "llava-hf", str(out), str(tmp_path / "imported")])
    assert rc == 0
    assert not [r for r in caplog.records if r.name.startswith("medm")]  # no preprocessing caveat to report
    imported, itok = load_model(str(tmp_path / "imported"))
    ours, theirs = model.state_dict(), imported.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert imported.config.connector == model.config.connector
    assert imported.config.system_prompt == model.config.system_prompt
    for key in ("select_layer", "select_feature", "resize", "resample", "image_mean", "image_std"):
        assert imported.config.vision.get(key) == model.config.vision.get(key, imported.config.vision.get(key))
    msgs = [{"role": "user", "content": "<image>\n" + QUESTION}]
    assert Predictor(imported, itok).encode(msgs) == Predictor(model, tok).encode(msgs)

    export_llava_hf(str(tmp_path / "imported"), str(tmp_path / "again"))
    first, second = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((out / "processor_config.json").read_text()) == json.loads(
        (tmp_path / "again" / "processor_config.json").read_text())
    assert (out / "chat_template.jinja").read_text() == (tmp_path / "again" / "chat_template.jinja").read_text()


def test_imported_model_yaml_rebuilds_the_architecture(exported, tmp_path):
    """`medm train` builds OUT/model.yaml and loads OUT as stage.init_from: the imported model, exactly."""
    model, _, _, out = exported("siglip-pad-llama")
    import_llava_hf(str(out), str(tmp_path))
    rebuilt, tok = build_model(load_yaml(str(tmp_path / "model.yaml")))
    load_init_weights(rebuilt, str(tmp_path))
    ids = torch.tensor([Predictor(rebuilt, tok).encode([{"role": "user", "content": "<image>\n" + QUESTION}])])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(input_ids=ids, pixel_values=px).logits,
                                   model(input_ids=ids, pixel_values=px).logits, atol=0, rtol=0)


# llava-hf's own templates (llava-1.5 style) read list contents only: images first, then text.
LIST_ONLY_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_import_adapts_a_list_only_chat_template(exported, tmp_path):
    model, _, _, out = exported("clip-mlp2x-qwen2")
    src = tmp_path / "llava"
    shutil.copytree(out, src)
    (src / "chat_template.jinja").write_text(LIST_ONLY_TEMPLATE)
    processor = AutoProcessor.from_pretrained(src, backend="pil")
    assert processor.chat_template == LIST_ONLY_TEMPLATE
    import_llava_hf(str(src), str(tmp_path / "imported"))
    imported, tok = load_model(str(tmp_path / "imported"))
    assert imported.config.system_prompt is None
    theirs = processor.apply_chat_template(_messages(noisy_image()), add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"][0]
    ours = Predictor(imported, tok).encode([{"role": "user", "content": "<image>\n" + QUESTION}])
    assert ours == list(theirs)
    assert tok.decode(ours[-3:]).endswith("ASSISTANT:")
    # Training encodes too: the answer (with the space after "ASSISTANT:") and the template's end token.
    ids, labels = ChatFormat(tok).encode([{"role": "user", "content": "<image>\nWhat is shown?"},
                                          {"role": "assistant", "content": "A lesion."}])
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == " A lesion." + tok.eos_token


def _config(**parts):
    cfg = tiny_model_config()
    cfg.update(parts)
    return cfg


REFUSALS = {
    "3d tower": (_config(vision3d={"name": "vit3d", **tiny_vision("vit3d")},
                         connector3d={"name": "mlp", "type": "mlp2x_gelu"}), r"3D tower \(vision3d: 'vit3d'"),
    "open_clip": (_config(vision={"name": "open_clip", **tiny_vision("open_clip")}),
                  r"'open_clip'.*not a transformers vision model"),
    # Grayscale towers export (test_llava_hf_grayscale.py); RGB feeds no other channel count.
    "two channels": (_config(vision={"name": "clip", "config": {**tiny_vision("clip")["config"], "num_channels": 2},
                                     "image_mean": [0.5, 0.5], "image_std": [0.5, 0.5]}), r"2-channel images.*RGB"),
    "pooling connector": (_config(connector={"name": "spatial_pool", "pool": "avg", "stride": 2}),
                          r"connector 'spatial_pool'.*pools or resamples"),
    "deep mlp": (_config(connector={"name": "mlp", "type": "mlp3x_gelu"}), r"'mlp3x_gelu' has 3 Linear layers"),
    "text only": (tiny_model_config(vision=None), r"no 2D vision encoder"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_export_refuses_what_llava_cannot_hold(case):
    cfg, reason = REFUSALS[case]
    model, _ = build_model(cfg)
    with pytest.raises(ExportError, match=reason):
        check_exportable(model.config)


def test_export_cli_refuses_before_writing(tmp_path, capsys):
    cfg, _ = REFUSALS["pooling connector"]
    model, tok = build_model(cfg)
    save_model(model, tok, str(tmp_path / "src"))
    assert main(["export", "--to", "llava-hf", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "pools or resamples" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "out")]) == 2  # neither --merge nor --to
    assert "--merge" in capsys.readouterr().err


@pytest.mark.parametrize("edit, reason", [
    ({"vision_feature_layer": [-2, -1]}, "concatenates several layers"),
    ({"projector_hidden_act": "gelu_new"}, "projector_hidden_act 'gelu_new'"),
    ({"model_type": "medm"}, "model_type 'medm'"),
])
def test_import_refuses_settings_medm_lacks(exported, tmp_path, edit, reason, capsys):
    _, _, _, out = exported("clip-mlp2x-qwen2")
    src = tmp_path / "llava"
    shutil.copytree(out, src)
    if edit.get("model_type") == "medm":
        shutil.rmtree(src)
        src = exported("clip-mlp2x-qwen2")[2]  # a medm checkpoint, not a LLaVA one
    else:
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, **edit}))
    assert main(["import", "llava-hf", str(src), str(tmp_path / "out")]) == 2
    assert reason in capsys.readouterr().err


def test_linear_connector_exports_as_identity_second_layer(exported):
    model, _, _, out = exported("clip-cls-linear-phi3")
    weights = load_file(out / "model.safetensors")
    # On disk transformers writes the classic llava-hf names, the layout serving engines read.
    prefixes = ("language_model.model.", "language_model.lm_head.", "vision_tower.", "multi_modal_projector.")
    assert all(k.startswith(prefixes) for k in weights)
    d = model.config.text_config.hidden_size
    assert torch.equal(weights["multi_modal_projector.linear_2.weight"], torch.eye(d))
    assert not weights["multi_modal_projector.linear_2.bias"].any()
    assert torch.equal(weights["multi_modal_projector.linear_1.weight"], model.connector.mlp[0].weight)
    assert json.loads((out / "config.json").read_text())["projector_hidden_act"] == "linear"


def test_export_refuses_an_lm_head_with_bias():
    model, _ = build_model(tiny_model_config(family="phi"))  # Phi-2's lm_head has a bias; LLaVA's has none
    with pytest.raises(ExportError, match="lm_head has a bias"):
        to_llava_state_dict(model)


def test_the_generic_hf_encoder_on_a_clip_config_exports_as_clip_does(tmp_path):
    """`vision: {name: hf, model_type: clip_vision_model}` is the `clip` preset: the same LLaVA files come out."""
    torch.manual_seed(0)
    clip_model, tok = build_model(tiny_model_config(vision="clip"))
    hf_cfg = tiny_model_config(vision="clip")
    hf_cfg["vision"] = {"name": "hf", "model_type": "clip_vision_model", **tiny_vision("clip")}
    hf_model, _ = build_model(hf_cfg)
    hf_model.load_state_dict(clip_model.state_dict())
    for name, model in (("clip", clip_model), ("hf", hf_model)):
        save_model(model, tok, str(tmp_path / name / "medm"))
        export_llava_hf(str(tmp_path / name / "medm"), str(tmp_path / name / "llava"))
    ours, theirs = (load_file(str(tmp_path / n / "llava" / "model.safetensors")) for n in ("clip", "hf"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    configs = [json.loads((tmp_path / n / "llava" / "config.json").read_text()) for n in ("clip", "hf")]
    assert configs[0]["vision_config"] == configs[1]["vision_config"]
    other = tiny_model_config(vision="clip")
    other["vision"] = {"name": "hf", **tiny_vision("hf", {"model_type": "dinov2"})}
    with pytest.raises(ExportError, match="'hf' with model_type 'dinov2'.* only HF CLIP / SigLIP towers"):
        check_exportable(build_model(other)[0].config)
