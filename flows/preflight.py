"""What the CLI refuses before anything runs: bad roots, a model that does not load, a rerun that cannot be.

Each check fails with a :class:`~imgscore.errors.UsageError` (exit 2): one line naming the bad
value and the fix, nothing written. The root checks need neither torch nor Prefect (a typo fails
in well under a second); the model checks load the models in this process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from imgscore.config.loading import load_config
from imgscore.config.schema import Config
from imgscore.errors import ConfigError, InputError, ModelError, RunLockedError, UsageError
from imgscore.images.extensions import no_images_message
from imgscore.images.scan import check_roots_apart, has_images
from imgscore.io import file_ops, object_store, objects, storage
from imgscore.io.storage import AnyPath
from imgscore.runstate.manifest import Manifest

if TYPE_CHECKING:
    import argparse


def load_model_here(cfg: Config) -> list[Any]:
    """Load the run's models in this process (the device the thread runner would use; CPU when
    shards run elsewhere), so a bad checkpoint is refused before anything is planned; returns
    them (``LoadedModel``) in the config's order.

    Raises:
        ModelError, ConfigError: a checkpoint that does not load, a backend or precision that
            cannot run here.
    """
    import torch

    from imgscore.inference.backends.factory import preflight
    from imgscore.inference.device import resolve_device
    from imgscore.inference.model import load_model

    device = resolve_device(cfg.inference.device) if cfg.runner.type == "thread" else torch.device("cpu")
    lms = [
        load_model(m, cfg.preprocess_for(m), device, cfg.inference.channels_last, cfg.inference.cache_dir)
        for m in cfg.scored_models()
    ]
    preflight(cfg.inference.backend, cfg.inference.precision, device)  # the runtime is installed, the combination runs
    return lms


def check_paths(cfg: Config) -> None:
    """Refuse a bad input root or output root (exit 2, nothing written), before torch or Prefect.
    An object-store root is listed (input) or written and deleted once (output) with this
    machine's credentials; a missing client package is named with its pip line.

    Raises:
        InputError: ``input.root`` unset, missing, not a folder, or without a file to score.
        ConfigError: a root's client package missing, the two roots the same place, the output
            root not writable (or its bucket missing).
    """
    object_store.configure(cfg.storage.settings())
    root = cfg.input.root
    if root is None:
        raise InputError("input.root is not set; pass --set input.root=/path/to/images or set it in the config")
    for r in (root, cfg.output.root):
        if (need := object_store.missing_package(r)) is not None:
            raise ConfigError(need)
    check_roots_apart(
        root, cfg.output.root
    )  # the same folder: refused; output.root inside input.root: left out of the scan
    if not has_images(root, cfg.input.follow_symlinks, cfg.input.formats):  # a missing root or a file: refused in there
        raise InputError(no_images_message(root, cfg.input.formats))
    check_writable(cfg.output.root)


def check_writable(out_root: AnyPath) -> None:
    """Refuse an output root this machine cannot write: one empty file written and deleted under
    it (:func:`imgscore.io.file_ops.probe_write`; a local folder is created first).

    Raises:
        ConfigError: its bucket does not exist (asked first: some stores create a bucket on the
            probe's PUT), or the write failed — locally with the OS's reason, on a store with
            its answer and where credentials come from.
    """
    if (why := object_store.missing_bucket(out_root, "output.root")) is not None:
        raise ConfigError(why)
    try:
        file_ops.probe_write(out_root, f".imgscore-write-check-{os.getpid()}")
    except (OSError, ValueError) as exc:  # ValueError: a ${VAR} storage option that is not set here
        local = storage.local_path(out_root)
        if local is not None and isinstance(exc, OSError):
            raise ConfigError(
                f"output.root {str(local)!r} is not a writable folder ({exc.strerror}); set output.root to a "
                "folder you can write to"
            ) from None
        raise ConfigError(
            f"output.root {str(out_root)!r} is not writable here ({objects.describe_error(exc)}); check the "
            "bucket and the credentials this machine finds (AWS_*, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, "
            "AZURE_STORAGE_*)"
        ) from None


def configure_storage(args: argparse.Namespace) -> None:
    """Object-store settings for a command that reads a run before its recorded config is known
    (rerun, report): ``storage.*`` from ``--config`` and ``--set``; credentials from the environment."""
    items = [o for o in args.overrides if o.split("=", 1)[0].strip().startswith("storage.")]
    object_store.configure(load_config(args.config, items).storage.settings())


def check_rerun(cfg: Config, manifest: Manifest, run_dir: AnyPath) -> None:
    """Refuse a rerun before Prefect starts: run locked, input folder gone, or a model other than the run's.

    Raises:
        RunLockedError: a live process holds the run's lock. InputError: the run's local input
            folder is gone. ModelError: a checkpoint changed since the run (its ``model_id``); a
            fetched checkpoint whose object changed and whose recorded version the store cannot serve.
    """
    from imgscore.runstate import lock as run_lock

    held = run_lock.read_lock(run_dir)
    if held is not None and not run_lock.is_stale(held):
        raise RunLockedError(f"run {manifest.run_id} is locked by {run_lock.describe(held, run_dir)}")
    root = manifest.input["root"]
    local = storage.local_path(root)
    if local is not None and not local.is_dir():
        raise InputError(
            f"run {manifest.run_id} scored {root!r}, which is no longer a folder; restore it to rerun the run"
        )
    cfg = cfg.pinned(manifest.scored_models)  # a fetched checkpoint: the bytes the run recorded, or refused
    for mcfg, lm, was_info in zip(cfg.scored_models(), load_model_here(cfg), manifest.scored_models, strict=False):
        was = was_info["model_id"]
        if lm.model_id != was:
            raise ModelError(
                f"model.checkpoint {mcfg.checkpoint} changed since run {manifest.run_id} (model_id {was[:12]}… → "
                f"{lm.model_id[:12]}…); a rerun must use the run's model: restore the checkpoint, or start a new run "
                "with `imgscore run`"
            )


def check_run_id_arg(run_id: str | None) -> None:
    """Refuse a RUN_ID argument that cannot be a run's folder name (a path, ``..``) as what it is:
    a bad command line (exit 2) — not as tampered run state.

    Raises:
        UsageError: naming the argument and what a run id looks like.
    """
    from imgscore.io.containment import is_plain_name

    if run_id is not None and not is_plain_name(run_id):
        raise UsageError(
            f"RUN_ID {run_id!r} is not a run id: pass the name of a folder under OUT/runs (e.g. "
            "20260301T020000Z-a1b2c3, as `imgscore run` printed it), not a path"
        )


@contextlib.contextmanager
def notify_refusal(cfg: Config) -> Iterator[None]:
    """A run refused before its flow run starts (exit 2: bad input root, model or checkpoint)
    still notifies ``notify.webhook_url``: the payload has ``status`` ``refused``, ``run_id``,
    ``counts``, ``prefect_state`` and ``flow_run_id`` null, and the refusal in ``message``
    (``imgscore.flows.notify.refusal_payload``). ``notify.block`` is not used here: loading a
    block needs the Prefect API, which a refused run never starts."""
    try:
        yield
    except UsageError as exc:
        if cfg.notify.webhook_url:
            from imgscore.flows import notify

            notify.send(
                cfg.notify.model_copy(update={"block": None}), notify.refusal_payload(cfg.output.root, str(exc))
            )
        raise
