"""The whole typed configuration of a run (:class:`Config`, one field per section) and the
generated key reference (``imgscore config``; docs/configuration.md's key table).

The sections are in :mod:`imgscore.config.scoring` (input, model, preprocess, inference) and
:mod:`imgscore.config.running` (run, runner, output, drift, notify, storage); reading a YAML
file and ``--set`` overrides into a :class:`Config` is :mod:`imgscore.config.loading`. Functions
elsewhere receive only the section they use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, model_validator
from pydantic.fields import FieldInfo

from imgscore.config.fields import Section
from imgscore.config.running import (
    DriftConfig,
    NotifyConfig,
    OutputConfig,
    RunConfig,
    RunnerConfig,
    StorageConfig,
)
from imgscore.config.scoring import InferenceConfig, InputConfig, ModelConfig, PreprocessConfig


class Config(Section):
    """The whole resolved configuration of a run."""

    input: InputConfig = InputConfig()
    model: ModelConfig = ModelConfig()
    models: list[ModelConfig] | None = Field(
        None,
        description="several model blocks (each as model.*, with a name) scored in one pass: each image is decoded "
        "once and every model scores it; replaces model (docs/checkpoints.md, 'Several models')",
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
            raise ValueError(
                "both model and models are set; put the model block into the models list (with a name), "
                "or use model alone"
            )
        if not self.models:
            raise ValueError("models is empty; list at least one model block, or use model")
        names = [m.resolved_name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"models: the name {dup[0]!r} is used by {names.count(dup[0])} models; "
                "give each a distinct models[i].name"
            )
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

    def pinned(self, infos: list[dict[str, Any]]) -> Config:
        """This config with each fetched checkpoint pinned (``model.checkpoint_pin``) to what the
        run's plan resolved: ``infos`` are the manifest's models (``LoadedModel.info()``), whose
        ``checkpoint`` entry holds the identity and sha256. Models without one are as they were."""

        def pin(m: ModelConfig, info: dict[str, Any] | None) -> ModelConfig:
            ck = (info or {}).get("checkpoint")
            if not ck or m.checkpoint is None or str(m.checkpoint) != ck.get("url"):
                return m
            return m.model_copy(update={"checkpoint_pin": f"{ck['sha256']} {ck['identity']}"})

        models = self.scored_models()
        pinned = [pin(m, infos[i] if i < len(infos) else None) for i, m in enumerate(models)]
        if self.models is not None:
            return self.model_copy(update={"models": pinned})
        return self.model_copy(update={"model": pinned[0]})

    @model_validator(mode="after")
    def _embeddings_backend(self) -> Config:
        if self.output.embeddings and self.inference.backend in ("onnxruntime", "openvino"):
            raise ValueError(
                "output.embeddings reads the torch module's layers, but inference.backend is "
                f"{self.inference.backend}; set inference.backend=torch (or auto, which then scores with torch), "
                "or output.embeddings=false"
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


def _default_text(field: FieldInfo) -> str:
    """A field's default as the YAML one would write (``–`` for none)."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "–"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        return str(value)
    text = yaml.safe_dump(value if not isinstance(value, tuple) else list(value), default_flow_style=True)
    return text.strip().removesuffix("...").strip()


def config_reference() -> list[dict[str, str]]:
    """Every config key as ``{key, default, meaning}``, section by section in :class:`Config`'s
    order, generated from the models' fields and descriptions (``imgscore config``; the key table of
    docs/configuration.md is checked against it)."""
    rows: list[dict[str, str]] = []
    for section, sf in Config.model_fields.items():
        model = sf.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):  # models: a list of model blocks
            rows.append({"key": section, "default": _default_text(sf), "meaning": sf.description or ""})
            continue
        for name, field in model.model_fields.items():
            rows.append(
                {"key": f"{section}.{name}", "default": _default_text(field), "meaning": field.description or ""}
            )
    return rows
