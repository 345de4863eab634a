"""The Prefect task ``plan``: load the models, run the canary, plan the run."""

from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from imgscore.config.schema import Config
from imgscore.errors import ConfigError
from imgscore.images.preprocess import DecodeOptions
from imgscore.images.scan import first_entries
from imgscore.inference.backends.canary import start_inference
from imgscore.inference.device import configure_threads, resolve_device
from imgscore.inference.embeddings import choose_layer, embedding_dim
from imgscore.inference.model import load_model
from imgscore.runstate.plan import (
    RunPlan,
    input_root_of,
    plan_new_run,
)
from imgscore.runstate.resume import resume_plan


@task(name="plan", cache_policy=NO_CACHE, persist_result=False)
def plan_task(cfg: Config, run_id: str) -> RunPlan:
    """Resume the plan this flow run's first attempt wrote, or check the model loads and plan
    the run: scan streamed into the index, shards cut, manifest written (imgscore/runstate/plan.py)."""
    resumed = resume_plan(cfg.output.root, run_id, flow_run.get_id(), cfg.input.root)
    if resumed is not None:
        return resumed
    device = resolve_device(cfg.inference.device) if cfg.runner.type == "thread" else torch.device("cpu")
    lms = [
        load_model(m, cfg.preprocess_for(m), device, cfg.inference.channels_last, cfg.inference.cache_dir)
        for m in cfg.scored_models()
    ]
    if cfg.inference.fold_bn:
        lms = [lm.folded() for lm in lms]
    if (
        cfg.output.embeddings
    ):  # no embedding layer, or lengths that one table cannot hold: refused before anything is written (exit 2)
        check_embedding_layers(lms, [m.resolved_name for m in cfg.scored_models()], cfg.output.embedding_layer, device)
    # reduced precision: the canary on the folder's first images, before anything is written
    first = (
        first_entries(
            input_root_of(cfg),
            cfg.inference.canary_images * 4,
            cfg.input.layout,
            cfg.input.follow_symlinks,
            cfg.input.formats,
        )
        if cfg.inference.precision != "fp32"
        else []
    )
    starts = [
        start_inference(
            cfg.inference,
            lm,
            str(cfg.input.root),
            first,
            DecodeOptions.from_input(cfg.input),
            configure_threads(cfg.inference.num_threads, 1),
        )
        for lm in lms
    ]
    # several models: one precision for the run; a canary that fell back to fp32 sets it for all
    inference = next((s for s in starts if s.get("precision") != cfg.inference.precision), starts[0])
    infos = [{"name": m.resolved_name, **lm.info()} for m, lm in zip(cfg.scored_models(), lms, strict=True)]
    plan = plan_new_run(cfg, run_id, infos[0], flow_run_id=flow_run.get_id(), models=infos)
    plan.manifest.inference = inference
    plan.state.save()
    return plan


def check_embedding_layers(lms: list, names: list[str], layer: str | None, device) -> None:
    """``output.embeddings`` with these models: each has the embedding layer, and all vectors
    have one length (one ``fixed_size_list`` column per embeddings part file).

    Raises:
        ConfigError: a model has no such layer, or two models' vectors differ in length (named).
    """
    dims = []
    for lm in lms:
        found = choose_layer(lm.module, layer, lm.num_classes)
        dims.append(embedding_dim(lm.module, found, lm.preprocess.crop, device) if len(lms) > 1 else None)
    if len(set(dims)) > 1:
        shown = ", ".join(f"{n} {d}" for n, d in zip(names, dims, strict=True))
        raise ConfigError(
            f"output.embeddings with models of different embedding lengths ({shown}); one embeddings table holds one "
            "length: set output.embedding_layer to a layer of equal width in each, or score them in separate runs"
        )


def effective_config(cfg: Config, plan: RunPlan) -> Config:
    """``cfg`` with each fetched checkpoint pinned to the identity and sha256 the plan recorded
    (every shard, and a rerun, loads those bytes or fails) and with the precision the run start
    settled on (fp32 after a failed canary with ``inference.on_canary_fail=fp32``); the shards
    score with this."""
    cfg = cfg.pinned(plan.manifest.scored_models)
    precision = plan.manifest.inference.get("precision") or cfg.inference.precision
    if precision == cfg.inference.precision:
        return cfg
    return cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"precision": precision})})


def inference_metadata(plan: RunPlan) -> dict:
    """Every part file's ``inference`` metadata, the same for the whole run: the configured
    backend (``auto`` resolves per worker: the manifest's shards say which ran), the precision
    the shards run after the canary, the one requested, and the canary's result (or None)."""
    return {k: plan.manifest.inference.get(k) for k in ("backend", "precision", "precision_requested", "canary")}
