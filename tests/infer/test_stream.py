"""`stream_text`, the streaming helper both kinds' predictors answer the playground through, and `predictor_for`,
which picks a model's Predictor by its kind."""

import pytest
import torch
from transformers import TextIteratorStreamer

from medm.infer import Predictor, predictor_for, stream_text
from medm.models.tiny import tiny_tokenizer
from medm.registry import KIND


def test_stream_text_yields_the_text_as_it_grows():
    tok = tiny_tokenizer("chatml")
    ids = tok("the lung fields are clear no effusion", add_special_tokens=False).input_ids
    streamer = TextIteratorStreamer(tok)

    def generate():
        for i in ids:
            streamer.put(torch.tensor([i]))
        streamer.end()

    texts = list(stream_text(generate, streamer))
    assert len(texts) > 1  # word by word, not all at the end
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert texts[-1] == tok.decode(ids)


def test_stream_text_raises_the_generation_error_in_the_callers_thread():
    tok = tiny_tokenizer("chatml")
    streamer = TextIteratorStreamer(tok)

    def generate():
        streamer.put(torch.tensor(tok("the lung", add_special_tokens=False).input_ids))
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        list(stream_text(generate, streamer))


def test_predictor_for_builds_the_predictor_its_kind_registers(tiny_model):
    model, tok = tiny_model
    assert KIND.get(model.medm_kind) is KIND.get("medm")
    predictor = predictor_for(model, tok, system_prompt="Answer briefly.")
    assert type(predictor) is KIND.get("medm").predictor() is Predictor
    assert predictor.format.system_prompt == "Answer briefly."
