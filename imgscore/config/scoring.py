"""The config sections of what is scored and how: ``input``, ``model`` (and each model's
``transform``), ``preprocess`` and ``inference``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import Field, ValidationInfo, field_validator, model_validator

from imgscore.config.fields import (
    PATH_NOTE,
    Checkpoint,
    Root,
    Section,
    no_credential,
    not_a_number,
    number_message,
    user_path,
    yaml_boolean_message,
)
from imgscore.images.formats import DEFAULT_FORMATS, check_formats
from imgscore.io.containment import is_plain_name

# Pillow's default decompression-bomb limit (about 89.5 megapixels). Read once; never changed.
PILLOW_MAX_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 178956970 // 2)


class InputConfig(Section):
    """What to score and how to read it."""

    root: Root | None = Field(
        None,
        description="folder to score (ImageFolder layout or flat): a path, or s3://, gs://, az:// URL of a prefix"
        + PATH_NOTE,
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
        30.0,
        gt=0,
        description="seconds one image's decode may take, in worker processes and inline "
        "(inference.num_workers=0); a slower one is an error (DecodeError.timeout), the rest of the batch is scored",
    )

    @field_validator("formats", mode="before")
    @classmethod
    def _allowed_formats(cls, v: Any) -> list[str]:
        if isinstance(v, str):  # --set input.formats=JPEG or "JPEG, PNG"
            v = [p for p in v.replace(",", " ").split()]
        if not isinstance(v, list | tuple):
            raise ValueError(f"input.formats must be a list of format names such as [JPEG, PNG], got {v!r}")
        return list(check_formats(v))


class TransformConfig(Section):
    """One model's own eval transform over ``preprocess.*`` (several models, each its recipe);
    unset fields come from ``preprocess.*``, then the model's weights."""

    resize: int | None = Field(None, gt=0, description="shorter side after resizing, pixels")
    crop: int | None = Field(None, gt=0, description="center crop side, pixels")
    mean: list[float] | None = Field(None, min_length=3, max_length=3, description="per-channel mean (RGB, 0–1 scale)")
    std: list[float] | None = Field(None, min_length=3, max_length=3, description="per-channel std (RGB, 0–1 scale)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(
        None, description="resize interpolation (antialiased)"
    )


class ModelConfig(Section):
    """Which network and weights; see ``imgscore.inference.model.load_model``."""

    name: str | None = Field(
        None,
        description="what rows call this model (the model_name column; one word, unique in models:); "
        "default: model.arch, or the function name of model.factory",
    )
    arch: str = Field("resnet50", description="torchvision.models builder name")
    checkpoint: Checkpoint | None = Field(
        None,
        description="state_dict, training checkpoint dict, safetensors, TorchScript or torch.export .pt2 (trusted "
        "only): a local file, an s3:// gs:// az:// object, an http(s):// URL, or an MLflow models:/NAME@ALIAS, "
        "models:/NAME/VERSION or runs:/RUN_ID/PATH (fetched once per machine into inference.cache_dir/models)"
        + PATH_NOTE,
    )
    registry_uri: str | None = Field(
        None,
        description="the MLflow tracking/registry server of a models:/ or runs:/ model.checkpoint, e.g. "
        "http://mlflow:5000 (default: MLFLOW_TRACKING_URI); needs pip install 'imgscore[mlflow]'",
    )
    checkpoint_pin: str | None = Field(
        None,
        description="'SHA256 IDENTITY' of a fetched model.checkpoint: the run's plan sets it from what it fetched, so "
        "every shard and a rerun load exactly those bytes; set 'SHA256' by hand to refuse any other bytes",
    )
    weights: str | None = Field(
        None, description="torchvision weights name (IMAGENET1K_V2, DEFAULT) from the local hub cache"
    )
    classes: Path | list[str] | None = Field(
        None,
        description="file with one class name a line (UTF-8), or a list in output order (quote names YAML reads as "
        "booleans "
        "or numbers: 'no', 'yes', 'on', 'off', '001', '12:30')" + PATH_NOTE,
    )
    num_classes: int | None = Field(None, gt=0, description="head size; inferred from the checkpoint when unset")
    trust_checkpoint: bool = Field(
        False,
        description="allow whole pickled modules and torch.export .pt2 programs (loading either can run code from "
        "the file)",
    )
    factory: str | None = Field(
        None,
        description="'package.module:function' called with no arguments, returning the nn.Module that "
        "model.checkpoint's state_dict loads into (architectures torchvision does not build); "
        "replaces model.arch",
    )
    transform: TransformConfig | None = Field(
        None,
        description="this model's resize, crop, mean, std, interpolation over preprocess.* (models: each its own "
        "recipe; "
        "decoding is shared, the draft sized for the largest resize)",
    )

    _names_are_text = field_validator("name", "arch", "weights", "factory", "registry_uri", mode="before")(not_a_number)
    _registry_uri_has_no_secret = field_validator("registry_uri")(no_credential)

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
                    raise ValueError(
                        f"model.classes item {i} is a {type(c).__name__}, not a name; write each class name as text"
                    )
            return v
        if isinstance(v, set | frozenset | dict | tuple):  # YAML !!set, !!omap, a mapping
            kind = "set" if isinstance(v, set | frozenset) else type(v).__name__
            raise ValueError(
                f"model.classes must be a list (a YAML sequence, in order), got a {kind}; "
                "a set has no order and a mapping is not a list of names: write [first, second, ...] in output order"
            )
        if isinstance(v, int | float) and not isinstance(v, bool):
            raise ValueError(number_message("model.classes", v))
        return user_path(v)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not is_plain_name(v) or v != v.strip()):
            raise ValueError(
                f"model name {v!r} must be one word without '/', '\\', '..', spaces at its ends or control characters"
            )
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
                f"model.checkpoint ({self.checkpoint}) and model.weights ({self.weights}) are both set; set only one"
            )
        if self.factory is not None:
            mod, sep, fn = self.factory.partition(":")
            if not sep or not mod.strip() or not fn.strip():
                raise ValueError(
                    f"model.factory {self.factory!r} is not 'package.module:function', e.g. "
                    "'mymodels.heads:resnet18_dropout'"
                )
            if self.weights is not None:
                raise ValueError(
                    f"model.factory ({self.factory}) builds its own module; model.weights ({self.weights}) is for "
                    "torchvision builders: use model.checkpoint"
                )
        return self


class PreprocessConfig(Section):
    """Eval transform. Unset fields come from the torchvision weights' ``transforms()``, else from
    torchvision's classification reference recipe (resize 256, crop 224, ImageNet mean/std)."""

    resize: int | None = Field(None, gt=0, description="shorter side after resizing, pixels")
    crop: int | None = Field(None, gt=0, description="center crop side, pixels")
    mean: list[float] | None = Field(
        None, min_length=3, max_length=3, description="per-channel mean subtracted (RGB, 0–1 scale)"
    )
    std: list[float] | None = Field(
        None, min_length=3, max_length=3, description="per-channel std divided by (RGB, 0–1 scale)"
    )
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(
        None, description="resize interpolation (antialiased)"
    )
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
        False,
        description="convert images with an embedded ICC profile to sRGB (ImageCms); off: pixels as stored, like "
        "torchvision",
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


class InferenceConfig(Section):
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
        300.0,
        gt=0,
        description="DataLoader timeout per batch when num_workers > 0, seconds (with lanes, plus four "
        "times the batch's measured one-thread forward)",
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
        None,
        description="where ONNX exports, auto's measurements and fetched model.checkpoint URLs (models/) are cached "
        "(default ~/.cache/imgscore)" + PATH_NOTE,
    )
    canary_images: int = Field(
        64,
        gt=0,
        description="reduced precision: the run's first N images scored with fp32 torch and "
        "the fast path; refused below 99.5 % top-1 agreement or above 0.01 mean absolute Δscore",
    )
    on_canary_fail: Literal["refuse", "fp32"] = Field(
        "refuse", description="refuse: exit 2 before scoring; fp32: warn and score in fp32 with the same backend"
    )
    channels_last: bool = Field(True, description="NHWC memory format for conv nets (faster on CPU and GPU)")
    fold_bn: bool = Field(
        True,
        description="fold each Conv→BatchNorm pair into one conv before scoring (torch.fx; see benchmarks/NOTES.md)",
    )
    num_threads: int | None = Field(None, gt=0, description="torch threads per worker; default: its share of the cores")

    _home = field_validator("cache_dir", mode="before")(user_path)

    @field_validator("batch_size", "num_workers")
    @classmethod
    def _count_or_auto(cls, v: int | str, info: ValidationInfo) -> int | str:
        if isinstance(v, int) and (v < 0 or (v == 0 and info.field_name == "batch_size")):
            need = "positive" if info.field_name == "batch_size" else "0 or more"
            raise ValueError(f"inference.{info.field_name} must be {need} or auto, got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"inference.device {v!r} is not one of auto, cpu, cuda, cuda:N, mps")
