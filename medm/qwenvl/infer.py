"""`QwenVLPredictor`: `medm.infer.Predictor` for qwen-vl models (the qwen-vl kind's, `predictor_for` builds it).

Same interface and output as for the medm kind: records in, prediction strings out, batched (left padding, KV
cache) or streamed. Each image keeps its own resolution (the prompt holds its number of image tokens), and boxes
come back in canonical form: `{"bbox_2d": [x1, y1, x2, y2], "label": ...}` in pixels of the original image, so
`medm eval` scores them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from medm.data.annotations import Record, resolve_path
from medm.data.images import load_image
from medm.infer.generate import GenerationSettings, Predictor, stream_text
from medm.qwenvl.data import ImageGeometry, QwenVLCollator, QwenVLInputs


class QwenVLPredictor(Predictor):
    """A qwen-vl model and its processor, ready to answer records.

    Args:
        model: a qwen-vl model (medm.qwenvl.model); its `config.medm` gives the box format and system prompt.
        processor: its processor.
        template: must be None (the processor's chat template renders prompts).
        system_prompt: overrides the model's.
        image_dir: base directory of relative image paths in records.
    """

    def __init__(self, model, processor, *, template: str | None = None, system_prompt: str | None = None,
                 image_dir: str | None = None):
        if template is not None:
            raise ValueError(f"template {template!r}: a qwen-vl model prompts with its processor's chat template; "
                             "leave template unset")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        settings = model.medm_settings
        self.inputs = QwenVLInputs(processor, settings["box_format"],
                                   system_prompt if system_prompt is not None else settings.get("system_prompt"))
        self.format = self.inputs.format
        self.image_dir = image_dir
        self.stop_ids = sorted({i for i in (self.tokenizer.eos_token_id, self.format.end_of_turn_id) if i is not None})
        self.collator = QwenVLCollator(self.tokenizer, padding_side="left")

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def load_images(self, paths_or_images: Iterable[str | Image.Image], blank: bool = False) -> list[Image.Image]:
        """Images as stored (paths resolved under `image_dir`); `blank` swaps each for a black one of its size."""
        pil = [x if isinstance(x, Image.Image) else load_image(resolve_path(x, self.image_dir))
               for x in paths_or_images]
        return [Image.new("RGB", im.size) for im in pil] if blank else pil

    def load_media(self, record: Record, blank: bool = False) -> None:
        """Read a record's images as its prediction does (raises ImageLoadError naming the file)."""
        self.load_images(record.image, blank)

    def prepare(self, conversation: Record | list[dict[str, str]], images: Iterable[str | Image.Image] = (),
                blank: bool = False) -> tuple[dict[str, Any], ImageGeometry | None]:
        """A prompt item for the collator (`input_ids`, `pixel_values`, `image_grid_thw`) and the first image's
        geometry (which boxes in the answer refer to)."""
        pil = self.load_images(images, blank)
        geometries = [self.inputs.geometry(im.size) for im in pil]
        rid = getattr(conversation, "id", "<messages>")
        item: dict[str, Any] = {"input_ids": torch.tensor(self.inputs.encode_prompt(conversation, geometries, rid))}
        if pil:
            item.update(self.inputs.pixels([self.inputs.prepare_image(im) for im in pil], geometries, rid))
        return item, geometries[0] if geometries else None

    def encode(self, conversation: Record | list[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation without images (with images, use `prepare`: their sizes set the ids)."""
        return self.prepare(conversation)[0]["input_ids"].tolist()

    # ---- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_items(self, items: list[dict[str, Any]], settings: GenerationSettings,
                       streamer=None) -> list[list[int]]:
        """Left-pad prepared items into one batch and generate; returns the new ids of each."""
        batch = self.collator(items)
        T = batch["input_ids"].shape[1]
        dev = self.device
        kw = {k: v.to(dev) for k, v in batch.items()}
        if "pixel_values" in kw:
            kw["pixel_values"] = kw["pixel_values"].to(self.model.dtype)
        # A generated vision id would be read as a placeholder without pixels at the next step.
        out = self.model.generate(**kw, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids,
                                  streamer=streamer, use_cache=True, suppress_tokens=self.inputs.vision_ids,
                                  **settings.kwargs())
        return [row[T:].tolist() for row in out.cpu()]

    def generate_ids(self, prompts, pixel_values, settings, streamer=None):
        raise NotImplementedError("a qwen-vl prompt needs its image grids: use prepare() + generate_items(), or "
                                  "predict() / stream()")

    def decode(self, ids: list[int], geometry: ImageGeometry | None = None) -> str:
        """Answer text; boxes in canonical pixels of the image `geometry` describes."""
        return self.inputs.answer_text(ids, geometry)

    def _predict_batch(self, batch: list[Record], settings: GenerationSettings, blank: bool):
        prepared = [self.prepare(r, r.image, blank) for r in batch]
        new = self.generate_items([item for item, _ in prepared], settings)
        for rec, (_, geometry), ids in zip(batch, prepared, new):
            yield rec, self.decode(ids, geometry)

    def stream(self, messages: list[dict[str, str]], images: list[str | Image.Image] | None = None,
               settings: GenerationSettings | None = None, volumes: list[str] | None = None) -> Iterator[str]:
        """Yield the answer's text as it grows (the last text has its boxes in canonical form)."""
        if volumes:
            raise ValueError("Qwen-VL models take 2D images only; this input has a 3D volume")
        settings = settings or GenerationSettings()
        item, geometry = self.prepare(messages, images or [])
        # Grounding tokens are special tokens: keep them in the stream and drop the others (e.g. <|im_end|>).
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False)
        drop = [self.tokenizer.convert_ids_to_tokens(i) for i in self.format.special_ids]
        new: list[list[int]] = []
        for text in stream_text(lambda: new.extend(self.generate_items([item], settings, streamer)), streamer):
            for token in drop:
                text = text.replace(token, "")
            yield text.strip()
        yield self.decode(new[0], geometry)
