"""Typed configuration: YAML → ``yaml.safe_load`` → dotted ``--set`` overrides → pydantic.

Every section forbids unknown keys, so a typo (``model.arc``) is refused with the valid names
instead of being ignored. Functions elsewhere receive only the section they use.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from PIL import Image
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from imgscore.errors import ConfigError
from imgscore.images.formats import DEFAULT_FORMATS, check_formats
from imgscore.io import storage
from imgscore.io.containment import is_plain_name

# Pillow's default decompression-bomb limit (about 89.5 megapixels). Read once; never changed.
PILLOW_MAX_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 178956970 // 2)


def _root_value(value: Any) -> Any:
    """A root as configured → a ``Path`` (local path, ``file://`` URL) or the normalized URL
    string (``s3://``, ``gs://``, ``az://``: a ``Path`` would fold ``//``). Raises ValueError for
    an unknown scheme (pydantic reports it against the key)."""
    if value is None or isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a path or a URL, got {type(value).__name__}")
    if not value.strip():  # Path("") is the working directory: `--set output.root=$OUT` with OUT unset
        raise ValueError("is empty; set it to a folder or a URL (an unset shell variable in --set KEY=$VAR gives an empty value)")
    text = storage.normalize_root(value)
    return text if storage.is_remote(text) else Path(os.path.expanduser(text))


def _user_path(value: Any) -> Any:
    """A local path key's value with a leading ``~`` / ``~user`` made the home folder
    (``os.path.expanduser``); other values unchanged. ``$VAR`` is not expanded: ``$`` is a legal
    character in file names, and a path must not change with the environment of the process
    that reads the config (a Prefect worker's differs from the shell's)."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, Path) and str(value).startswith("~"):
        return value.expanduser()
    return value


# What the docs of every path key say about ~ and $VAR (docs/configuration.md says it too).
PATH_NOTE = "; ~ is your home folder, $VAR is not expanded"


# input.root / output.root: a local folder, or an object-store URL (imgscore.io.storage)
Root = Annotated[Path | str, PlainValidator(_root_value, json_schema_input_type=str), PlainSerializer(str, return_type=str, when_used="json")]


def _admits(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field's annotation (through ``|``, ``Optional``, ``Annotated``, ``list[...]``,
    ``tuple[...]``) takes a value of one of ``kinds``."""
    if annotation in kinds:
        return True
    return any(_admits(a, kinds) for a in getattr(annotation, "__args__", ()) if not isinstance(a, str))


def _numeric_only(annotation: Any) -> bool:
    """A field of numbers (``float``, ``int | None``, ``list[float]``, ``tuple[int, int, int]``) that takes no
    booleans or text of its own: pydantic's lax mode would read ``true`` there as 1."""
    return _admits(annotation, (int, float)) and not _admits(annotation, (bool, str, Path))


class _Section(BaseModel):
    # allow_inf_nan=False: inf and nan are refused here, not by each shard (JSON writes them as null,
    # so a config that passed this check would fail to load in every shard task).
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, v: Any, info) -> Any:
        """Refuse a boolean where a number is meant (``decode_timeout_s: true`` would be 1.0 seconds)."""
        items = v if isinstance(v, list | tuple) else [v]
        if any(isinstance(x, bool) for x in items) and _numeric_only(cls.model_fields[info.field_name].annotation):
            b = next(x for x in items if isinstance(x, bool))
            raise ValueError(f"is the boolean {str(b).lower()}, not a number: YAML reads unquoted true/false/yes/no/on/off "
                             "as booleans; give a number")
        return v


def _not_a_number(v: Any, info) -> Any:
    """Refuse a number where a name is meant: YAML reads ``0123`` (octal) and ``12:30`` (base 60)
    text as numbers, and coercing one back to text would not give what was written (``0123`` → ``'83'``)."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        raise ValueError(number_message("", v))
    return v


class InputConfig(_Section):
    """What to score and how to read it."""

    root: Root | None = Field(
        None, description="folder to score (ImageFolder layout or flat): a path, or s3://, gs://, az:// URL of a prefix" + PATH_NOTE
    )
    layout: Literal["auto", "imagefolder", "flat"] = Field(
        "auto",
        description="auto: class subfolders and no top-level images → imagefolder, else flat",
    )
    follow_symlinks: bool = Field(True, description="follow symlinked files and folders (cycles are cut)")
    scan_threads: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description="threads that scan class folders at once: auto = 8 on a network file system (NFS, SMB, …), "
        "1 on a local disk; the order of the images is the same with any number",
    )
    exif_orientation: bool = Field(True, description="apply the EXIF orientation tag before scoring")
    max_pixels: int = Field(
        PILLOW_MAX_PIXELS,
        gt=0,
        description="images declaring more pixels are recorded as errors before decoding "
        "(default: Pillow's MAX_IMAGE_PIXELS; Pillow's own hard stop at twice its limit still applies)",
    )
    max_metadata_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="largest PNG text/ICC chunk (decompressed) and PNG text in all read per image, bytes; "
        "Pillow's own limits (1 MiB a chunk, 64 MiB in all) are raised to it for each decode only",
    )
    formats: list[str] = Field(
        list(DEFAULT_FORMATS),
        description="image formats decoded (Pillow names; Image.open(formats=...)): the formats photos arrive in, "
        "AVIF and HEIF where their plugins are installed; others (FITS, TGA, JPEG2000, ...) only when listed here, as "
        "Pillow's 2026 advisories advise; a file of another format is an error (format_not_allowed) or, by its "
        "extension, skipped; EPS/PostScript can never be listed (Pillow runs Ghostscript on it)",
    )
    decode_timeout_s: float = Field(
        30.0, gt=0, description="seconds one image's decode may take, in worker processes and inline "
        "(inference.num_workers=0); a slower one is an error (DecodeError.timeout), the rest of the batch is scored",
    )

    @field_validator("formats", mode="before")
    @classmethod
    def _allowed_formats(cls, v):
        if isinstance(v, str):  # --set input.formats=JPEG or "JPEG, PNG"
            v = [p for p in v.replace(",", " ").split()]
        if not isinstance(v, list | tuple):
            raise ValueError(f"input.formats must be a list of format names such as [JPEG, PNG], got {v!r}")
        return list(check_formats(v))


class TransformConfig(_Section):
    """One model's own eval transform over ``preprocess.*`` (several models, each its recipe);
    unset fields come from ``preprocess.*``, then the model's weights."""

    resize: int | None = Field(None, gt=0, description="shorter side after resizing, pixels")
    crop: int | None = Field(None, gt=0, description="center crop side, pixels")
    mean: list[float] | None = Field(None, min_length=3, max_length=3, description="per-channel mean (RGB, 0–1 scale)")
    std: list[float] | None = Field(None, min_length=3, max_length=3, description="per-channel std (RGB, 0–1 scale)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(None, description="resize interpolation (antialiased)")


class ModelConfig(_Section):
    """Which network and weights; see ``imgscore.inference.model.load_model``."""

    name: str | None = Field(
        None,
        description="what rows call this model (the model_name column; one word, unique in models:); "
        "default: model.arch, or the function name of model.factory",
    )
    arch: str = Field("resnet50", description="torchvision.models builder name")
    checkpoint: Path | None = Field(None, description="state_dict, training checkpoint dict, or TorchScript" + PATH_NOTE)
    weights: str | None = Field(None, description="torchvision weights name (IMAGENET1K_V2, DEFAULT) from the local hub cache")
    classes: Path | list[str] | None = Field(
        None, description="file with one class name a line (UTF-8), or a list in output order (quote names YAML reads as booleans "
        "or numbers: 'no', 'yes', 'on', 'off', '001', '12:30')" + PATH_NOTE
    )
    num_classes: int | None = Field(None, gt=0, description="head size; inferred from the checkpoint when unset")
    trust_checkpoint: bool = Field(
        False, description="allow whole pickled modules (unpickling runs code from the file)"
    )
    factory: str | None = Field(
        None,
        description="'package.module:function' called with no arguments, returning the nn.Module that "
        "model.checkpoint's state_dict loads into (architectures torchvision does not build); "
        "replaces model.arch",
    )
    transform: TransformConfig | None = Field(
        None,
        description="this model's resize, crop, mean, std, interpolation over preprocess.* (models: each its own recipe; "
        "decoding is shared, the draft sized for the largest resize)",
    )

    _home = field_validator("checkpoint", mode="before")(_user_path)
    _names_are_text = field_validator("name", "arch", "weights", "factory", mode="before")(_not_a_number)

    @field_validator("classes", mode="before")
    @classmethod
    def _class_names(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, c in enumerate(v):
                if isinstance(c, bool):
                    raise ValueError(yaml_boolean_message(f"model.classes item {i}", c))
                if isinstance(c, int | float):
                    raise ValueError(number_message(f"model.classes item {i}", c))
                if not isinstance(c, str):
                    raise ValueError(f"model.classes item {i} is a {type(c).__name__}, not a name; write each class name as text")
            return v
        if isinstance(v, set | frozenset | dict | tuple):  # YAML !!set, !!omap, a mapping
            kind = "set" if isinstance(v, set | frozenset) else type(v).__name__
            raise ValueError(f"model.classes must be a list (a YAML sequence, in order), got a {kind}; "
                             "a set has no order and a mapping is not a list of names: write [first, second, ...] in output order")
        if isinstance(v, int | float) and not isinstance(v, bool):
            raise ValueError(number_message("model.classes", v))
        return _user_path(v)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not is_plain_name(v) or v != v.strip()):
            raise ValueError(f"model name {v!r} must be one word without '/', '\\', '..', spaces at its ends or control characters")
        return v

    @property
    def resolved_name(self) -> str:
        """``name``, else ``arch`` (or the function of ``factory``): the ``model_name`` of its rows."""
        if self.name is not None:
            return self.name
        if self.factory is not None:
            return self.factory.partition(":")[2].strip()
        return self.arch

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.checkpoint is not None and self.weights is not None:
            raise ValueError(
                f"model.checkpoint ({self.checkpoint}) and model.weights ({self.weights}) are both set; "
                "set only one"
            )
        if self.factory is not None:
            mod, sep, fn = self.factory.partition(":")
            if not sep or not mod.strip() or not fn.strip():
                raise ValueError(f"model.factory {self.factory!r} is not 'package.module:function', e.g. 'mymodels.heads:resnet18_dropout'")
            if self.weights is not None:
                raise ValueError(f"model.factory ({self.factory}) builds its own module; model.weights ({self.weights}) is for torchvision builders: use model.checkpoint")
        return self


class PreprocessConfig(_Section):
    """Eval transform. Unset fields come from the torchvision weights' ``transforms()``, else from
    torchvision's classification reference recipe (resize 256, crop 224, ImageNet mean/std)."""

    resize: int | None = Field(None, gt=0, description="shorter side after resizing, pixels")
    crop: int | None = Field(None, gt=0, description="center crop side, pixels")
    mean: list[float] | None = Field(None, min_length=3, max_length=3, description="per-channel mean subtracted (RGB, 0–1 scale)")
    std: list[float] | None = Field(None, min_length=3, max_length=3, description="per-channel std divided by (RGB, 0–1 scale)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(None, description="resize interpolation (antialiased)")
    background: tuple[int, int, int] = Field(
        (255, 255, 255), description="RGB that transparent pixels are composited onto"
    )
    jpeg_draft: bool = Field(
        True,
        description="let libjpeg downscale in the DCT domain, to no less than twice the resize "
        "target, when the source is at least four times it (much faster for photos; see benchmarks/NOTES.md)",
    )
    max_aspect_ratio: float = Field(
        4.0,
        ge=1.0,
        description="longer/shorter side above this is center-cropped before resizing, so an "
        "8000x8 strip cannot allocate a huge tensor; the final center crop is unaffected",
    )
    value_range: tuple[float, float] | None = Field(
        None,
        description="[low, high] pixel values of float and 16/32-bit images that become black and white; "
        "default: from the data type and each image's finite min/max (docs/images.md, decode policies)",
    )
    non_finite: Literal["error", "fill"] = Field(
        "error",
        description="NaN/Inf pixels in float images: error (an errors row, DecodeError.non_finite) or fill "
        "(NaN and -Inf as the low end of the value range, +Inf as the high end)",
    )
    color_manage: bool = Field(
        False, description="convert images with an embedded ICC profile to sRGB (ImageCms); off: pixels as stored, like torchvision"
    )

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"preprocess.std must be positive, got {v}")
        return v

    @field_validator("value_range")
    @classmethod
    def _increasing_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"preprocess.value_range must be [low, high] with low < high, got {list(v)}")
        return v


class InferenceConfig(_Section):
    """How the forward pass runs on each worker."""

    device: str = Field("auto", description="auto (cuda → mps → cpu), cpu, cuda, cuda:N, mps")
    batch_size: int | Literal["auto"] = Field(
        32, description="images per forward; auto: 32, doubled (to 256) while a batch's forward takes under 50 ms"
    )
    num_workers: int | Literal["auto"] = Field(
        "auto",
        description="DataLoader decode processes per shard; auto: chosen with the torch thread count from the "
        "measured decode and forward cost of this model on these images, or lanes that also run the forward "
        "(docs/configuration.md, Preprocessing and devices)",
    )
    timeout_s: float = Field(
        300.0, gt=0, description="DataLoader timeout per batch when num_workers > 0, seconds (with lanes, plus four "
        "times the batch's measured one-thread forward)"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="fp32 (default); bf16/fp16 are opt-in (torch: autocast; openvino: bf16 inference "
        "precision) and checked at run start by the canary (inference.canary_images)",
    )
    backend: Literal["torch", "onnxruntime", "openvino", "auto"] = Field(
        "torch",
        description="torch (eager), onnxruntime or openvino (an ONNX export of the model, cached in "
        "inference.cache_dir; pip install 'imgscore[onnx]' / 'imgscore[openvino]'), or auto: the "
        "fastest installed fp32 backend, measured once per machine and model",
    )
    cache_dir: Path | None = Field(
        None, description="where ONNX exports and auto's measurements are cached (default ~/.cache/imgscore)" + PATH_NOTE
    )
    canary_images: int = Field(
        64, gt=0, description="reduced precision: the run's first N images scored with fp32 torch and "
        "the fast path; refused below 99.5 % top-1 agreement or above 0.01 mean absolute Δscore",
    )
    on_canary_fail: Literal["refuse", "fp32"] = Field(
        "refuse", description="refuse: exit 2 before scoring; fp32: warn and score in fp32 with the same backend"
    )
    channels_last: bool = Field(True, description="NHWC memory format for conv nets (faster on CPU and GPU)")
    fold_bn: bool = Field(
        True, description="fold each Conv→BatchNorm pair into one conv before scoring (torch.fx; see benchmarks/NOTES.md)"
    )
    num_threads: int | None = Field(None, gt=0, description="torch threads per worker; default: its share of the cores")

    _home = field_validator("cache_dir", mode="before")(_user_path)

    @field_validator("batch_size", "num_workers")
    @classmethod
    def _count_or_auto(cls, v, info):
        if isinstance(v, int) and (v < 0 or (v == 0 and info.field_name == "batch_size")):
            raise ValueError(f"inference.{info.field_name} must be {'positive' if info.field_name == 'batch_size' else '0 or more'} or auto, got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"inference.device {v!r} is not one of auto, cpu, cuda, cuda:N, mps")


class RunConfig(_Section):
    """How the run is cut and judged."""

    shard_size: int = Field(1000, gt=0, description="images per shard (one task run each)")
    max_error_rate: float = Field(0.01, ge=0.0, le=1.0, description="failed/scanned above this, with at least run.min_errors failed, ends the run failed (exit 1)")
    shard_retries: int = Field(2, ge=0, description="Prefect task retries for a shard that cannot run")
    skip_scored: bool = Field(False, description="skip images already scored under the same model and preprocessing")
    skip_key: Literal["stat", "sha256"] = Field(
        "stat", description="stat: relative path + size + mtime; sha256: content hash"
    )
    retry_failed: bool = Field(
        False,
        description="with skip_scored: try again the images that failed before with the same bytes "
        "(default: carry them as already_failed, not retried, listed in runs/RUN/already_failed.parquet)",
    )
    min_errors: int = Field(
        5, ge=0, description="fewer failed images than this never fail a run, whatever the rate "
        "(1 corrupt image of 1 new is not a failed night; 300 of 1000 is)",
    )
    run_id: str | None = Field(None, description="default: UTC timestamp + random suffix")

    @field_validator("run_id")
    @classmethod
    def _folder_name(cls, v: str | None) -> str | None:
        if v is not None and not is_plain_name(v):
            raise ValueError(f"run.run_id {v!r} must be one folder name (no '/', '\\', '..' or control characters)")
        return v


class RunnerConfig(_Section):
    """Where shards run."""

    type: Literal["thread", "dask"] = Field("thread", description="thread: a thread pool in this process; dask: Dask workers")
    n_workers: int = Field(1, gt=0, description="threads (thread) or worker processes (dask LocalCluster)")
    threads_per_worker: int = Field(1, gt=0, description="dask: shards each worker scores at once")
    address: str | None = Field(None, description="existing Dask scheduler, e.g. tcp://host:8786")
    _address_is_text = field_validator("address", mode="before")(_not_a_number)
    warm_workers: bool = Field(
        True,
        description="dask: start the cluster with the run (imgscore run: before the model loads) and have each "
        "worker import torch and load the model before its first shard",
    )


class OutputConfig(_Section):
    """Where results go."""

    root: Root = Field(Path("outputs"), description="holds predictions/, errors/ and runs/: a path, or s3://, gs://, az:// URL" + PATH_NOTE)
    topk: int = Field(5, gt=0, description="how many classes topk_indices/topk_scores keep")
    embeddings: bool = Field(
        False,
        description="also write each image's penultimate-layer features (the classifier head's input) to the "
        "embeddings/ table, one fixed-size vector per image (docs/results.md, 'Analytics recipes')",
    )
    embedding_layer: str | None = Field(
        None,
        description="module whose output (flattened from dimension 1) is the embedding, as named in "
        "model.named_modules(), e.g. 'avgpool'; default: the input of the classifier head (fc, classifier[-1], heads.head, …)",
    )
    embedding_dtype: Literal["float32", "float16"] = Field(
        "float32", description="element type of the embedding column; float16 halves the table (about 1e-3 relative rounding)"
    )


class DriftConfig(_Section):
    """Night-over-night drift: each run compared with the previous complete runs of the same
    input folder and model (``imgscore.report.drift``). Thresholds left unset are not checked;
    a threshold crossed is a warning (summary, Prefect artifact, notification), a failed run only
    with ``fail: true``."""

    enabled: bool = Field(True, description="compare each run with recent nights (report, summary)")
    baseline_runs: int = Field(7, gt=0, description="how many previous complete runs of the same input root and model to compare with")
    min_images: int = Field(
        50, gt=0, description="fewer predictions than this tonight or in the baseline: numbers shown, no warning (too few to judge)"
    )
    low_confidence: float = Field(0.5, gt=0.0, lt=1.0, description="top-1 probability below this counts as low confidence")
    max_psi: float | None = Field(
        0.25, ge=0.0, description="warn when the predicted-class PSI exceeds this (0.1-0.25: moderate shift, above 0.25: major)"
    )
    max_class_shift: float | None = Field(None, gt=0.0, le=1.0, description="warn when one class's share moves by more than this (0.1 = 10 points)")
    max_mean_confidence_drop: float | None = Field(None, gt=0.0, le=1.0, description="warn when mean top-1 probability falls by more than this")
    max_low_confidence_increase: float | None = Field(
        None, gt=0.0, le=1.0, description="warn when the share of images below low_confidence rises by more than this"
    )
    max_error_rate_increase: float | None = Field(None, gt=0.0, le=1.0, description="warn when the error rate rises by more than this")
    max_embedding_shift: float | None = Field(
        None, gt=0.0, le=2.0, description="warn when the cosine distance between tonight's and the baseline's mean embedding exceeds this"
    )
    fail: bool = Field(False, description="a drift warning fails the run (exit 1) instead of only warning")


class NotifyConfig(_Section):
    """Who hears about a run's end (Prefect flow-run state hooks; docs/deployments.md, "Failure notifications")."""

    webhook_url: str | None = Field(
        None,
        description="POST a JSON summary here when a run ends Failed or Crashed (and on success with "
        "notify.on_success); never written to the manifest or part files",
    )
    block: str | None = Field(
        None,
        description="a Prefect notification block, 'block-type-slug/name' (e.g. slack-webhook/nightly-alerts, "
        "ms-teams-webhook/…, custom-webhook/…): its notify() gets the same summary as text",
    )
    on_success: bool = Field(False, description="notify on Completed runs too")
    timeout_s: float = Field(10.0, gt=0, description="seconds the POST may take; a failing notification is one warning line")

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"notify.webhook_url must be an http:// or https:// URL, got {v!r}")
        return v

    @field_validator("block")
    @classmethod
    def _block_name(cls, v: str | None) -> str | None:
        # Prefect's block-type slugs and block names: lowercase letters, digits and dashes
        if v is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]*/[a-z0-9][a-z0-9-]*", v):
            raise ValueError(f"notify.block must be 'block-type-slug/block-name' (lowercase letters, digits, dashes), "
                             f"e.g. slack-webhook/nightly-alerts; got {v!r}")
        return v


class StorageConfig(_Section):
    """How object-store roots are opened (``imgscore.io.storage``). Credentials and endpoints
    come from each machine's standard chain (``AWS_*``, ``AWS_PROFILE``, instance roles;
    ``GOOGLE_APPLICATION_CREDENTIALS``; ``AZURE_STORAGE_*``); these keys add what the chain cannot say."""

    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for s3fs/gcsfs/adlfs (endpoint_url, client_kwargs, anon, …); "
        "a credential only as a ${ENV_VAR} reference, never its value",
    )
    retries: int = Field(4, ge=0, description="retries of a request after throttling (503 SlowDown), 5xx or a timeout, with backoff")
    read_timeout_s: float = Field(
        30.0, gt=0, description="seconds a read may stall; one object read, all attempts, is cut at read_timeout_s × (retries + 1)"
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="seconds to open a connection to the store")

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        storage.check_options(v)
        return v

    def settings(self) -> storage.Settings:
        """What :func:`imgscore.io.storage.configure` takes."""
        return storage.Settings.of(self.options, self.retries, self.read_timeout_s, self.connect_timeout_s)


class Config(_Section):
    """The whole resolved configuration of a run."""

    input: InputConfig = InputConfig()
    model: ModelConfig = ModelConfig()
    models: list[ModelConfig] | None = Field(
        None,
        description="several model blocks (each as model.*, with a name) scored in one pass: each image is decoded once "
        "and every model scores it; replaces model (docs/checkpoints.md, 'Several models')",
    )
    preprocess: PreprocessConfig = PreprocessConfig()
    inference: InferenceConfig = InferenceConfig()
    run: RunConfig = RunConfig()
    runner: RunnerConfig = RunnerConfig()
    output: OutputConfig = OutputConfig()
    notify: NotifyConfig = NotifyConfig()
    drift: DriftConfig = DriftConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _one_model_form(self) -> Config:
        if self.models is None:
            return self
        if "model" in self.model_fields_set and self.model != ModelConfig():
            raise ValueError("both model and models are set; put the model block into the models list (with a name), or use model alone")
        if not self.models:
            raise ValueError("models is empty; list at least one model block, or use model")
        names = [m.resolved_name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"models: the name {dup[0]!r} is used by {names.count(dup[0])} models; give each a distinct models[i].name")
        return self

    def preprocess_for(self, model: ModelConfig) -> PreprocessConfig:
        """``preprocess`` with ``model.transform``'s set fields over it: what ``model`` is loaded with."""
        if model.transform is None:
            return self.preprocess
        return self.preprocess.model_copy(update=model.transform.model_dump(exclude_none=True))

    def scored_models(self) -> list[ModelConfig]:
        """The models a run scores, in order: ``models``, else ``[model]``. Each one's rows carry
        its :attr:`ModelConfig.resolved_name` as ``model_name``."""
        return list(self.models) if self.models is not None else [self.model]

    @model_validator(mode="after")
    def _embeddings_backend(self) -> Config:
        if self.output.embeddings and self.inference.backend in ("onnxruntime", "openvino"):
            raise ValueError(
                f"output.embeddings reads the torch module's layers, but inference.backend is {self.inference.backend}; "
                "set inference.backend=torch (or auto, which then scores with torch), or output.embeddings=false"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings) — what flows receive as their parameter."""
        return self.model_dump(mode="json")

    def recorded(self) -> dict[str, Any]:
        """:meth:`to_dict` as manifests and part files record it: ``notify`` at its defaults. The
        webhook URL often holds a token, and a rerun (whose config is read back from the output
        root, which others may write) must not send the run's summary where a manifest says: it
        notifies only as its own command says."""
        d = self.to_dict()
        d["notify"] = NotifyConfig().model_dump(mode="json")
        return d


# ---------------------------------------------------------------------------- flow-run parameters

# A config whose JSON is larger than this reaches its flow run as a file reference (``config_file``)
# instead of the ``config`` mapping: Prefect's API refuses flow-run parameters over 512 KB
# (PREFECT_SERVER_API_MAX_PARAMETER_SIZE), and an inline model.classes of 10,000 names is 1.4 MB.
MAX_PARAMETER_BYTES = 128 * 1024


@contextlib.contextmanager
def flow_parameters(cfg: Config) -> Iterator[dict[str, Any]]:
    """The parameters a flow run of ``cfg`` is started with: ``{"config": cfg.to_dict()}``, or,
    when that is over :data:`MAX_PARAMETER_BYTES` as JSON, ``{"config_file": PATH}`` — the config
    written to a private temporary file (mode 0600) that exists while the context is open (the
    flow runs in this process and reads it at its start: :func:`flow_config`). The manifest
    records the whole config either way."""
    text = cfg.model_dump_json()
    if len(text.encode("utf-8")) <= MAX_PARAMETER_BYTES:
        yield {"config": cfg.to_dict()}
        return
    fd, name = tempfile.mkstemp(prefix="imgscore-config-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        yield {"config_file": name}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def flow_config(config: dict[str, Any] | None, config_file: str | None) -> Config:
    """A flow's config from its parameters (:func:`flow_parameters`): the ``config`` mapping, or
    the JSON file ``config_file`` names.

    Raises:
        ConfigError: neither or both given, or the file cannot be read.
    """
    return Config.model_validate(raw_flow_config({"config": config, "config_file": config_file}))


def raw_flow_config(parameters: dict[str, Any]) -> dict[str, Any]:
    """The config mapping of a flow run's ``parameters``, unvalidated: ``config``, or the JSON
    that ``config_file`` holds (the task runner and the notification hook read it before, or
    without, validating).

    Raises:
        ConfigError: neither or both given, or the file cannot be read.
    """
    config, config_file = parameters.get("config"), parameters.get("config_file")
    if (config is None) == (config_file is None):
        raise ConfigError("a flow run takes its config as config (a mapping) or as config_file (a JSON file), exactly one of them")
    if config is not None:
        return config
    try:
        return json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config_file {config_file!r} cannot be read ({exc}); start the run again") from None


def _default_text(field) -> str:
    """A field's default as the YAML one would write (``–`` for none)."""
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return "–"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        return str(value)
    return yaml.safe_dump(value if not isinstance(value, tuple) else list(value), default_flow_style=True).strip().removesuffix("...").strip()


def config_reference() -> list[dict[str, str]]:
    """Every config key as ``{key, default, meaning}``, section by section in :class:`Config`'s
    order, generated from the models' fields and descriptions (``imgscore config``; the key table of
    docs/configuration.md is checked against it)."""
    rows = []
    for section, sf in Config.model_fields.items():
        model = sf.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):  # models: a list of model blocks
            rows.append({"key": section, "default": _default_text(sf), "meaning": sf.description or ""})
            continue
        for name, field in model.model_fields.items():
            rows.append({"key": f"{section}.{name}", "default": _default_text(field), "meaning": field.description or ""})
    return rows


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"a.b=value"`` into (["a", "b"], parsed value).

    The value is parsed as YAML, so ``8`` is an int, ``0.5`` a float, ``true`` a bool,
    ``[1, 2]`` a list and ``null`` None; anything else stays the literal string.

    Raises:
        ConfigError: no ``=``, or an empty key.
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is not KEY=VALUE; example: --set input.root=/data/images")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {item!r} has an empty key; example: --set run.shard_size=500")
    try:
        value = read_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if not isinstance(value, str | int | float | bool | list | dict | type(None)):
        value = raw  # dates and other YAML types stay text
    return parts, value


def _section_fields(path: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


ECHO_LIMIT = 200  # characters of a bad value an error message shows (a 10,000-name list is 1.4 MB)


def _shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`ECHO_LIMIT` characters with the size of what was left out."""
    text = repr(value)
    if len(text) <= ECHO_LIMIT:
        return text
    return f"{text[:ECHO_LIMIT]}… ({len(text):,} characters)"


def yaml_boolean_message(what: str, value: bool) -> str:
    """The refusal for a YAML boolean where a name was meant (``classes: [no, yes]``)."""
    word = "yes" if value else "no"
    return (f"{what} is the boolean {str(value).lower()}: YAML reads unquoted no/yes/on/off/false/true as booleans; "
            f"quote it: '{word}' (or whichever of those words you wrote)")


def number_message(what: str, value: float) -> str:
    """The refusal for a YAML number where a name was meant (``classes: [001, 010]`` reads as 1 and 8)."""
    return (f"{what} is the number {value!r}: YAML reads unquoted 001/010/12:30/1_000 as numbers (010 is octal 8, 12:30 is "
            f"750), so the text you wrote is lost; quote the names: '001'").lstrip()


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        # a union's member names ("list[str]", "lax-or-strict[…]") are not keys: left out
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or ("[" not in p and "(" not in p))
        dotted = ".".join(str(p) for p in loc) or "config"
        if isinstance(err.get("input"), bool) and (err["type"] in ("string_type", "path_type", "list_type") or loc[-1:] == ("root",)):
            said = f"config {yaml_boolean_message(dotted, err['input'])}"  # a name or a path that YAML read as a boolean
            if said not in lines:  # a union (Path | list[str]) reports it once per member
                lines.append(said)
            continue
        if err["type"] == "finite_number":  # inf/nan: JSON cannot carry them to the shards
            unit = " of seconds" if str(loc[-1]).endswith("_s") else ""
            lines.append(f"config {dotted} must be a finite number{unit}, got {_shown(err.get('input'))}")
            continue
        if err["type"] == "extra_forbidden":
            valid = _section_fields(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""
            lines.append(f"unknown config key {dotted!r}{hint} (valid keys here: {', '.join(valid)})")
        else:
            msg = err["msg"].removeprefix("Value error, ")  # our validators' messages name the value already
            if msg.startswith("is the "):  # a boolean or a number where the key's kind was meant: the key leads
                lines.append(f"config {dotted} {msg}")
                continue
            got = _shown(err.get("input"))
            never = loc[:2] == ("storage", "options")  # never echo a credential
            said = got in msg or "YAML reads unquoted" in msg  # the value is named already
            lines.append(f"config {dotted}: {msg}" + ("" if never or said else f" (got {got})"))
    return "; ".join(lines)


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate a raw dict plus ``--set`` overrides into a :class:`Config`.

    Raises:
        ConfigError: unknown key (with the closest valid one), wrong type, or bad override syntax.
    """
    data: dict[str, Any] = _deepcopy(raw or {})
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


# Configs shipped with imgscore, that --config takes by name (`--config nightly`) from any folder.
SHIPPED_CONFIGS = ("demo", "nightly")


def shipped_config(name: str) -> Path:
    """A config file shipped with imgscore (``demo.yaml``, ``nightly.yaml``): package data of
    ``imgscore.configs`` (the source tree's ``configs/``), found wherever imgscore is installed
    and whatever the working directory.

    An editable install made before ``configs/`` became a package maps no ``imgscore.configs``;
    there the source tree's folder, beside this package's, is the same file.
    """
    from importlib.resources import files

    try:
        return Path(str(files("imgscore.configs") / name))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs" / name


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file (optional) and apply ``--set`` overrides.

    Raises:
        ConfigError: the file is missing, not a YAML mapping or refused by :func:`read_yaml`,
            or validation fails.
    """
    return build_config(read_config_file(path) if path is not None else {}, overrides)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's mapping of sections (:func:`read_yaml`); {} for an empty file.

    Raises:
        ConfigError: the file is missing, not valid YAML, not a mapping, or refused by :func:`read_yaml`.
    """
    p = Path(path)
    if not p.is_file() and str(path) in SHIPPED_CONFIGS:
        p = shipped_config(f"{path}.yaml")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; give the path of a YAML file, or the name of a config shipped "
                          f"with imgscore ({', '.join(SHIPPED_CONFIGS)}: --config nightly), or omit --config")
    where = f"config file {str(p)!r}"
    try:
        loaded = read_yaml(p.read_text(encoding="utf-8"), where)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


# Values that YAML aliases (*name) may add beyond the document's own: a config never needs more,
# and a "billion laughs" document (9 levels of 10 aliases: 10⁹ strings from 1 KB) is refused
# before anything is built from it.
MAX_ALIAS_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_yaml(text: str, where: str = "the YAML") -> Any:
    """``yaml.safe_load`` for configs, stricter where it is silent.

    The document is composed into nodes first (aliases are references there, so this is linear in
    the text), then checked: a key given twice in one mapping is refused (YAML keeps the last, so a
    second ``output:`` block silently dropped the first one's keys); aliases that expand to more
    than :data:`MAX_ALIAS_VALUES` values beyond the document's own, or refer to themselves, are
    refused; only then is the document built. ``<<`` merge keys keep their meaning (a key given
    beside a merge overrides the merged one).

    Raises:
        ConfigError: a duplicate key (named, with both lines), an alias bomb or recursive alias,
            or nesting deeper than the parser can follow.
        yaml.YAMLError: not valid YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, where)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where} nests mappings or lists too deeply to read; a config is a few levels deep") from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_nodes(root: yaml.Node, where: str) -> None:
    """Duplicate keys and alias expansion of a composed document (:func:`read_yaml`), without
    recursion (a deep document must not overflow the stack here) and without expanding anything."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if key.tag == _MERGE_TAG or not isinstance(key, yaml.ScalarNode):
                    stack.append((value, path))
                    continue
                dotted = f"{path}.{key.value}" if path else key.value
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    raise ConfigError(
                        f"{where} line {line}: key {dotted!r} is given twice (first at line {first[key.tag, key.value]}); YAML would keep "
                        "only the second and drop the first silently — merge the two into one"
                    )
                first[key.tag, key.value] = line
                stack.append((value, dotted))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node.value))
    expanded = _expanded_count(root, where)
    if expanded - len(seen) > MAX_ALIAS_VALUES:
        raise ConfigError(
            f"{where}: its aliases (*name) expand to more than {MAX_ALIAS_VALUES:,} values beyond the file's own "
            f"{len(seen):,} (an alias bomb?); write the values out, or use fewer aliases"
        )


def _expanded_count(root: yaml.Node, where: str) -> int:
    """How many nodes the document has with every alias expanded, counted once per node (post-order,
    memoised); stops counting at :data:`MAX_ALIAS_VALUES` above the distinct nodes' count."""
    size: dict[int, int] = {}
    open_: set[int] = set()
    cap = 1 << 62
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            open_.discard(id(node))
            size[id(node)] = min(cap, 1 + sum(size[id(k)] for k in _children(node)))
            continue
        if id(node) in size:
            continue
        if id(node) in open_:
            raise ConfigError(f"{where} line {node.start_mark.line + 1}: an alias refers to the value that holds it (a recursive "
                              "structure); a config cannot hold one — write the value out")
        open_.add(id(node))
        stack.append((node, True))
        for k in _children(node):
            if id(k) in open_:
                raise ConfigError(f"{where} line {k.start_mark.line + 1}: an alias refers to the value that holds it (a recursive "
                                  "structure); a config cannot hold one — write the value out")
            if id(k) not in size:
                stack.append((k, False))
    return size[id(root)]


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v) for k, v in d.items()}


# ---------------------------------------------------------------------------- a rerun's config

ALLOWED_RERUN_OVERRIDES = ("output.root", "runner.", "inference.", "notify.", "storage.")

# Recorded keys that run code, or send the run or its files somewhere: a rerun reads its config
# back from the manifest under output.root, which others may be able to write (docs/security.md), so it takes a non-default value of these only when the command repeats it.
CONFIRM_ON_RERUN: dict[str, str] = {
    "model.factory": "imports that module and runs that function",
    "model.trust_checkpoint": "unpickles whole modules from the checkpoint (runs code from the file)",
    "runner.address": "sends the run to that Dask scheduler (which exchanges pickled data with this process)",
    "inference.cache_dir": "loads and writes model exports in that folder",
    "input.formats": "opens the images with those decoders (the formats outside the default list include decoders "
    "with published vulnerabilities)",
}


def _allowed(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in ALLOWED_RERUN_OVERRIDES)


def _leaves(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _leaves(v, key + ".") if isinstance(v, dict) else [(key, v)]
    return out


def _get(d: dict, dotted: str):
    for p in dotted.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def out_root_of(config_file: Path | None, overrides: list[str]) -> Path | str:
    """The output root to look for the run in: ``--set output.root``, else the config file's,
    else the default (``outputs``); a ``Path``, or an object-store URL string.

    Raises:
        ConfigError: an output root with an unknown URL scheme.
    """
    root = load_config(config_file).output.root if config_file else Config().output.root
    for item in overrides:
        parts, value = parse_override(item)
        if parts == ["output", "root"]:
            try:
                root = _root_value(str(value))
            except ValueError as exc:
                raise ConfigError(f"output.root: {exc}") from None
    return root


def rerun_config(recorded: dict, config_file: Path | None, overrides: list[str]) -> Config:
    """The run's recorded config with the allowed overrides applied.

    ``--set`` may name only ``output.root``, ``runner.*``, ``inference.*`` or ``notify.*`` (and
    repeat a :data:`CONFIRM_ON_RERUN` key's recorded value); a ``--config`` file may hold other
    keys only with the values the run recorded (so the run's own config file can be passed
    again). The recorded config comes from the run's manifest: a non-default value of a
    :data:`CONFIRM_ON_RERUN` key (``model.factory``, ``model.trust_checkpoint``,
    ``runner.address``, ``inference.cache_dir``) is used only when ``--set`` or ``--config``
    gives it too. ``notify.*`` is never recorded: pass it again to be notified of the rerun.

    Raises:
        ConfigError: a forbidden override (named, with the recorded value), an unconfirmed
            recorded value of a :data:`CONFIRM_ON_RERUN` key, or an invalid value.
    """
    base = build_config(recorded)
    file_items: list[str] = []
    if config_file is not None:
        raw = read_config_file(config_file)
        build_config(raw)  # validates the file and gives its usual errors
        for key, value in _leaves(raw):
            item = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            if _allowed(key):
                file_items.append(item)
            elif build_config(recorded, [item]).to_dict() != base.to_dict():
                raise ConfigError(
                    f"{config_file} sets {key} to {value!r} but run {recorded['run']['run_id']} recorded "
                    f"{_get(base.to_dict(), key)!r}; a rerun keeps the run's config (only output.root, runner.*, notify.* and "
                    "inference.* may change) — start a new run with `imgscore run` to change it"
                )
    given = {".".join(parse_override(item)[0]) for item in file_items}
    for item in overrides:
        parts, _ = parse_override(item)
        key = ".".join(parts)
        given.add(key)
        repeats = key in CONFIRM_ON_RERUN and build_config(recorded, [item]).to_dict() == base.to_dict()
        if not _allowed(key) and not repeats:
            raise ConfigError(
                f"--set {item!r}: a rerun keeps the run's recorded config; only output.root, runner.*, inference.* and notify.* "
                f"may be overridden (recorded {key} = {_get(base.to_dict(), key)!r}); start a new run to change {key}"
            )
    if config_file is not None:
        given |= {key for key, _ in _leaves(read_config_file(config_file))}
    _confirmed(base, given, recorded)
    return build_config(recorded, [*file_items, *overrides])


def _confirmed(base: Config, given: set[str], recorded: dict) -> None:
    """Refuse a recorded non-default value of a :data:`CONFIRM_ON_RERUN` key that the command
    (``--set`` or ``--config``) does not repeat."""
    defaults, values = Config().to_dict(), base.to_dict()
    for key, why in CONFIRM_ON_RERUN.items():
        value = _get(values, key)
        if key in given or value == _get(defaults, key):
            continue
        shown = value if isinstance(value, str) else json.dumps(value)
        raise ConfigError(
            f"run {(recorded.get('run') or {}).get('run_id')} recorded {key} = {value!r}, which {why}; a rerun reads its "
            f"config back from output.root, which is not trusted for that — pass it again if you mean it: "
            f"--set {key}={shown} (or --config with the run's config file)"
        )
