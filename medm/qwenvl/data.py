"""medm records -> Qwen-VL model inputs: the processor's chat template, exact labels, dynamic-resolution images.

The same records as the medm kind (LLaVA / MedM-VL, or ShareGPT through `load_records`) are rendered with the
model's own ChatML template. Each `<image>` placeholder becomes the processor's vision span
`<|vision_start|><|image_pad|>...<|image_pad|><|vision_end|>`, with one `<|image_pad|>` per LLM token of that image:
`(H / patch) * (W / patch) / merge^2` for the size `smart_resize` gives it (dynamic resolution, bounded by the
processor's min / max pixels). Images with a side below one merged patch (28 px for patch 14) are upscaled first, as
LLaMA-Factory does. Sizes come from the image headers when the dataset is built, so lengths are exact before any
pixel is decoded; `__getitem__` checks the processor's `image_grid_thw` against them.

A record whose image cannot be read (missing, corrupt, an aspect ratio the processor refuses) is a bad sample, as in
the medm kind (`data.max_bad_samples`): logged, counted and replaced by the next good sample, whether it is found
when the dataset is built or when the sample is loaded.

Labels are the assistant turns and their `<|im_end|>`, with the same exactness checks as the medm kind
(`medm.data.templates.ChatFormat`: a `TemplateError` naming the record on any mismatch). Canonical boxes in the
turns are rewritten into the model's `box_format` (`medm.qwenvl.boxes`), relative to the record's first image.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from medm.data._bad_samples import BadSamples, SkipsBadSamples
from medm.data._encoded import EncodingLog
from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN, Record, load_records, resolve_path
from medm.data.collator import DataCollator
from medm.data.dataset import (
    annotation_files,
    first_with_files,
    require_samples,
    store_modalities,
    streaming_dataset,
    use_store,
)
from medm.data.images import ImageLoadError, load_image
from medm.data.store import SampleStore, open_store
from medm.data.templates import IGNORE_INDEX, ChatFormat, TemplateError
from medm.qwenvl import boxes
from medm.qwenvl._encoder import QwenVLEncoder
from medm.qwenvl._geometry import ImageGeometry, Size, image_size  # noqa: F401  (importable from here too)

logger = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"
VISION_SPAN = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"
# Grounding tokens may sit inside an answer (Qwen2-VL boxes): they never end an assistant turn.
GROUNDING_TOKENS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                    "<|quad_end|>")
class QwenVLChatFormat(ChatFormat):
    """`ChatFormat` with the processor's chat template, where grounding tokens are answer text, not turn ends."""

    # medm writes the vision span (for `<image>`) and grounding tokens (for boxes) into the contents itself.
    content_tokens = (*ChatFormat.content_tokens, "<|vision_start|>", IMAGE_PAD, "<|vision_end|>", *GROUNDING_TOKENS)

    def __init__(self, processor, system_prompt: str | None = None):
        tokenizer = processor.tokenizer
        if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
            tokenizer.chat_template = processor.chat_template
        super().__init__(tokenizer, None, system_prompt)
        if getattr(processor, "chat_template", None):
            self.jinja = processor.chat_template
        self.special_ids -= {tokenizer.convert_tokens_to_ids(t) for t in GROUNDING_TOKENS}


def expand_images(ids: Sequence[int], labels: Sequence[int] | None, pad_id: int, counts: Sequence[int],
                  max_length: int | None = None) -> tuple[list[int], list[int] | None, int]:
    """Repeat the k-th `<|image_pad|>` `counts[k]` times (labels -100), keeping at most `max_length` ids.

    Truncation keeps a prefix and never cuts an image: when an image's run would cross `max_length` the cut moves
    before it, and it and every later image are dropped.

    Returns:
        (ids, labels or None, number of images kept).
    """
    out: list[int] = []
    out_labels: list[int] | None = [] if labels is not None else None
    k = 0
    for i, tok in enumerate(ids):
        n = counts[k] if tok == pad_id else 1
        if max_length is not None and len(out) + n > max_length:
            break
        out.extend([tok] * n)
        if out_labels is not None:
            out_labels.extend([IGNORE_INDEX] * n if tok == pad_id else [labels[i]])
        k += tok == pad_id
    return out, out_labels, k


class QwenVLInputs:
    """Records -> token ids, labels and pixel inputs for one Qwen-VL processor; shared by the dataset and inference.

    Args:
        processor: the model's processor (tokenizer with the Qwen special tokens, Qwen2-VL-style image processor).
        box_format: the model's box convention (`medm.qwenvl.boxes`).
        system_prompt: system turn for conversations without one; None: the template's default.
    """

    def __init__(self, processor, box_format: str, system_prompt: str | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.box_format = boxes.check_format(box_format)
        self.format = QwenVLChatFormat(processor, system_prompt)
        ip = processor.image_processor
        self.patch, self.merge = int(ip.patch_size), int(ip.merge_size)
        self.factor = self.patch * self.merge
        self.min_pixels, self.max_pixels = int(ip.size["shortest_edge"]), int(ip.size["longest_edge"])
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        # Ids the model must never generate: a vision id without pixels behind it breaks the next step.
        self.vision_ids = sorted({self.tokenizer.convert_tokens_to_ids(t) for t in (
            IMAGE_PAD, "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")} - {None})

    # ---- images ----------------------------------------------------------------------------------------------
    def _upscaled(self, size: Size) -> Size:
        w, h = size
        return max(w, self.factor), max(h, self.factor)

    def geometry(self, size: Size) -> ImageGeometry:
        """How an image of `size` (width, height) is resized and how many tokens it gives."""
        w, h = self._upscaled(size)
        rh, rw = smart_resize(h, w, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return ImageGeometry(tuple(size), (rw, rh), self.patch, self.merge)

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """RGB, with sides below one merged patch upscaled to it (the processor then applies smart_resize)."""
        image = image.convert("RGB")
        size = self._upscaled(image.size)
        return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)

    def pixels(self, images: Sequence[Image.Image], geometries: Sequence[ImageGeometry],
               record_id: str) -> dict[str, torch.Tensor]:
        """`pixel_values` (sum of patches, C * T * patch^2) and `image_grid_thw` (n, 3) of prepared images,
        checked against the geometries the token counts were computed from."""
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        want = torch.tensor([g.grid_thw for g in geometries], dtype=torch.long)
        if not torch.equal(out["image_grid_thw"].long(), want):
            raise ValueError(f"record {record_id!r}: the processor gives image grids {out['image_grid_thw'].tolist()} "
                             f"but the token counts were computed for {want.tolist()} (did an image change size?)")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": want}

    # ---- text ------------------------------------------------------------------------------------------------
    def messages(self, conversation: Record | list[dict[str, str]], geometries: Sequence[ImageGeometry],
                 record_id: str) -> list[dict[str, str]]:
        """Chat messages with `<image>` -> the vision span and canonical boxes -> the model's convention."""
        msgs = conversation.messages() if isinstance(conversation, Record) else [dict(m) for m in conversation]
        for m in msgs:
            if IMAGE3D_TOKEN in m["content"]:
                raise TemplateError(f"record {record_id!r}: Qwen-VL models take 2D images only, not {IMAGE3D_TOKEN}")
            if m["role"] == "user":
                m["content"] = m["content"].replace(IMAGE_TOKEN, VISION_SPAN)
            if m["role"] in ("user", "assistant") and boxes.has_boxes(m["content"]):
                if not geometries:
                    raise TemplateError(f"record {record_id!r}: {m['role']} turn holds boxes but the record has no "
                                        "image to place them on")
                g = geometries[0]
                m["content"] = boxes.to_model(m["content"], self.box_format, g.original, g.resized)
        return msgs

    def _check_images(self, ids: Sequence[int], n: int, record_id: str) -> None:
        got = sum(1 for i in ids if i == self.image_pad_id)
        if got != n:
            raise TemplateError(f"record {record_id!r}: the rendering holds {got} {IMAGE_PAD} token(s) for {n} "
                                "image(s)")

    def encode(self, conversation: Record | list[dict[str, str]], geometries: Sequence[ImageGeometry],
               record_id: str | None = None) -> tuple[list[int], list[int]]:
        """Training ids and labels, one `<|image_pad|>` per image (expand with `expand`)."""
        rid = record_id if record_id is not None else getattr(conversation, "id", "<messages>")
        ids, labels = self.format.encode(self.messages(conversation, geometries, rid), record_id=rid)
        self._check_images(ids, len(geometries), rid)
        return ids, labels

    def encode_prompt(self, conversation: Record | list[dict[str, str]], geometries: Sequence[ImageGeometry],
                      record_id: str | None = None) -> list[int]:
        """Inference prompt ids up to `<|im_start|>assistant\\n`, images expanded (trailing answers left out)."""
        rid = record_id if record_id is not None else getattr(conversation, "id", "<messages>")
        ids = self.format.encode_prompt(self.messages(conversation, geometries, rid))
        self._check_images(ids, len(geometries), rid)
        return self.expand(ids, None, geometries)[0]

    def expand(self, ids: Sequence[int], labels: Sequence[int] | None, geometries: Sequence[ImageGeometry],
               max_length: int | None = None) -> tuple[list[int], list[int] | None, int]:
        return expand_images(ids, labels, self.image_pad_id, [g.num_tokens for g in geometries], max_length)

    def answer_text(self, ids: Sequence[int], geometry: ImageGeometry | None) -> str:
        """Generated ids -> answer text, boxes in canonical pixels of the image (grounding tokens kept to parse)."""
        keep = [i for i in ids if i not in self.format.special_ids]  # grounding ids are not in special_ids
        text = self.tokenizer.decode(keep, skip_special_tokens=False).strip()
        if geometry is not None:
            text = boxes.from_model(text, self.box_format, geometry.original, geometry.resized)
        return text


class QwenVLCollator(DataCollator):
    """`DataCollator` plus `image_grid_thw` (concatenated, item order) and `mm_token_type_ids` (1 on image tokens).

    Returns:
        `input_ids`, `attention_mask` (B, T), `labels` (B, T) when items have them, `mm_token_type_ids` (B, T),
        and when the batch has images `pixel_values` (sum of patches, D) and `image_grid_thw` (n_images, 3).
    """

    def __init__(self, tokenizer: Any, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        super().__init__(tokenizer, padding_side, pad_to_multiple_of)
        self.image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        grids = [it["image_grid_thw"] for it in items if it.get("image_grid_thw") is not None]
        if grids:
            batch["image_grid_thw"] = torch.cat(grids)
        # M-RoPE reads which positions are image tokens (0 text, 1 image); padding is text.
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_pad_id).to(torch.int32)
        return batch


@dataclass
class _Sample:
    record: Record
    geometries: list[ImageGeometry]  # of every image of the record
    ids: array  # one <|image_pad|> per image
    labels: array
    length: int  # after expansion and truncation
    n_images: int  # images left after truncation


class QwenVLDataset(SkipsBadSamples, torch.utils.data.Dataset):
    """Conversation records as Qwen-VL inputs (see the module doc).

    Args:
        records: normalised records (`medm.data.annotations.load_records`), encoded here; or a `SampleStore`
            encoded by a `QwenVLEncoder` with the same settings (`build_qwenvl_dataset`).
        processor: the model's processor.
        box_format: the model's box convention.
        image_dir: base directory of relative image paths.
        system_prompt: system prompt for records without one; None: the template's default.
        max_length: most ids per sample, image ids included.
        max_bad_samples: distinct samples whose images may fail to load (here or in `__getitem__`) before it raises
            `TooManyBadSamples` (a count, a fraction of the samples when < 1, None: no limit).

    Items: `input_ids` (T,), `labels` (T,), `pixel_values` (patches, D) or None, `image_grid_thw` (n, 3) or None,
    `length` T.
    """

    def __init__(self, records: Sequence[Record] | SampleStore, processor, *, box_format: str,
                 image_dir: str | None = None, system_prompt: str | None = None, max_length: int = 2048,
                 max_bad_samples: float | None = 100):
        self.inputs = QwenVLInputs(processor, box_format, system_prompt)
        self.encoder = QwenVLEncoder(self.inputs, image_dir, max_length)
        self.processor = processor
        self.image_dir = image_dir
        self.max_length = max_length
        if isinstance(records, SampleStore):
            records.check_encoder(self.encoder)
            self.check_records(records)
            self.samples: Sequence[_Sample] | SampleStore = records  # encoded already, memory-mapped
            self.num_dropped = records.num_dropped
            self.bad_samples = BadSamples(len(records), max_bad_samples)
            for j, reason in records.bad_reasons():
                self.mark_bad(j, ValueError(reason))  # the ImageLoadError's message, kept by the build
            return
        records = list(records)
        self.check_records(records)
        self.samples = []
        log = EncodingLog()
        unreadable: list[tuple[int, ImageLoadError]] = []
        for rec in records:
            try:
                sample = self.encode_sample(rec)
            except ImageLoadError as e:
                # Kept as a sample known to be bad, so it is counted and replaced like one found while training.
                unreadable.append((len(self.samples), e))
                self.samples.append(_Sample(rec, [], array("l"), array("l"), 0, len(rec.image)))
                continue
            except TemplateError as e:
                log.failed(e)
                continue
            if sample is None:
                log.dropped(rec.id)
                continue
            self.samples.append(sample)
        log.finish(len(records), max_length, logger)
        self.num_dropped = log.num_dropped
        # A bad sample's length is unknown; the longest lets any good sample of its modality stand in for it.
        longest = max((s.length for s in self.samples), default=0)
        for j, _ in unreadable:
            self.samples[j].length = longest
        self.bad_samples = BadSamples(len(self.samples), max_bad_samples)
        for j, e in unreadable:
            self.mark_bad(j, e)

    @staticmethod
    def check_records(records: Sequence[Record] | SampleStore) -> None:
        """Raise ValueError for a record with 3D volumes (Qwen-VL models take 2D images only)."""
        volumes = first_with_files(records, "image3d")
        if volumes is not None:
            raise ValueError(f"record {volumes!r} has 3D volumes (`image3d`); Qwen-VL models take 2D images only")

    def encode_sample(self, rec: Record) -> _Sample | None:
        """One record's ids and labels (one `<|image_pad|>` per image) and image geometries from the headers, or
        None when no supervised token is left within `max_length`; the streaming dataset encodes with this too.

        Raises:
            ImageLoadError: an image header cannot be read (a bad sample).
            TemplateError: the rendering does not line up exactly (names the record).
        """
        out = self.encoder.encode(rec)  # the record store encodes with the same encoder (image sizes cached there)
        if out is None:
            return None
        return _Sample(rec, out["image_geometries"], array("l", out["ids"]), array("l", out["labels"]),
                       out["length"], out["n_images"])

    @property
    def lengths(self) -> list[int] | np.ndarray:
        """Ids per sample (text + image tokens, after truncation), for length-grouped batching (numpy from a
        store)."""
        if isinstance(self.samples, SampleStore):
            return self.samples.lengths
        return [s.length for s in self.samples]

    @property
    def modalities(self) -> Sequence[str]:
        if isinstance(self.samples, SampleStore):
            return store_modalities(self.samples)  # no volumes here: image or text
        return ["image" if s.n_images else "text" for s in self.samples]

    def record(self, i: int) -> Record:
        return self.samples[i].record

    def collator(self) -> QwenVLCollator:
        """The collator for this dataset's items (right padding, for training)."""
        return QwenVLCollator(self.inputs.tokenizer)

    def __len__(self) -> int:
        return len(self.samples)

    load_errors = (ImageLoadError, OSError)

    def _modality_key(self, i: int) -> bool:
        return self.samples[i].n_images > 0

    def _item(self, i: int) -> dict[str, Any]:
        return self.sample_item(self.samples[i])

    def sample_item(self, s: _Sample) -> dict[str, Any]:
        """The item of an encoded sample, its images loaded (raises one of `load_errors` when they fail)."""
        ids, labels, _ = self.inputs.expand(s.ids, s.labels, s.geometries, self.max_length)
        item: dict[str, Any] = {"input_ids": torch.tensor(ids, dtype=torch.long),
                                "labels": torch.tensor(labels, dtype=torch.long), "pixel_values": None,
                                "image_grid_thw": None, "length": len(ids)}
        if s.n_images:
            images = [self.inputs.prepare_image(load_image(resolve_path(p, self.image_dir)))
                      for p in s.record.image[:s.n_images]]
            item.update(self.inputs.pixels(images, s.geometries[:s.n_images], s.record.id))
        return item


def build_qwenvl_dataset(data_args, model, processor) -> QwenVLDataset:
    """The training dataset of a `data:` section (medm.data.DataArgs) for a qwen-vl model."""
    if not data_args.path:
        raise ValueError("data.path: give the annotation file(s) to train or evaluate on")
    if data_args.template is not None:
        raise ValueError(f"data.template: {data_args.template!r}; a qwen-vl model renders conversations with its "
                         "processor's chat template, so leave template null")
    settings = model.medm_settings
    system_prompt = data_args.system_prompt if data_args.system_prompt is not None else settings.get("system_prompt")

    if data_args.streaming:
        records = []
    elif use_store(data_args):
        encoder = QwenVLEncoder(QwenVLInputs(processor, settings["box_format"], system_prompt), data_args.image_dir,
                                data_args.max_length)
        records = open_store(annotation_files(data_args.path), encoder, cache_dir=data_args.cache_dir,
                             num_proc=data_args.num_proc, decode=encoder.decoder())
    else:
        records = load_records(data_args.path, for_training=True)
    dataset = QwenVLDataset(records, processor,
                            box_format=settings["box_format"], image_dir=data_args.image_dir,
                            system_prompt=system_prompt, max_length=data_args.max_length,
                            max_bad_samples=data_args.max_bad_samples)
    if data_args.streaming:
        return streaming_dataset(data_args, dataset)  # the dataset without records encodes the stream's records
    require_samples(dataset, data_args)
    return dataset

