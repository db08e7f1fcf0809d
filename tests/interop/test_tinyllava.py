"""`medm import tinyllava`: tiny synthetic TinyLLaVA_Factory checkpoints (finetune layout in safetensors, pretrain
layout's three folders of .bin files) become medm checkpoints whose weights, prompts and logits are TinyLLaVA's; the
reference forward is written here from the source tensors alone (HF CLIP / SigLIP, F.linear / gelu, the HF LM)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    PhiConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from medm.cli import main
from medm.config import load_yaml
from medm.infer.generate import GenerationSettings, Predictor
from medm.interop.llava_hf import ImportFormatError
from medm.interop.tinyllava import import_tinyllava
from medm.models import build_model
from medm.models.tiny import tiny_tokenizer
from medm.train.checkpoint import load_init_weights, load_trained

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
QUESTION = "Is there a lesion in the upper left?"
IMAGE_TOKEN_INDEX = -200
D_ENC, D_LLM = 32, 64
VISION = {"hidden_size": D_ENC, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}


def _phi_tokenizer():
    tok = tiny_tokenizer("none")
    tok.eos_token = "<|endoftext|>"  # phi-2's EOS, which TinyLLaVA's phi template writes
    return tok


def _llama_tokenizer():
    """A tokenizer that puts BOS in front of every text, as Llama's (TinyLLaVA's llama template, TinyLlama)."""
    tok = tiny_tokenizer("none")  # bos <s>, eos </s>
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok("a")["input_ids"][0] == bos
    return tok


CASES = {
    # finetune layout: one model.safetensors; CLIP, layer -2, CLS dropped; mlp2x_gelu; Phi (untied head with a
    # bias); as many embedding rows as tokens, so the media tokens resize the embeddings.
    "finetune-clip-phi": {"vision": "clip", "layer": -2, "strategy": "patch", "connector": "mlp2x_gelu",
                          "llm": "phi", "aspect": "pad"},
    # finetune layout; SigLIP with TinyLLaVA's `patch`, which drops the first token: a patch, as SigLIP has no CLS
    # (TinyLLaVA-Phi-2-SigLIP-3.1B's settings).
    "finetune-siglip-phi": {"vision": "siglip", "layer": -2, "strategy": "patch", "connector": "mlp2x_gelu",
                            "llm": "phi", "aspect": "square"},
    # pretrain layout: language_model/ vision_tower/ connector/ with .bin; SigLIP, every token; linear; a tied Llama
    # whose tokenizer adds BOS.
    "pretrain-siglip-llama": {"vision": "siglip", "layer": -1, "strategy": "cls_patch", "connector": "linear",
                              "llm": "llama", "aspect": "square"},
}


def _configs(case):
    vision = (CLIPVisionConfig if case["vision"] == "clip" else SiglipVisionConfig)(**VISION)
    tok = _phi_tokenizer() if case["llm"] == "phi" else _llama_tokenizer()
    common = {"hidden_size": D_LLM, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": len(tok), "max_position_embeddings": 512}
    text = PhiConfig(**common) if case["llm"] == "phi" else LlamaConfig(**common, tie_word_embeddings=True)
    return text, vision, tok


def _parts(case, seed):
    """(language_model state, vision tower state, connector state) as TinyLLaVA's modules name them."""
    text, vision, _ = _configs(case)
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(text)
    with torch.no_grad():
        for p in llm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    # named_parameters, as TinyLLaVA saves: a tied lm_head is the embedding, so it is not listed again.
    lm = {k: v.detach().clone() for k, v in llm.named_parameters()}
    tower = (CLIPVisionModel if case["vision"] == "clip" else SiglipVisionModel)(vision)
    vt = {k: v.detach().clone() for k, v in tower.named_parameters()}
    if case["connector"] == "linear":
        conn = {"_connector.weight": torch.randn(D_LLM, D_ENC) * 0.2, "_connector.bias": torch.randn(D_LLM)}
    else:
        conn = {"_connector.0.weight": torch.randn(D_LLM, D_ENC) * 0.2, "_connector.0.bias": torch.randn(D_LLM),
                "_connector.2.weight": torch.randn(D_LLM, D_LLM) * 0.2, "_connector.2.bias": torch.randn(D_LLM)}
    return lm, vt, conn


def _config_json(case, text, vision, with_parts=True):
    cfg = {"model_type": "tinyllava", "architectures": ["TinyLlavaForConditionalGeneration"],
           "llm_model_name_or_path": "microsoft/phi-2", "tokenizer_name_or_path": "microsoft/phi-2",
           "vision_model_name_or_path": f"{case['vision']}:/models/base-{case['vision']}",
           "vision_model_name_or_path2": "", "connector_type": case["connector"], "hidden_size": D_LLM,
           "vision_feature_layer": case["layer"], "vision_feature_select_strategy": case["strategy"],
           "image_aspect_ratio": case["aspect"], "image_token_index": IMAGE_TOKEN_INDEX, "tokenizer_use_fast": False,
           "tokenizer_padding_side": "right", "tokenizer_model_max_length": 2048, "use_cache": True}
    if with_parts:
        cfg["text_config"] = text.to_dict()
        cfg["vision_config"] = {**vision.to_dict(), "model_name_or_path": f"/models/base-{case['vision']}"}
    return cfg


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """case -> (source dir, flat source state with finetune-layout names, medm checkpoint dir)."""
    cache = {}

    def get(name):
        if name in cache:
            return cache[name]
        case = CASES[name]
        root = tmp_path_factory.mktemp(name)
        src = root / "src"
        src.mkdir()
        text, vision, tok = _configs(case)
        tok.save_pretrained(str(src))
        lm, vt, conn = _parts(case, seed=len(cache))
        flat = {**{"language_model." + k: v for k, v in lm.items()},
                **{"vision_tower._vision_tower." + k: v for k, v in vt.items()},
                **{"connector." + k: v for k, v in conn.items()}}
        extra = {}
        if name.startswith("finetune"):
            save_file(flat, str(src / "model.safetensors"))
            (src / "config.json").write_text(json.dumps(_config_json(case, text, vision)))
            enc = root / "clip-base"  # the base encoder: its image processor
            CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                               image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]).save_pretrained(str(enc))
            extra["encoder_path"] = str(enc)
        else:
            for folder, state in (("language_model", lm), ("vision_tower", vt), ("connector", conn)):
                (src / folder).mkdir()
                torch.save(state, src / folder / "pytorch_model.bin")
            text.save_pretrained(str(src / "language_model"))
            vision.save_pretrained(str(src / "vision_tower"))
            (src / "config.json").write_text(json.dumps(_config_json(case, text, vision, with_parts=False)))
        import_tinyllava(str(src), str(root / "out"), **extra)
        cache[name] = (src, flat, root / "out")
        return cache[name]

    return get


RULES = [("language_model.", "llm."), ("vision_tower._vision_tower.", "vision.model."),
         ("connector._connector.0.", "connector.mlp.0."), ("connector._connector.2.", "connector.mlp.2."),
         ("connector._connector.", "connector.mlp.0.")]


@pytest.mark.parametrize("name", list(CASES))
def test_every_source_weight_lands_in_its_medm_parameter(imported, name):
    _, flat, out = imported(name)
    model, tok = load_trained(str(out))
    ours = model.state_dict()
    expected = {}
    for k, v in flat.items():
        s, d = next((s, d) for s, d in RULES if k.startswith(s))
        expected[d + k[len(s):]] = v
    resized = {"llm.model.embed_tokens.weight", "llm.lm_head.weight", "llm.lm_head.bias"}
    for k, v in expected.items():
        # Rows added for <image> / <image3d> follow the source's rows, which are unchanged.
        assert torch.equal(ours[k][:v.shape[0]] if k in resized else ours[k], v), k
    tied = CASES[name]["llm"] == "llama"
    assert set(ours) == set(expected) | ({"llm.lm_head.weight"} if tied else set())
    if tied:
        assert model.llm.lm_head.weight.data_ptr() == model.llm.model.embed_tokens.weight.data_ptr()


def test_settings_map(imported):
    _, _, out = imported("finetune-clip-phi")
    cfg = load_trained(str(out))[0].config
    assert cfg.connector == {"name": "mlp", "type": "mlp2x_gelu"} and cfg.template == "tinyllava"
    v = cfg.vision
    assert (v["name"], v["select_layer"], v["select_feature"], v["resize"]) == ("clip", -2, "patch", "pad")
    assert (v["image_mean"], v["image_std"]) == ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])  # from --encoder-path
    assert cfg.llm["family"] == "phi"
    _, _, out = imported("finetune-siglip-phi")
    v = load_trained(str(out))[0].config.vision
    assert (v["name"], v["select_layer"], v["select_feature"]) == ("siglip", -2, "skip_first")
    _, _, out = imported("pretrain-siglip-llama")
    model, tok = load_trained(str(out))
    assert model.config.connector == {"name": "mlp", "type": "linear"}
    assert (model.config.vision["name"], model.config.vision["resize"]) == ("siglip", "squash")
    # The tokenizer adds BOS, so the template sits behind {{ bos_token }} in the tokenizer's own chat template.
    assert model.config.template is None and tok.chat_template.startswith("{{- bos_token -}}")


def _source_ids(tokenizer, prompt):
    """TinyLLaVA's tokenizer_image_token: chunks around "<image>" tokenized (special tokens on), BOS kept once."""
    chunks = [tokenizer(c)["input_ids"] for c in prompt.split("<image>")]
    offset = 1 if chunks[0][:1] == [tokenizer.bos_token_id] else 0
    return chunks[0] + [IMAGE_TOKEN_INDEX] + chunks[1][offset:]


def _reference_logits(case, flat, ids, pixels):
    text, vision, _ = _configs(case)
    tower = (CLIPVisionModel if case["vision"] == "clip" else SiglipVisionModel)(vision).eval()
    p = "vision_tower._vision_tower."
    tower.load_state_dict({k[len(p):]: v for k, v in flat.items() if k.startswith(p)}, strict=False)
    x = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[case["layer"]]
    if case["strategy"] == "patch":
        x = x[:, 1:]
    c = "connector._connector."
    if case["connector"] == "linear":
        x = F.linear(x, flat[c + "weight"], flat[c + "bias"])
    else:
        x = F.linear(F.gelu(F.linear(x, flat[c + "0.weight"], flat[c + "0.bias"])), flat[c + "2.weight"],
                     flat[c + "2.bias"])
    llm = AutoModelForCausalLM.from_config(text).eval()
    llm.load_state_dict({k[len("language_model."):]: v for k, v in flat.items() if k.startswith("language_model.")},
                        strict=False)
    llm.tie_weights()
    at = ids.index(IMAGE_TOKEN_INDEX)
    emb = llm.get_input_embeddings()
    embeds = torch.cat([emb(torch.tensor(ids[:at])), x[0], emb(torch.tensor(ids[at + 1:]))])
    return llm(inputs_embeds=embeds.unsqueeze(0)).logits


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_and_logits_match_tinyllava(imported, name):
    src, flat, out = imported(name)
    model, tok = load_trained(str(out))
    pred = Predictor(model, tok)
    # TinyLLaVA moves the image to the front of the question.
    msgs = [{"role": "user", "content": QUESTION + "\n<image>"}]
    prompt = f"{SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    rendered = pred.format.render(msgs, add_generation_prompt=True)
    assert rendered == (tok.bos_token + prompt if name.endswith("llama") else prompt)
    ids = pred.encode(msgs)
    ref_ids = _source_ids(AutoTokenizer.from_pretrained(str(src)), prompt)
    image = model.config.image_token_id
    # CLIP: 16 patches, CLS dropped; SigLIP with cls_patch: 16 patches; SigLIP with patch: the first one dropped.
    dropped_patch = CASES[name]["vision"] == "siglip" and CASES[name]["strategy"] == "patch"
    assert ids.count(image) == model.num_image_tokens == (15 if dropped_patch else 16)
    at = ids.index(image)
    assert ids[:at] + [IMAGE_TOKEN_INDEX] + ids[at + model.num_image_tokens:] == ref_ids
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
        theirs = _reference_logits(CASES[name], flat, ref_ids, pixels)
    vocab = theirs.shape[-1]  # the imported model has rows for <image> / <image3d> after the source's
    torch.testing.assert_close(ours[..., :vocab], theirs, atol=1e-5, rtol=1e-5)
    # Training renders "ASSISTANT: {a}<eos>" with the tokenizer's EOS, supervising " {a}<eos>".
    ids, labels = pred.format.encode(msgs + [{"role": "assistant", "content": "Yes."}])
    eos = "<|endoftext|>" if name.endswith("phi") else "</s>"
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == " Yes." + eos


def test_imported_checkpoint_is_ordinary(imported):
    """model.yaml rebuilds the architecture, stage.init_from loads the weights, Predictor generates."""
    _, _, out = imported("pretrain-siglip-llama")
    model, _ = load_trained(str(out))
    rebuilt, tok = build_model(load_yaml(str(out / "model.yaml")))
    load_init_weights(rebuilt, str(out))
    ours, theirs = rebuilt.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    pred = Predictor(rebuilt, tok)
    assert pred.format.render([{"role": "user", "content": "<image>\nHi"}]).startswith("<s>" + SYSTEM)
    new = pred.generate_ids([pred.encode([{"role": "user", "content": "<image>\n" + QUESTION}])],
                            torch.randn(1, 3, 32, 32), GenerationSettings(max_new_tokens=4))[0]
    assert 1 <= len(new) <= 4


# ---- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, reason", [
    ({"connector_type": "resampler"}, "connector_type 'resampler'"),
    ({"model_type": "lvlm"}, "use `medm import medm-vl`"),
    ({"vision_model_name_or_path2": "google/siglip-so400m-patch14-384"}, "two vision towers"),
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio 'anyres'"),
])
def test_cli_refuses_what_medm_cannot_represent(tmp_path, capsys, edit, reason):
    case = CASES["pretrain-siglip-llama"]
    text, vision, tok = _configs(case)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**_config_json(case, text, vision), **edit}))
    assert main(["import", "tinyllava", str(src), str(tmp_path / "out")]) == 2
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lora_directory_and_missing_weights_are_refused(tmp_path):
    case = CASES["finetune-clip-phi"]
    text, vision, _ = _configs(case)
    (tmp_path / "config.json").write_text(json.dumps(_config_json(case, text, vision)))
    with pytest.raises(ImportFormatError, match="no weights: neither"):
        import_tinyllava(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "connector").mkdir()
    with pytest.raises(ImportFormatError, match="without its language_model, vision_tower folder"):
        import_tinyllava(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ImportFormatError, match="LoRA adapter directory"):
        import_tinyllava(str(tmp_path), str(tmp_path / "out"))
