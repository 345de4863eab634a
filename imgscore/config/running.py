"""The config sections of how a run goes and where its results go: ``run``, ``runner``,
``output``, ``drift``, ``notify`` and ``storage``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from imgscore.config.fields import PATH_NOTE, Root, Section, not_a_number
from imgscore.io import object_store
from imgscore.io.containment import is_plain_name


class RunConfig(Section):
    """How the run is cut and judged."""

    shard_size: int = Field(1000, gt=0, description="images per shard (one task run each)")
    max_error_rate: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="failed/scanned above this, with at least run.min_errors failed, ends the run failed (exit 1)",
    )
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
        5,
        ge=0,
        description="fewer failed images than this never fail a run, whatever the rate "
        "(1 corrupt image of 1 new is not a failed night; 300 of 1000 is)",
    )
    run_id: str | None = Field(None, description="default: UTC timestamp + random suffix")

    @field_validator("run_id")
    @classmethod
    def _folder_name(cls, v: str | None) -> str | None:
        if v is not None and not is_plain_name(v):
            raise ValueError(f"run.run_id {v!r} must be one folder name (no '/', '\\', '..' or control characters)")
        return v


class RunnerConfig(Section):
    """Where shards run."""

    type: Literal["thread", "dask"] = Field(
        "thread", description="thread: a thread pool in this process; dask: Dask workers"
    )
    n_workers: int = Field(1, gt=0, description="threads (thread) or worker processes (dask LocalCluster)")
    threads_per_worker: int = Field(1, gt=0, description="dask: shards each worker scores at once")
    address: str | None = Field(None, description="existing Dask scheduler, e.g. tcp://host:8786")
    _address_is_text = field_validator("address", mode="before")(not_a_number)
    warm_workers: bool = Field(
        True,
        description="dask: start the cluster with the run (imgscore run: before the model loads) and have each "
        "worker import torch and load the model before its first shard",
    )


class OutputConfig(Section):
    """Where results go."""

    root: Root = Field(
        Path("outputs"),
        description="holds predictions/, errors/ and runs/: a path, or s3://, gs://, az:// URL" + PATH_NOTE,
    )
    topk: int = Field(5, gt=0, description="how many classes topk_indices/topk_scores keep")
    embeddings: bool = Field(
        False,
        description="also write each image's penultimate-layer features (the classifier head's input) to the "
        "embeddings/ table, one fixed-size vector per image (docs/results.md, 'Analytics recipes')",
    )
    embedding_layer: str | None = Field(
        None,
        description="module whose output (flattened from dimension 1) is the embedding, as named in "
        "model.named_modules(), e.g. 'avgpool'; default: the input of the classifier head (fc, classifier[-1], "
        "heads.head, …)",
    )
    embedding_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="element type of the embedding column; float16 halves the table (about 1e-3 relative rounding)",
    )


class DriftConfig(Section):
    """Night-over-night drift: each run compared with the previous complete runs of the same
    input folder and model (``imgscore.report.drift``). Thresholds left unset are not checked;
    a threshold crossed is a warning (summary, Prefect artifact, notification), a failed run only
    with ``fail: true``."""

    enabled: bool = Field(True, description="compare each run with recent nights (report, summary)")
    baseline_runs: int = Field(
        7, gt=0, description="how many previous complete runs of the same input root and model to compare with"
    )
    min_images: int = Field(
        50,
        gt=0,
        description="fewer predictions than this tonight or in the baseline: numbers shown, no warning (too few to "
        "judge)",
    )
    low_confidence: float = Field(
        0.5, gt=0.0, lt=1.0, description="top-1 probability below this counts as low confidence"
    )
    max_psi: float | None = Field(
        0.25,
        ge=0.0,
        description="warn when the predicted-class PSI exceeds this (0.1-0.25: moderate shift, above 0.25: major)",
    )
    max_class_shift: float | None = Field(
        None, gt=0.0, le=1.0, description="warn when one class's share moves by more than this (0.1 = 10 points)"
    )
    max_mean_confidence_drop: float | None = Field(
        None, gt=0.0, le=1.0, description="warn when mean top-1 probability falls by more than this"
    )
    max_low_confidence_increase: float | None = Field(
        None, gt=0.0, le=1.0, description="warn when the share of images below low_confidence rises by more than this"
    )
    max_error_rate_increase: float | None = Field(
        None, gt=0.0, le=1.0, description="warn when the error rate rises by more than this"
    )
    max_embedding_shift: float | None = Field(
        None,
        gt=0.0,
        le=2.0,
        description="warn when the cosine distance between tonight's and the baseline's mean embedding exceeds this",
    )
    fail: bool = Field(False, description="a drift warning fails the run (exit 1) instead of only warning")


class NotifyConfig(Section):
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
    timeout_s: float = Field(
        10.0, gt=0, description="seconds the POST may take; a failing notification is one warning line"
    )

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
            raise ValueError(
                f"notify.block must be 'block-type-slug/block-name' (lowercase letters, digits, dashes), "
                f"e.g. slack-webhook/nightly-alerts; got {v!r}"
            )
        return v


class StorageConfig(Section):
    """How object-store roots are opened (``imgscore.io.storage``). Credentials and endpoints
    come from each machine's standard chain (``AWS_*``, ``AWS_PROFILE``, instance roles;
    ``GOOGLE_APPLICATION_CREDENTIALS``; ``AZURE_STORAGE_*``); these keys add what the chain cannot say."""

    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for s3fs/gcsfs/adlfs (endpoint_url, client_kwargs, anon, …); "
        "a credential only as a ${ENV_VAR} reference, never its value",
    )
    retries: int = Field(
        4, ge=0, description="retries of a request after throttling (503 SlowDown), 5xx or a timeout, with backoff"
    )
    read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds a read may stall; one object read, all attempts, is cut at read_timeout_s × (retries + 1)",
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="seconds to open a connection to the store")

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        object_store.check_options(v)
        return v

    def settings(self) -> object_store.Settings:
        """What :func:`imgscore.io.object_store.configure` takes."""
        return object_store.Settings.of(self.options, self.retries, self.read_timeout_s, self.connect_timeout_s)
