"""What scores images in this process: one :class:`Scorer` per model — the loaded model on its
device, the worker's thread share and the backend that runs its forward — built once per shard
from the per-process model cache (:func:`load_scorer`, :func:`load_scorers`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imgscore.config.running import OutputConfig
from imgscore.config.schema import Config
from imgscore.config.scoring import InferenceConfig, ModelConfig, PreprocessConfig
from imgscore.images.preprocess import PreprocessSpec
from imgscore.inference import autotune
from imgscore.inference import embeddings as emb
from imgscore.inference.backends.auto import resolve_backend
from imgscore.inference.backends.factory import make_forward
from imgscore.inference.backends.forward import Forward
from imgscore.inference.device import configure_threads, resolve_device, worker_name
from imgscore.inference.model import LoadedModel, load_model


@dataclass(frozen=True)
class Scorer:
    """What scores images in this process: the model on its device, and how batches are fed.

    Built once per shard by :func:`load_scorer`; the model itself comes from the per-process
    cache (``imgscore.inference.model.load_model``), so a worker loads it once.
    """

    lm: LoadedModel
    device: torch.device
    inference: InferenceConfig
    threads: int  # this worker's core share: torch intra-op threads unless the split says fewer
    worker: str  # host:pid
    backend: str = "torch"  # inference.backend, with auto resolved on this machine
    tap: emb.Tap | None = None  # output.embeddings: the hook that reads each image's features
    embedding_dim: int | None = None  # D, the length of those features
    name: str = ""  # the model's name in the config: every row's model_name

    def forward(self, threads: int) -> Forward:
        """The backend's forward pass with ``threads`` threads (one session per process and count)."""
        inf = self.inference
        return make_forward(self.lm, self.backend, inf.precision, threads, inf.cache_dir, inf.channels_last)


def load_scorer(
    model_cfg: ModelConfig,
    pre_cfg: PreprocessConfig,
    inf_cfg: InferenceConfig,
    workers_on_host: int = 1,
    rank: int | None = None,
    out_cfg: OutputConfig | None = None,
) -> Scorer:
    """Resolve this worker's device, thread share and backend, and load (or reuse) the model.

    With ``out_cfg.embeddings`` the scorer also carries the hook on the embedding layer
    (``imgscore.inference.embeddings``) and scores with torch (``auto`` is not measured then).

    Raises:
        ModelError: the model cannot be built or loaded (or exported) on this worker (Prefect
            retries the shard); ConfigError: the backend cannot run here, or no embedding layer.
    """
    device = resolve_device(inf_cfg.device, rank)
    threads = configure_threads(inf_cfg.num_threads, workers_on_host)
    lm = load_model(model_cfg, pre_cfg, device, channels_last=inf_cfg.channels_last, cache_dir=inf_cfg.cache_dir)
    if inf_cfg.fold_bn:
        lm = lm.folded()  # cached per loaded model: folded once per process, not per shard
    batch = inf_cfg.batch_size if isinstance(inf_cfg.batch_size, int) else autotune.MIN_BATCH
    # torch, or ONNX Runtime / OpenVINO (export cached on disk); auto: measured once per machine
    if out_cfg is not None and out_cfg.embeddings:
        layer = emb.choose_layer(lm.module, out_cfg.embedding_layer, lm.num_classes)
        dim = emb.embedding_dim(lm.module, layer, lm.preprocess.crop, device)
        return Scorer(
            lm,
            device,
            inf_cfg,
            threads,
            worker_name(),
            "torch",
            emb.tap_for(lm.module, layer),
            dim,
            model_cfg.resolved_name,
        )
    backend = resolve_backend(
        lm, inf_cfg.backend, inf_cfg.precision, threads, batch, inf_cfg.cache_dir, inf_cfg.channels_last
    )
    return Scorer(lm, device, inf_cfg, threads, worker_name(), backend, name=model_cfg.resolved_name)


def load_scorers(cfg: Config, workers_on_host: int = 1, rank: int | None = None) -> list[Scorer]:
    """One :class:`Scorer` per model the run scores (``cfg.scored_models()``), in the config's order.

    Raises:
        ModelError, ConfigError: as :func:`load_scorer`, for any of the models.
    """
    return [
        load_scorer(m, cfg.preprocess_for(m), cfg.inference, workers_on_host, rank, cfg.output)
        for m in cfg.scored_models()
    ]


def transform_specs(scorers: list[Scorer]) -> tuple[list[PreprocessSpec], list[int]]:
    """The distinct eval transforms of ``scorers`` and, per scorer, the index of its own: models
    with the same preprocessing share one tensor, the others one decode (``ShardDataset``)."""
    specs: list[PreprocessSpec] = []
    for sc in scorers:
        if sc.lm.preprocess not in specs:
            specs.append(sc.lm.preprocess)
    return specs, [specs.index(sc.lm.preprocess) for sc in scorers]
