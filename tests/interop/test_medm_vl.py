"""`medm import medm-vl`: tiny synthetic MedM-VL checkpoints in both config formats (sharded safetensors and .bin)
become medm checkpoints whose weights, prompts and logits are MedM-VL's; the reference forward is written here from
the source tensors alone (HF SigLIP, F.linear / gelu, nn.MultiheadAttention, the HF causal LM)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from medm.cli import main
from medm.config import load_yaml
from medm.infer.generate import GenerationSettings, Predictor
from medm.interop.medm_vl import import_medm_vl
from medm.models.tiny import tiny_tokenizer
from medm.models.vision.vit3d import ViT3DEncoder
from medm.train.args import parse_train_config
from medm.train.checkpoint import load_trained
from medm.train.trainer import run_training

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
QUESTION = "Is there a lesion in the upper left?"
IMAGE_TOKEN_INDEX = -200  # MedM-VL's image id in input_ids
D_ENC, D_LLM, VOCAB = 32, 64, 1040  # VOCAB > tokenizer size: spare rows, as Qwen2.5's 151936 > 151665
N_QUERIES, N_SLICES = 4, 3


def _text_config():
    return Qwen2Config(hidden_size=D_LLM, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=True)


def _vision_config():
    return SiglipVisionConfig(hidden_size=D_ENC, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)


def _source_state(connector: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """MedM-VL's state dict: `llm.` (lm_head tied, so not saved), `encoder_image.encoder.`, `connector_image.`."""
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(_text_config())
    with torch.no_grad():  # wider weights, so greedy decoding and logits are not flat
        for p in llm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    state = {"llm." + k: v for k, v in llm.state_dict().items() if k != "lm_head.weight"}
    state.update({"encoder_image.encoder." + k: v for k, v in SiglipVisionModel(_vision_config()).state_dict().items()})
    c = "connector_image."
    if connector == "attn_pooling":
        attn = nn.MultiheadAttention(D_ENC, 8, batch_first=True)
        state[c + "query"] = torch.randn(N_QUERIES, D_ENC)
        state.update({c + "attn." + k: v.detach().clone() for k, v in attn.state_dict().items()})
    state.update({c + "connector.0.weight": torch.randn(D_LLM, D_ENC) * 0.2,
                  c + "connector.0.bias": torch.randn(D_LLM),
                  c + "connector.2.weight": torch.randn(D_LLM, D_LLM) * 0.2,
                  c + "connector.2.bias": torch.randn(D_LLM)})
    return {k: v.contiguous() for k, v in state.items()}


def _write_sharded(state, out, shards=2):
    """The HF Trainer's layout: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _write_tokenizer(out):
    tok = tiny_tokenizer("chatml")  # eos <|im_end|>, pad <|endoftext|>: Qwen2.5-Instruct's
    tok.save_pretrained(str(out))
    return tok


def _current_config(llm_dir, enc_dir, connector="mlp"):
    """The current MedM-VL format: `lvlm_` keys naming the base models."""
    cfg = {"model_type": "lvlm", "lvlm_llm_type": "qwen2", "lvlm_llm_name_or_path": str(llm_dir),
           "lvlm_llm_max_length": 2048, "lvlm_llm_padding_side": "right",
           "lvlm_llm_attn_implementation": "flash_attention_2", "lvlm_encoder_image_type": "siglip",
           "lvlm_encoder_image_name_or_path": str(enc_dir), "lvlm_encoder_image_select_layer": -1,
           "lvlm_encoder_image_select_feature": "cls_patch", "lvlm_connector_image_type": connector,
           "lvlm_connector_image_name": "mlp2x_gelu", "lvlm_connector_image_path": None, "hidden_size": D_LLM}
    cfg.update({f"lvlm_{k}": None for k in ("encoder_image3d_type", "encoder_image3d_name_or_path",
                                            "encoder_image3d_select_layer", "encoder_image3d_select_feature",
                                            "connector_image3d_type", "connector_image3d_name",
                                            "connector_image3d_path")})
    return cfg


def _released_config(connector="attn_pooling", select_feature="cls_patch"):
    """The released models' format: no `lvlm_` prefix, nested base configs, no model_type; the names are hub ids
    this machine cannot reach."""
    vision = _vision_config().to_dict()
    return {"llm_type": "qwen2", "llm_name_or_path": "Qwen/Qwen2.5-3B-Instruct", "llm_max_length": 2048,
            "llm_padding_side": "right", "llm_attn_implementation": "flash_attention_2",
            "llm_config": _text_config().to_dict(), "encoder_image_type": "siglip",
            "encoder_image_name_or_path": "google/siglip-base-patch16-256-multilingual",
            "encoder_image_select_layer": -1, "encoder_image_select_feature": select_feature,
            "encoder_image_config": vision, "connector_image_type": connector,
            "connector_image_name": "mlp2x_gelu", "connector_image_path": None,
            "connector_image_config": {"connector_type": connector, "connector_name": "mlp2x_gelu",
                                       "input_dim": D_ENC, "output_dim": D_LLM},
            "encoder_image3d_type": None, "connector_image3d_type": None, "hidden_size": D_LLM,
            "architectures": ["LVLMForConditionalGeneration"], "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Base model directories for the current format: the LLM's config, SigLIP's config and image processor."""
    root = tmp_path_factory.mktemp("bases")
    _text_config().save_pretrained(str(root / "llm"))
    _vision_config().save_pretrained(str(root / "siglip"))
    SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(str(root / "siglip"))
    return root


@pytest.fixture(scope="module")
def imported(tmp_path_factory, bases):
    """kind -> (source dir, source state, medm checkpoint dir), each imported once."""
    cache = {}

    def get(kind):
        if kind in cache:
            return cache[kind]
        root = tmp_path_factory.mktemp(kind)
        src = root / "src"
        src.mkdir()
        _write_tokenizer(src)
        extra = {}
        if kind == "current-mlp":
            state = _source_state("mlp")
            cfg = _current_config(bases / "llm", bases / "siglip")
            _write_sharded(state, src)
        elif kind == "released-attn":
            state = _source_state("attn_pooling", seed=1)
            cfg = _released_config()
            torch.save(state, src / "pytorch_model.bin")
        elif kind == "released-attn-patch":  # `patch` on SigLIP: MedM-VL drops the first token, a patch
            state = _source_state("attn_pooling", seed=3)
            cfg = _released_config(select_feature="patch")
            torch.save(state, src / "pytorch_model.bin")
        else:  # ct-chest: the released 2D encoder + attention pooling, reading volumes slice by slice
            state = _source_state("attn_pooling", seed=2)
            cfg = _released_config()
            _write_sharded(state, src, shards=3)
            extra["image3d_slices"] = N_SLICES
        (src / "config.json").write_text(json.dumps(cfg))
        import_medm_vl(str(src), str(root / "out"), **extra)
        cache[kind] = (src, state, root / "out")
        return cache[kind]

    return get


# ---- the reference: MedM-VL's forward, from the source tensors ------------------------------------------------
def _reference_features(state, pixel_values, connector, select_feature="cls_patch"):
    """encoder_image (SigLIP, hidden_states[-1]: every token with cls_patch, all but the first with patch) ->
    connector_image, by hand."""
    enc = SiglipVisionModel(_vision_config()).eval()
    p = "encoder_image.encoder."
    enc.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
    x = enc(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
    if select_feature == "patch":
        x = x[:, 1:]
    c = "connector_image."
    if connector == "attn_pooling":
        attn = nn.MultiheadAttention(D_ENC, 8, batch_first=True).eval()
        attn.load_state_dict({k[len(c + "attn."):]: v for k, v in state.items() if k.startswith(c + "attn.")})
        query = state[c + "query"].unsqueeze(0).expand(x.shape[0], -1, -1)
        x = attn(query, x, x)[0]
    x = F.gelu(F.linear(x, state[c + "connector.0.weight"], state[c + "connector.0.bias"]))
    return F.linear(x, state[c + "connector.2.weight"], state[c + "connector.2.bias"])


def _reference_logits(state, ids, features):
    """The HF causal LM on the text embeddings with the features spliced in at each -200 (one image)."""
    llm = AutoModelForCausalLM.from_config(_text_config()).eval()
    llm.load_state_dict({k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}, strict=False)
    llm.tie_weights()
    at = ids.index(IMAGE_TOKEN_INDEX)
    emb = llm.get_input_embeddings()
    embeds = torch.cat([emb(torch.tensor(ids[:at])), features[0], emb(torch.tensor(ids[at + 1:]))])
    return llm(inputs_embeds=embeds.unsqueeze(0)).logits


def _source_ids(tokenizer, prompt, placeholder):
    """MedM-VL's tokenization: the text split at the placeholder, each chunk tokenized, -200 between."""
    chunks = [tokenizer(c)["input_ids"] for c in prompt.split(placeholder)]
    return chunks[0] + [IMAGE_TOKEN_INDEX] + chunks[1]


def _collapse(ids, media_id):
    """medm ids with the run of media ids as MedM-VL's single -200."""
    out = []
    for i in ids:
        if i == media_id:
            if not out or out[-1] != IMAGE_TOKEN_INDEX:
                out.append(IMAGE_TOKEN_INDEX)
        else:
            out.append(i)
    return out


def _rename(state, rules):
    out = {}
    for k, v in state.items():
        src, dst = next((s, d) for s, d in rules if k.startswith(s))
        out[dst + k[len(src):]] = v
    return out


RULES = {
    "current-mlp": [("llm.", "llm."), ("encoder_image.encoder.", "vision.model."),
                    ("connector_image.connector.", "connector.mlp.")],
    "released-attn": [("llm.", "llm."), ("encoder_image.encoder.", "vision.model."),
                      ("connector_image.", "connector.")],
    "released-attn-patch": [("llm.", "llm."), ("encoder_image.encoder.", "vision.model."),
                            ("connector_image.", "connector.")],
    "ct-chest": [("llm.", "llm."), ("encoder_image.encoder.", "vision3d.encoder.model."),
                 ("connector_image.", "connector3d.")],
}


@pytest.mark.parametrize("kind", list(RULES))
def test_every_source_weight_lands_in_its_medm_parameter(imported, kind):
    _, state, out = imported(kind)
    model, _ = load_trained(str(out))
    ours = model.state_dict()
    expected = _rename(state, RULES[kind])
    # Every source tensor, unchanged, under its medm name; no medm weight without a source (lm_head is tied).
    assert all(torch.equal(ours[k], v) for k, v in expected.items())
    assert set(ours) == set(expected) | {"llm.lm_head.weight"}
    assert model.llm.lm_head.weight.data_ptr() == model.llm.model.embed_tokens.weight.data_ptr()


def test_current_format_reads_base_configs_and_image_processor(imported, bases):
    src, _, out = imported("current-mlp")
    model, tok = load_trained(str(out))
    cfg = model.config
    assert cfg.connector == {"name": "mlp", "type": "mlp2x_gelu"} and cfg.template == "medm-vl"
    assert (cfg.vision["name"], cfg.vision["select_layer"], cfg.vision["select_feature"]) == ("siglip", -1, "cls_patch")
    assert (cfg.vision["image_mean"], cfg.vision["resize"], cfg.vision["resample"]) == ([0.5] * 3, "squash", "bicubic")
    assert cfg.llm["family"] == "qwen2" and cfg.llm["attn_implementation"] == "sdpa"
    assert model.num_image_tokens == 16  # every SigLIP patch token
    # The tokenizer's rows fill the embedding matrix (placeholders for the spare rows), so model.yaml rebuilds it.
    assert len(tok) == VOCAB and tok.eos_token == "<|im_end|>"


def test_released_attention_pooling_config(imported):
    _, _, out = imported("released-attn")
    model, _ = load_trained(str(out))
    assert model.config.connector == {"name": "attention_pool", "layout": "medm-vl", "num_queries": N_QUERIES,
                                      "num_heads": 8, "mlp_type": "mlp2x_gelu"}
    assert model.num_image_tokens == N_QUERIES
    _, _, out = imported("released-attn-patch")
    assert load_trained(str(out))[0].config.vision["select_feature"] == "skip_first"


@pytest.mark.parametrize("kind, connector", [("current-mlp", "mlp"), ("released-attn", "attn_pooling"),
                                             ("released-attn-patch", "attn_pooling")])
def test_prompt_and_logits_match_medm_vl(imported, kind, connector):
    src, state, out = imported(kind)
    model, tok = load_trained(str(out))
    pred = Predictor(model, tok)
    msgs = [{"role": "user", "content": "<image>\n" + QUESTION}]
    # MedM-VL's conv_version qwen2 prompt, byte for byte.
    prompt = f"{SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    assert pred.format.render(msgs, add_generation_prompt=True) == prompt
    ids = pred.encode(msgs)
    ref_ids = _source_ids(AutoTokenizer.from_pretrained(str(src)), prompt, "<image>")
    assert _collapse(ids, model.config.image_token_id) == ref_ids
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
        select = "patch" if kind.endswith("-patch") else "cls_patch"
        theirs = _reference_logits(state, ref_ids, _reference_features(state, pixels, connector, select))
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # The answer format: " {a}<|im_end|>" supervised, as MedM-VL trains.
    ids, labels = pred.format.encode(msgs + [{"role": "assistant", "content": "Yes."}])
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == " Yes.<|im_end|>"


def test_ct_chest_reads_volumes_slice_by_slice(imported):
    """SigLIP on each slice, the slices' tokens concatenated, attention-pooled to the query count."""
    src, state, out = imported("ct-chest")
    model, tok = load_trained(str(out))
    assert model.vision is None and model.config.vision3d["name"] == "slices"
    assert model.config.vision3d["num_slices"] == N_SLICES and model.config.vision3d["medm_vl_ct"] == "stored"
    assert model.num_image3d_tokens == N_QUERIES
    pred = Predictor(model, tok)
    msgs = [{"role": "user", "content": "<image3d>\n" + QUESTION}]
    prompt = f"{SYSTEM} USER: <image3d>\n{QUESTION} ASSISTANT:"
    assert pred.format.render(msgs, add_generation_prompt=True) == prompt
    ids = pred.encode(msgs)
    ref_ids = _source_ids(AutoTokenizer.from_pretrained(str(src)), prompt, "<image3d>")
    assert _collapse(ids, model.config.image3d_token_id) == ref_ids
    volume = torch.randn(1, 3, N_SLICES, 32, 32)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids]), pixel_values_3d=volume).logits
        # MedM-VL: (B, C, N, H, W) -> N images -> encoder -> (B, N * L, D) -> connector_image.
        slices = volume.transpose(1, 2).reshape(N_SLICES, 3, 32, 32)
        enc = SiglipVisionModel(_vision_config()).eval()
        p = "encoder_image.encoder."
        enc.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
        feats = enc(pixel_values=slices, output_hidden_states=True).hidden_states[-1].reshape(1, -1, D_ENC)
        c = "connector_image."
        attn = nn.MultiheadAttention(D_ENC, 8, batch_first=True).eval()
        attn.load_state_dict({k[len(c + "attn."):]: v for k, v in state.items() if k.startswith(c + "attn.")})
        x = attn(state[c + "query"].unsqueeze(0), feats, feats)[0]
        x = F.linear(F.gelu(F.linear(x, state[c + "connector.0.weight"], state[c + "connector.0.bias"])),
                     state[c + "connector.2.weight"], state[c + "connector.2.bias"])
        theirs = _reference_logits(state, ref_ids, x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- 3D encoder: M3D-CLIP + spatial pooling -----------------------------------------------------------------------
# medm vit3d native name -> M3D-CLIP (MONAI ViT) name, under `vision_encoder.`; the inverse of what vit3d reads.
_M3D = [("patch_embed.proj.", "patch_embedding.patch_embeddings.1."),
        ("pos_embed", "patch_embedding.position_embeddings"), ("cls_token", "cls_token"),
        (".attn.proj.", ".attn.out_proj."), (".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2.")]
VIT3D = {"image_size": [8, 16, 16], "patch_size": [2, 4, 4], "hidden_size": D_ENC, "num_layers": 2, "num_heads": 2,
         "mlp_dim": 64}


def _m3d_name(native):
    for a, b in _M3D:
        native = native.replace(a, b)
    return "vision_encoder." + native


def test_m3d_clip_with_spatial_pooling(tmp_path, bases):
    torch.manual_seed(3)
    vit = ViT3DEncoder(**VIT3D, checkpoint_format="m3d", final_norm=True)  # M3D-CLIP has a final norm MedM-VL skips
    native = vit.state_dict()
    state = {"encoder_image3d.encoder." + _m3d_name(k): v for k, v in native.items()}
    unused = {"encoder_image3d.encoder.language_encoder.embeddings.word_embeddings.weight": torch.randn(10, 8),
              "encoder_image3d.encoder.mm_vision_proj.weight": torch.randn(8, D_ENC),
              "encoder_image3d.encoder.logit_scale": torch.tensor(2.0)}
    state.update(unused)
    llm = _source_state("mlp")
    state.update({k: v for k, v in llm.items() if k.startswith("llm.")})
    c = "connector_image3d.connector."
    state.update({c + "0.weight": torch.randn(D_LLM, D_ENC), c + "0.bias": torch.randn(D_LLM),
                  c + "2.weight": torch.randn(D_LLM, D_LLM), c + "2.bias": torch.randn(D_LLM)})
    src = tmp_path / "src"
    src.mkdir()
    _write_tokenizer(src)
    save_file(state, str(src / "model.safetensors"))
    m3d_cfg = {"model_type": "m3d_clip", "img_size": VIT3D["image_size"], "patch_size": VIT3D["patch_size"],
               "hidden_size": D_ENC, "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "in_channels": 1}
    (tmp_path / "m3d").mkdir()
    (tmp_path / "m3d" / "config.json").write_text(json.dumps(m3d_cfg))
    cfg = _current_config(bases / "llm", bases / "siglip")
    cfg.update({"lvlm_encoder_image_type": None, "lvlm_connector_image_type": None,
                "lvlm_encoder_image3d_type": "m3dclip", "lvlm_encoder_image3d_name_or_path": "GoodBaiBai88/M3D-CLIP",
                "lvlm_encoder_image3d_select_layer": -1, "lvlm_encoder_image3d_select_feature": "patch",
                "lvlm_connector_image3d_type": "spatial_pooling", "lvlm_connector_image3d_name": "mlp2x_gelu"})
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["import", "medm-vl", str(src), str(tmp_path / "out"), "--encoder3d-path", str(tmp_path / "m3d")]) == 0

    model, _ = load_trained(str(tmp_path / "out"))
    assert model.vision is None and model.config.vision3d["checkpoint_format"] == "m3d"
    assert model.config.connector3d == {"name": "spatial_pool", "pool": "avg", "stride": 2, "mlp_type": "mlp2x_gelu",
                                        "uneven": "floor"}
    ours = model.state_dict()
    # The vision tower (not M3D's final norm, text tower or projections) and the pooling MLP, unchanged.
    tower = {k: v for k, v in native.items() if not k.startswith("norm.")}
    assert {k for k in ours if k.startswith("vision3d.")} == {"vision3d." + k for k in tower}
    assert all(torch.equal(ours["vision3d." + k], v) for k, v in tower.items())
    for i in ("0", "2"):
        assert torch.equal(ours[f"connector3d.mlp.{i}.weight"], state[c + i + ".weight"])
    assert "left out" in (tmp_path / "out" / "README.md").read_text()
    # 2x average pooling of the (4, 4, 4) patch grid (64 tokens), then the MLP.
    feats = torch.randn(1, 64, D_ENC)
    with torch.no_grad():
        pooled = F.avg_pool3d(feats.transpose(1, 2).reshape(1, D_ENC, 4, 4, 4), 2).flatten(2).transpose(1, 2)
        want = F.linear(F.gelu(F.linear(pooled, state[c + "0.weight"], state[c + "0.bias"])), state[c + "2.weight"],
                        state[c + "2.bias"])
        torch.testing.assert_close(model.connector3d(feats), want)


# ---- the imported checkpoint is an ordinary medm checkpoint -------------------------------------------------------
def test_imported_checkpoint_generates_and_trains(imported, tmp_path):
    _, _, out = imported("current-mlp")
    pred = Predictor.from_pretrained(str(out))
    new = pred.generate_ids([pred.encode([{"role": "user", "content": "<image>\n" + QUESTION}])],
                            torch.randn(1, 3, 32, 32), GenerationSettings(max_new_tokens=4))[0]
    assert 1 <= len(new) <= 4
    records = [{"id": "r0", "conversations": [{"from": "human", "value": "Describe the image."},
                                              {"from": "gpt", "value": "There is no lesion."}]}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    cfg = parse_train_config({
        "model": load_yaml(str(out / "model.yaml")),
        "stage": {"init_from": str(out), "vision": "frozen", "connector": "full", "llm": "full"},
        "data": {"path": str(tmp_path / "train.json"), "max_length": 256},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 1,
                  "learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 1, "save_strategy": "no",
                  "report_to": [], "disable_tqdm": True, "device": "cpu", "plot_loss": False}})
    trainer = run_training(cfg)
    assert trainer.state.global_step == 1
    assert (tmp_path / "run" / "config.json").is_file()


# ---- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, reason", [
    ({"model_type": "tinyllava"}, "use `medm import tinyllava`"),
    ({"connector_image_type": "qformer"}, "connector type 'qformer'"),
    ({"encoder_image_type": "medmclip2d"}, "encoder type 'medmclip2d'"),
    ({"llm_config": None}, "Qwen/Qwen2.5-3B-Instruct"),  # no nested config, and the hub id is not reachable
])
def test_cli_refuses_what_medm_cannot_represent(tmp_path, capsys, edit, reason):
    src = tmp_path / "src"
    src.mkdir()
    save_file(_source_state("attn_pooling"), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({**_released_config(), **edit}))
    assert main(["import", "medm-vl", str(src), str(tmp_path / "out")]) == 2
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
