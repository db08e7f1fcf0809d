"""Batched generation (left padding, KV cache) and token streaming; shared by `medm infer`, eval and the playground."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from medm.data._media import image_tensor, volume_tensor
from medm.data.annotations import Record, resolve_path
from medm.data.images import ImageLoadError
from medm.data.templates import ChatFormat, expand_media
from medm.data.volumes import VolumeLoadError
from medm.models.checkpoint import load_trained
from medm.registry import KIND, VISION

# What reading one record's media may raise: with `predict(on_error=...)`, that record alone goes unanswered.
MEDIA_ERRORS = (ImageLoadError, VolumeLoadError, OSError, MemoryError)


@dataclass
class GenerationSettings:
    """Decoding settings; greedy by default (temperature 0)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1

    def kwargs(self) -> dict:
        sample = self.temperature > 0
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": sample, "num_beams": self.num_beams}
        if sample:
            out.update(temperature=self.temperature, top_p=self.top_p)
        return out


class Predictor:
    """A model, its tokenizer and its preprocessing, ready to answer records.

    Args:
        template, system_prompt: override the model config's (e.g. to match how a stage was trained).
        image_dir: base directory of relative image paths in records.

    Each model kind names its Predictor (`ModelKind.predictor`: the qwen-vl kind's renders records with its
    processor); `predictor_for(model, tokenizer)` and `Predictor.from_pretrained` build that one.
    """

    def __init__(self, model, tokenizer, *, template: str | None = None, system_prompt: str | None = None,
                 image_dir: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.format = ChatFormat(tokenizer, template if template is not None else cfg.template,
                                 system_prompt if system_prompt is not None else cfg.system_prompt)
        self.sizes = self.format.media_sizes(model.num_image_tokens, model.num_image3d_tokens)
        self.image_preprocess = VISION.get(cfg.vision["name"]).preprocessor(cfg.vision) if cfg.vision else None
        vision3d = getattr(cfg, "vision3d", None)
        self.volume_preprocess = VISION.get(vision3d["name"]).preprocessor(vision3d) if vision3d else None
        self.image_dir = image_dir
        # Stop at the end of the assistant turn; for some families (Phi-3) that is not the tokenizer's EOS.
        self.stop_ids = sorted({i for i in (tokenizer.eos_token_id, self.format.end_of_turn_id) if i is not None})

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str | None = None, device: str | None = None,
                        trust_remote_code: bool = False, **kwargs) -> Predictor:
        """Open any checkpoint (`medm.models.checkpoint.load_trained`) with its kind's Predictor; `dtype` None
        keeps the saved one; `trust_remote_code` runs Python files the checkpoint ships (off unless the user asks)."""
        model, tokenizer = load_trained(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return predictor_for(model, tokenizer, **kwargs) if cls is Predictor else cls(model, tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def images(self, paths_or_images: Iterable[str | Image.Image], blank: bool = False) -> torch.Tensor | None:
        """(n, C, H, W) through the encoder's preprocessing; `blank` swaps every image for a black one."""
        items = list(paths_or_images)
        if not items:
            return None
        if self.image_preprocess is None:
            raise ValueError("this model has no 2D vision encoder, but the input has images")
        if blank:
            return torch.stack([self.image_preprocess.blank() for _ in items])
        return torch.stack([self.image_preprocess(x) if isinstance(x, Image.Image) else
                            image_tensor(self.image_preprocess, resolve_path(x, self.image_dir)) for x in items])

    def volumes(self, paths: Iterable[str], blank: bool = False, modality: str | None = None) -> torch.Tensor | None:
        """(n, C, D, H, W) through the 3D encoder's preprocessing; `blank` swaps every volume for a black one;
        `modality` is the record's (CT, MR, ...) for `intensity: auto`."""
        items = list(paths)
        if not items:
            return None
        if self.volume_preprocess is None:
            raise ValueError("this model has no 3D vision encoder, but the input has volumes (`image3d`)")
        if blank:
            return torch.stack([self.volume_preprocess.blank() for _ in items])
        return torch.stack([volume_tensor(self.volume_preprocess, resolve_path(p, self.image_dir), modality)
                            for p in items])

    def encode(self, conversation: Record | list[dict[str, str]]) -> list[int]:
        """Prompt ids with image placeholders expanded."""
        ids, _, _ = expand_media(self.format.encode_prompt(conversation), None, self.sizes)
        return ids

    # ---- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], pixel_values: torch.Tensor | None,
                     settings: GenerationSettings, streamer=None,
                     pixel_values_3d: torch.Tensor | None = None) -> list[list[int]]:
        """Left-pad a batch of prompts and generate; returns the new ids of each prompt.

        pixel_values: (n_images, C, H, W) and pixel_values_3d: (n_volumes, C, D, H, W), in the prompts' order.
        """
        pad = self.tokenizer.pad_token_id
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        dev = self.device
        kw = {}
        if pixel_values is not None:
            kw["pixel_values"] = pixel_values.to(dev, self.model.dtype)
        if pixel_values_3d is not None:
            kw["pixel_values_3d"] = pixel_values_3d.to(dev, self.model.dtype)
        # A generated <image> / <image3d> id would be read as a placeholder without features at the next step.
        out = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), pad_token_id=pad,
                                  eos_token_id=self.stop_ids, streamer=streamer, use_cache=True,
                                  suppress_tokens=sorted(self.sizes) or None, **settings.kwargs(), **kw)
        return [row[T:].tolist() for row in out.cpu()]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def load_media(self, record: Record, blank: bool = False) -> None:
        """Read and preprocess a record's images and volumes as its prediction does; raises one of MEDIA_ERRORS
        naming the file."""
        self.images(record.image, blank)
        self.volumes(record.image3d, blank, record.extra.get("modality"))

    def predict(self, records: Iterable[Record], *, batch_size: int = 8, settings: GenerationSettings | None = None,
                blank_images: bool = False, on_error: Callable[[Record, Exception], None] | None = None
                ) -> Iterator[tuple[Record, str]]:
        """Answer records in batches, yielding `(record, prediction)` in input order as each batch finishes.

        `blank_images` swaps every image and volume for a black one (how much do answers depend on them?).
        `on_error(record, error)`: a record whose media fail to load (one of MEDIA_ERRORS) is handed to it and not
        yielded, and the rest of its batch is answered; None: the error ends the iteration.
        """
        settings = settings or GenerationSettings()
        batch: list[Record] = []
        for rec in records:
            batch.append(rec)
            if len(batch) == batch_size:
                yield from self._answer(batch, settings, blank_images, on_error)
                batch = []
        if batch:
            yield from self._answer(batch, settings, blank_images, on_error)

    def _answer(self, batch: list[Record], settings: GenerationSettings, blank: bool, on_error):
        if on_error is None:
            yield from self._predict_batch(batch, settings, blank)
            return
        try:
            answered = list(self._predict_batch(batch, settings, blank))  # media load before generation starts
        except MEDIA_ERRORS:
            # Find the records at fault (their media again, one by one) and answer the others.
            good = []
            for rec in batch:
                try:
                    self.load_media(rec, blank)
                except MEDIA_ERRORS as e:
                    on_error(rec, e)
                else:
                    good.append(rec)
            answered = list(self._predict_batch(good, settings, blank)) if good else []
        yield from answered

    def _predict_batch(self, batch: list[Record], settings: GenerationSettings, blank: bool):
        prompts = [self.encode(r) for r in batch]
        pix = [self.images(r.image, blank) for r in batch]
        pix = [p for p in pix if p is not None]
        pixel_values = torch.cat(pix) if pix else None
        vols = [v for v in (self.volumes(r.image3d, blank, r.extra.get("modality")) for r in batch) if v is not None]
        pixel_values_3d = torch.cat(vols) if vols else None
        for rec, new in zip(batch, self.generate_ids(prompts, pixel_values, settings, pixel_values_3d=pixel_values_3d)):
            yield rec, self.decode(new)

    def stream(self, messages: list[dict[str, str]], images: list[str | Image.Image] | None = None,
               settings: GenerationSettings | None = None, volumes: list[str] | None = None) -> Iterator[str]:
        """Yield the answer's text as it grows, token by token (for the playground).

        messages: chat turns `{"role": "user" | "assistant" | "system", "content"}`, `<image>` placeholders in user
        turns, one per image in `images`, and `<image3d>` placeholders, one per volume path in `volumes`.
        """
        settings = settings or GenerationSettings()
        prompt = self.encode(messages)
        pixel_values = self.images(images or [])
        pixel_values_3d = self.volumes(volumes or [])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        yield from stream_text(lambda: self.generate_ids([prompt], pixel_values, settings, streamer,
                                                         pixel_values_3d=pixel_values_3d), streamer)


def predictor_for(model, tokenizer, **kwargs) -> Predictor:
    """The Predictor of `model`'s kind (`model.medm_kind` in medm.registry.KIND) with `Predictor`'s arguments."""
    return KIND.get(model.medm_kind).predictor()(model, tokenizer, **kwargs)


def stream_text(generate: Callable[[], object], streamer: TextIteratorStreamer) -> Iterator[str]:
    """Run `generate()` (which feeds `streamer`) in a thread and yield the text as it grows, piece by piece; an
    error raised by `generate` is raised here, in the caller's thread, once the stream ends."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            generate()
        except BaseException as e:  # surfaced in the caller's thread below
            errors.append(e)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    worker.join()
    if errors:
        raise errors[0]
