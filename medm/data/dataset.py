"""`ConversationDataset`: records -> token ids, exact labels and pixel values, ready for `DataCollator`.

Text is encoded once, when the dataset is built (fast: one render and tokenization per record and per assistant
turn), so lengths are exact before any image is read, template problems surface at once (one `TemplateError`
listing every bad record), and samples left without a supervised token are dropped, counted and logged. Images are
loaded and preprocessed in `__getitem__`. Training encodes through the record store (medm.data.store, `data.store:
arrow`): once, by `data.num_proc` processes, into memory-mapped Arrow files every rank shares; the dataset then reads
its samples from there with the same `ConversationEncoder`'s ids.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from medm.config import ConfigError, arg
from medm.data._bad_samples import BadSamples, SkipsBadSamples
from medm.data._encoded import EncodingLog
from medm.data._media import image_tensor, volume_tensor
from medm.data.annotations import AnnotationError, Record, load_records, resolve_path
from medm.data.images import ImageLoadError
from medm.data.sampler import ModalityCodes
from medm.data.store import SampleStore, open_store, tokenizer_fingerprint
from medm.data.streaming import StreamingDataset
from medm.data.templates import IGNORE_INDEX, ChatFormat, TemplateError, expand_media
from medm.data.volumes import VolumeLoadError
from medm.registry import KIND, VISION

logger = logging.getLogger(__name__)


@dataclass
class DataArgs:
    path: str | list | None = arg(None, "annotation file(s): LLaVA / MedM-VL or ShareGPT records, JSON list or JSONL")
    image_dir: str | None = arg(None, "directory that relative image / volume paths start from; null: as written")
    max_length: int = arg(2048, "most tokens per sample, image tokens included; longer samples are cut at the end, "
                                "never inside an image (that image and later ones are dropped)")
    template: str | None = arg(None, "registered chat template overriding the model's (e.g. `pretrain` for caption "
                                     "pretraining); null: the model's")
    system_prompt: str | None = arg(None, "system prompt overriding the model's; null: the model's")
    packing: bool = arg(False, "pack several samples into each row of up to pack_length tokens (no attention "
                               "across samples; medm kind only); the batch size then counts rows. See "
                               "medm.data.packing and docs/performance.md")
    pack_length: int | None = arg(None, "tokens per packed row; null: max_length")
    mixture: dict | None = arg(None, "data mixture settings (medm.data.mixture.MixtureArgs: num_samples, "
                                     "replacement, shuffle, seed); a mixture is used when this is set or when a "
                                     "`path` entry is a mapping with ratio / order / image_dir")
    max_bad_samples: float | None = arg(100, "training samples whose image / volume fails to load (corrupt, "
                                             "truncated, missing) are skipped, logged with file and id, replaced by "
                                             "the next good sample and counted (`bad_samples` in the logs); more "
                                             "distinct bad samples than this is an error naming the last files. A "
                                             "count, a fraction of the samples when < 1, 0 to fail at the first, "
                                             "null for no limit. See docs/reliability.md")
    val_path: str | list | None = arg(None, "validation records (same formats as path), evaluated during training at "
                                            "train.eval_strategy; not with val_size")
    val_size: float | None = arg(None, "split validation records off `path` by record id: a fraction (< 1) or a "
                                       "count (>= 1) of the distinct ids; reproducible for a val_seed, never a "
                                       "sample in both (medm.data.validation); 0 or null: none", ge=0)
    val_seed: int = arg(0, "seed of the val_size split (independent of train.seed)", ge=0)
    store: str = arg("arrow", "where encoded samples live: `arrow`, a tokenized record store memory-mapped from "
                              "data.cache_dir, built once by data.num_proc workers and shared by every rank "
                              "(medm.data.store); `memory`, Python objects built in each process")
    cache_dir: str | None = arg(None, "directory of the record stores, one per fingerprint of the data files, "
                                      "tokenizer and settings; null: $MEDM_CACHE_DIR, else ~/.cache/medm/records. "
                                      "Put it on a shared disk for a multi-node job (`medm data prepare`)")
    num_proc: int | None = arg(None, "processes that tokenize records into the store; null: every core (one per "
                                     "500 records at least)", ge=1)
    streaming: bool = arg(False, "read, tokenize and load records on the fly, sharded by rank and DataLoader worker "
                                 "(data larger than memory or the disk cache; UTF-8 JSONL files are read line by "
                                 "line); needs train.max_steps > 0; no length grouping, packing, mixture or "
                                 "val_size. See medm.data.streaming and docs/data.md")
    streaming_shuffle_buffer: int = arg(0, "with streaming: draw samples at random from a buffer of this many "
                                           "encoded samples (token ids only, media load later); 0: file order",
                                        ge=0)
    streaming_seed: int = arg(0, "with streaming: seed of the shuffle buffer (with the epoch, pass and shard)",
                              ge=0)


class ConversationEncoder:
    """Records -> the medm kind's sample columns (ids and labels with one id per media placeholder); the one
    encode path of `ConversationDataset` and of the record store (medm.data.store), so both give the same ids.

    Args: as `ConversationDataset`'s of the same names.
    """

    kind = "medm"
    media_errors: tuple[type[BaseException], ...] = ()  # media are read while training, not here

    def __init__(self, tokenizer, *, num_image_tokens: int, num_image3d_tokens: int = 0, template: str | None = None,
                 system_prompt: str | None = None, max_length: int = 2048):
        self.format = ChatFormat(tokenizer, template, system_prompt)
        self.sizes = self.format.media_sizes(num_image_tokens, num_image3d_tokens)
        self.max_length = max_length

    def fingerprint(self) -> dict:
        return {"tokenizer": tokenizer_fingerprint(self.format.tokenizer), "jinja": self.format.jinja,
                "system_prompt": self.format.system_prompt, "max_length": self.max_length,
                "sizes": sorted(self.sizes.items())}

    def features(self) -> dict:
        return {}

    def empty_extra(self) -> dict:
        return {}

    def encode(self, record: Record) -> dict | None:
        """`ids`, `labels`, `length` (after expansion and truncation), `n_images`, `n_volumes` (kept), or None
        when no supervised token is left within max_length.

        Raises:
            TemplateError: the rendering does not line up with the record (the message names it).
        """
        ids, labels = self.format.encode(record)
        full, lab, kept = expand_media(ids, labels, self.sizes, self.max_length)
        if lab.count(IGNORE_INDEX) == len(lab):  # no supervised token (count: C speed, 5% of a store build)
            return None
        return {"ids": ids, "labels": labels, "length": len(full), "n_images": kept.get(self.format.image_id, 0),
                "n_volumes": kept.get(self.format.image3d_id, 0)}


def first_with_files(records: Sequence[Record] | SampleStore, key: str) -> str | None:
    """Id of the first record listing `image` / `image3d` files, or None."""
    if isinstance(records, SampleStore):
        return records.first_with_files(key)
    return next((r.id for r in records if getattr(r, key)), None)


@dataclass
class _Sample:
    record: Record
    ids: array  # token ids, one per media placeholder
    labels: array
    length: int  # after expansion and truncation
    n_images: int  # images left after truncation
    n_volumes: int


class ConversationDataset(SkipsBadSamples, torch.utils.data.Dataset):
    """Conversation records as model inputs.

    Args:
        records: normalised records (`medm.data.annotations.load_records`), encoded here; or a `SampleStore`
            already encoded by a `ConversationEncoder` with the same settings (`build_conversation_dataset`).
        tokenizer: fast tokenizer with `<image>` / `<image3d>` added (`medm.models.builder.add_media_tokens`).
        num_image_tokens: ids one `<image>` expands to (`model.num_image_tokens`).
        num_image3d_tokens: ids one `<image3d>` expands to (`model.num_image3d_tokens`).
        image_preprocess: PIL image -> (C, H, W) tensor (the encoder's `ImagePreprocess`); needed when any
            record has images.
        volume_preprocess: path -> (C, D, H, W) tensor; the hook for 3D loading (`medm.data.volumes`, a later
            issue); needed when any record has volumes.
        image_dir: base directory of relative image / volume paths.
        template: registered chat template name; None: the tokenizer's own.
        system_prompt: system prompt for records without one; None: the template's default.
        max_length: most ids per sample, image ids included.
        max_bad_samples: distinct samples whose media may fail to load before `__getitem__` raises (a count, a
            fraction of the samples when < 1, None: no limit); each failure is logged with the file and record id,
            counted in `bad_samples` and replaced by the next good sample (see `__getitem__`).

    Items are dicts: `input_ids` (T,) long, `labels` (T,) long (-100 where not supervised), `pixel_values`
    (n_images, C, H, W) float or None, `pixel_values_3d` (n_volumes, C, D, H, W) float or None, `length` T.
    """

    # What a sample's media may raise while loading: skipped and counted (`max_bad_samples`), not fatal. OSError
    # covers what the loaders do not wrap (a permission denied, an I/O error on a network disk).
    load_errors = (ImageLoadError, VolumeLoadError, OSError)

    def __init__(self, records: Sequence[Record] | SampleStore, tokenizer, *, num_image_tokens: int,
                 num_image3d_tokens: int = 0,
                 image_preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
                 volume_preprocess: Callable[[str], torch.Tensor] | None = None, image_dir: str | None = None,
                 template: str | None = None, system_prompt: str | None = None, max_length: int = 2048,
                 max_bad_samples: float | None = 100):
        self.encoder = ConversationEncoder(tokenizer, num_image_tokens=num_image_tokens,
                                           num_image3d_tokens=num_image3d_tokens, template=template,
                                           system_prompt=system_prompt, max_length=max_length)
        self.format = self.encoder.format
        self.image_preprocess = image_preprocess
        self.volume_preprocess = volume_preprocess
        self.image_dir = image_dir
        self.max_length = max_length
        self.sizes = self.encoder.sizes
        self.num_image_tokens, self.num_image3d_tokens = num_image_tokens, num_image3d_tokens
        if not isinstance(records, SampleStore):
            records = list(records)
        self.check_records(records)
        if isinstance(records, SampleStore):
            records.check_encoder(self.encoder)
            self.samples: Sequence[_Sample] | SampleStore = records  # encoded already, memory-mapped
            self.num_dropped = records.num_dropped
            num_records = records.meta["num_records"]
        else:
            self.samples = []
            log = EncodingLog()
            for rec in records:
                try:
                    sample = self.encode_sample(rec)
                except TemplateError as e:
                    log.failed(e)
                    continue
                if sample is None:
                    log.dropped(rec.id)
                    continue
                self.samples.append(sample)
            log.finish(len(records), max_length, logger)
            self.num_dropped = log.num_dropped
            num_records = len(records)
        self.bad_samples = BadSamples(len(self.samples), max_bad_samples)
        logger.info("conversation dataset: %d samples from %d records, %d dropped", len(self.samples), num_records,
                    self.num_dropped)

    def encode_sample(self, rec: Record) -> _Sample | None:
        """One record's ids and labels (media placeholders not expanded yet), or None when no supervised token is
        left within `max_length`; the streaming dataset (medm.data.streaming) encodes with this too.

        Raises:
            TemplateError: the record's rendering does not line up exactly (names the record).
        """
        out = self.encoder.encode(rec)  # the record store encodes with the same encoder
        if out is None:
            return None
        return _Sample(rec, array("l", out["ids"]), array("l", out["labels"]), out["length"], out["n_images"],
                       out["n_volumes"])

    def check_records(self, records: Sequence[Record] | SampleStore) -> None:
        """Raise ValueError for media the model cannot take (images without a 2D encoder, volumes without 3D)."""
        num_image_tokens, num_image3d_tokens = self.num_image_tokens, self.num_image3d_tokens
        with_images = first_with_files(records, "image")
        if with_images is not None and (self.image_preprocess is None or num_image_tokens < 1):
            raise ValueError(f"record {with_images!r} has images, but the dataset has no image_preprocess or "
                             f"num_image_tokens={num_image_tokens}: does the model have a 2D vision encoder?")
        with_volumes = first_with_files(records, "image3d")
        if with_volumes is not None and (self.volume_preprocess is None or num_image3d_tokens < 1):
            raise ValueError(f"record {with_volumes!r} has 3D volumes (`image3d`), but the dataset has no "
                             f"volume_preprocess or num_image3d_tokens={num_image3d_tokens}: 3D loading needs a "
                             "model with a 3D encoder and medm.data.volumes")

    # ---- what samplers read without loading anything ---------------------------------------------------------
    @property
    def lengths(self) -> list[int] | np.ndarray:
        """Ids per sample (text + image tokens, after truncation), for length-grouped batching (numpy from a
        store: no object per sample)."""
        if isinstance(self.samples, SampleStore):
            return self.samples.lengths
        return [s.length for s in self.samples]

    @property
    def modalities(self) -> Sequence[str]:
        """Per sample: `image3d` (has volumes), `image` (has 2D images) or `text` (a store's: `ModalityCodes`)."""
        if isinstance(self.samples, SampleStore):
            return store_modalities(self.samples)
        return ["image3d" if s.n_volumes else "image" if s.n_images else "text" for s in self.samples]

    def record(self, i: int) -> Record:
        return self.samples[i].record

    # ---- items --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def _modality_key(self, i: int) -> tuple[bool, bool]:
        s = self.samples[i]
        return s.n_images > 0, s.n_volumes > 0

    def _item(self, i: int) -> dict[str, torch.Tensor | int | None]:
        return self.sample_item(self.samples[i])

    def sample_item(self, s: _Sample) -> dict[str, torch.Tensor | int | None]:
        """The item of an encoded sample, its media loaded (raises one of `load_errors` when they fail)."""
        ids, labels, _ = expand_media(s.ids, s.labels, self.sizes, self.max_length)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": self._images(s.record, s.n_images),
            "pixel_values_3d": self._volumes(s.record, s.n_volumes),
            "length": len(ids),
        }

    def _images(self, record: Record, n: int) -> torch.Tensor | None:
        """(n, C, H, W): the first n images of the record (later ones were cut by truncation), or None."""
        if n == 0:
            return None
        return torch.stack([image_tensor(self.image_preprocess, resolve_path(p, self.image_dir))
                            for p in record.image[:n]])

    def _volumes(self, record: Record, n: int) -> torch.Tensor | None:
        """(n, C, D, H, W) through `volume_preprocess` (the 3D hook), or None."""
        if n == 0:
            return None
        modality = record.extra.get("modality")  # for intensity: auto (CT window or MR percentiles)
        return torch.stack([volume_tensor(self.volume_preprocess, resolve_path(p, self.image_dir), modality)
                            for p in record.image3d[:n]])


def store_modalities(store: SampleStore) -> ModalityCodes:
    """`image3d`, `image` or `text` per sample of a store, one byte each."""
    codes = (store.n_images > 0).view(np.uint8)  # bytes throughout: no 8-byte temporary per sample
    codes[store.n_volumes > 0] = 2
    return ModalityCodes(codes, ("text", "image", "image3d"))


def annotation_files(path: str | list) -> list[str]:
    """`data.path` (a file or a list of files) as a list."""
    return [path] if isinstance(path, str) else list(path)


def build_dataset(data_args: DataArgs, model, tokenizer) -> ConversationDataset:
    """The dataset for a model: its template, system prompt, image token counts and encoder preprocessing.

    `data_args.template` / `data_args.system_prompt` override the model's `config.template` / `system_prompt`.
    The model's kind builds it (`ModelKind.build_dataset`): the qwen-vl kind renders records with its processor.
    """
    return KIND.get(model.medm_kind).build_dataset(data_args, model, tokenizer)


def build_conversation_dataset(data_args: DataArgs, model, tokenizer) -> ConversationDataset:
    """`build_dataset` for the medm kind: records through the model's template and encoder preprocessing."""
    if not data_args.path:
        raise ValueError("data.path: give the annotation file(s) to train or evaluate on")
    cfg = model.config
    image_preprocess = VISION.get(cfg.vision["name"]).preprocessor(cfg.vision) if cfg.vision else None
    # 3D hook: the 3D encoder's volume preprocessing (medm.data.volumes), with its training augmentation on.
    volume_preprocess = (VISION.get(cfg.vision3d["name"]).preprocessor(cfg.vision3d).for_training()
                         if cfg.vision3d else None)
    text = {"num_image_tokens": model.num_image_tokens, "num_image3d_tokens": model.num_image3d_tokens,
            "template": data_args.template if data_args.template is not None else cfg.template,
            "system_prompt": data_args.system_prompt if data_args.system_prompt is not None else cfg.system_prompt,
            "max_length": data_args.max_length}
    if data_args.streaming:
        records = []  # the dataset without records encodes the stream's records (streaming_dataset)
    elif use_store(data_args):
        records = open_store(annotation_files(data_args.path), ConversationEncoder(tokenizer, **text),
                             cache_dir=data_args.cache_dir, num_proc=data_args.num_proc)
    else:
        records = load_records(data_args.path, for_training=True)
    dataset = ConversationDataset(records, tokenizer, image_preprocess=image_preprocess,
                                  volume_preprocess=volume_preprocess, image_dir=data_args.image_dir,
                                  max_bad_samples=data_args.max_bad_samples, **text)
    if data_args.streaming:
        return streaming_dataset(data_args, dataset)
    require_samples(dataset, data_args)
    return dataset


def streaming_dataset(data_args: DataArgs, encoder) -> StreamingDataset:
    """The `data.streaming` dataset of either kind: `encoder` is that kind's map-style dataset built with no
    records, whose code encodes and loads each streamed record."""
    return StreamingDataset(data_args.path, encoder, max_bad_samples=data_args.max_bad_samples,
                            shuffle_buffer=data_args.streaming_shuffle_buffer, seed=data_args.streaming_seed)


def use_store(data_args: DataArgs) -> bool:
    """True for `data.store: arrow` (the record store), False for `memory`.

    Raises:
        ConfigError: another value.
    """
    if data_args.store not in ("arrow", "memory"):
        raise ConfigError(f"data.store: {data_args.store!r}; valid: arrow (a tokenized record store on disk, "
                          "memory-mapped), memory")
    return data_args.store == "arrow"


def require_samples(dataset, data_args: DataArgs) -> None:
    """Refuse a training dataset without a single sample, naming why (a run of 0 steps would end "successfully").

    Raises:
        AnnotationError: the data file(s) hold no records.
        ConfigError: every record was dropped by `data.max_length`.
    """
    if len(dataset.samples):
        return
    if not dataset.num_dropped:
        raise AnnotationError(f"data.path: {data_args.path} holds no records: nothing to train on")
    raise ConfigError(f"data.max_length={data_args.max_length}: every one of the {dataset.num_dropped} record(s) of "
                      f"{data_args.path} was dropped, none has an assistant answer within {data_args.max_length} "
                      "tokens (image tokens included); raise data.max_length")
