"""The qwen-vl kind's record encoder: records -> ids, labels and image geometries, for `QwenVLDataset` and the
record store (medm.data.store) alike, so both give the same ids."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from medm.data.annotations import Record, resolve_path
from medm.data.images import ImageLoadError
from medm.data.store import tokenizer_fingerprint
from medm.data.templates import IGNORE_INDEX
from medm.qwenvl._geometry import ImageGeometry, Size, image_size


def checked_image_size(path: str) -> Size:
    """(width, height) of an image from its header.

    Raises:
        ImageLoadError: unreadable, or an aspect ratio above 200 (the processors refuse it).
    """
    try:
        w, h = image_size(path)
    except ImageLoadError:
        raise
    except (OSError, ValueError) as e:
        raise ImageLoadError(path, str(e)) from None
    if max(w, h) / max(min(w, h), 1) > 200:
        raise ImageLoadError(path, f"{w}x{h} pixels: Qwen-VL processors refuse aspect ratios above 200")
    return w, h


def decode_geometries(patch: int, merge: int, extra: dict[str, Any]) -> dict[str, Any]:
    """A store row's `geometries` column ([original w, h, resized w, h] per image) -> `ImageGeometry`s."""
    return {"geometries": [ImageGeometry((g[0], g[1]), (g[2], g[3]), patch, merge) for g in extra["geometries"]]}


class QwenVLEncoder:
    """Records -> the qwen-vl kind's sample columns; image sizes are read from the headers under `image_dir`.

    Args:
        inputs: the model's `medm.qwenvl.data.QwenVLInputs` (processor, box format, system prompt).
        image_dir: base directory of relative image paths.
        max_length: most ids per sample, image ids included.
    """

    kind = "qwen-vl"
    media_errors = (ImageLoadError,)  # an unreadable image makes a known-bad sample, not an error

    def __init__(self, inputs, image_dir: str | None, max_length: int):
        self.inputs, self.image_dir, self.max_length = inputs, image_dir, max_length
        self._sizes: dict[str, Size] = {}

    def fingerprint(self) -> dict:
        ip = self.inputs.processor.image_processor
        return {"tokenizer": tokenizer_fingerprint(self.inputs.tokenizer), "jinja": self.inputs.format.jinja,
                "system_prompt": self.inputs.format.system_prompt, "box_format": self.inputs.box_format,
                "image_processor": json.dumps(ip.to_dict(), sort_keys=True, default=str),
                "image_dir": None if self.image_dir is None else os.path.realpath(self.image_dir),
                "max_length": self.max_length}

    def features(self) -> dict:
        from datasets import List, Value  # defers datasets

        return {"geometries": List(List(Value("int32")))}

    def empty_extra(self) -> dict:
        return {"geometries": []}

    def decoder(self):
        """The store's `decode` for rows of this encoder (picklable)."""
        return functools.partial(decode_geometries, self.inputs.patch, self.inputs.merge)

    def size(self, path: str) -> Size:
        full = resolve_path(path, self.image_dir)
        if full not in self._sizes:
            self._sizes[full] = checked_image_size(full)
        return self._sizes[full]

    def encode(self, record: Record) -> dict | None:
        """`ids`, `labels` (one `<|image_pad|>` per image), `length`, `n_images` (kept), `n_volumes` (0),
        `geometries` (rows) and `image_geometries` (`ImageGeometry`s), or None when no supervised token is left.

        Raises:
            ImageLoadError: an image header cannot be read (a bad sample).
            TemplateError: the rendering does not line up exactly (names the record).
        """
        geometries = [self.inputs.geometry(self.size(p)) for p in record.image]
        ids, labels = self.inputs.encode(record, geometries)
        full, lab, kept = self.inputs.expand(ids, labels, geometries, self.max_length)
        if lab.count(IGNORE_INDEX) == len(lab):  # no supervised token (count: C speed, 5% of a store build)
            return None
        return {"ids": ids, "labels": labels, "length": len(full), "n_images": kept, "n_volumes": 0,
                "geometries": [[*g.original, *g.resized] for g in geometries], "image_geometries": geometries}
