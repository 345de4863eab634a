"""One bad file never costs the rest: per-image and per-batch failure capture, junk and
names in the scan, accounting, error budget, shard retries, quiet terminal.

The acceptance folder mixes real photos (scikit-image) in awkward-but-valid encodings with broken
files and junk; it is scored end to end through the Prefect flow and the Parquet is read back.
The model is a small TorchScript probe (average colour of a 4x4 grid → 8 classes, seeded) whose
outputs move when an image is rotated or its colours change — so "within 2 %" means something —
and which raises for an all-white input (the marker for the inference-isolation case).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from imgscore.config.loading import build_config
from imgscore.config.scoring import PILLOW_MAX_PIXELS
from imgscore.flows.cli import execute, main
from imgscore.images.decode import decode_image
from imgscore.images.preprocess import DecodeOptions, PreprocessSpec, build_transform
from imgscore.images.scan import scan_images
from imgscore.inference.isolation import Isolation, score_isolated
from imgscore.io import storage
from imgscore.runstate.state import read_manifest
from tests.conftest import assert_same_answers, base_overrides
from tests.test_decode import (
    corrupt_exif,
    exif_rotated,
    heic_like_bytes,
    jpeg_bytes,
    palette_with_transparency,
    png_header_only,
    write_truncated_jpeg,
)

# ---------------------------------------------------------------- the probe model


class ProbeNet(nn.Module):
    """float32 [B, 3, H, W] → logits [B, 8]: a seeded linear map of the 4x4 grid of mean colours.

    Raises RuntimeError("marker image in batch") when any image's mean normalized value is above
    2.3 (an all-white image is ~2.44; photos stay far below).
    """

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(48, 8)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(8, 48, generator=g) * 0.5)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.mean(dim=(1, 2, 3)) > 2.3).any()):
            raise RuntimeError("marker image in batch")
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.fixture(scope="module")
def probe_model() -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still works
        return torch.jit.script(ProbeNet().eval())


@pytest.fixture(scope="module")
def probe_checkpoint(probe_model, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("probe") / "probe.torchscript.pt"
    torch.jit.save(probe_model, str(p))
    return p


def probs_of(model, img: Image.Image) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(build_transform(PreprocessSpec())(img)[None]), 1)[0].numpy()


# ---------------------------------------------------------------- the acceptance folder

SPEC = PreprocessSpec()
OPTS = DecodeOptions(PILLOW_MAX_PIXELS)

VALID = {
    "cat/chelsea.jpg",
    "cat/chelsea_progressive.jpg",
    "cat/chelsea_upright.jpg",
    "cat/chelsea_phone.jpg",  # stored rotated, EXIF orientation 6, a corrupt Make tag (Pillow warns)
    "cat/chelsea_rgba.png",
    "cat/chelsea_la.png",
    "cat/chelsea_gray.png",
    "cat/Chelsea Café.JPEG",
    "coffee/coffee.jpg",
    "coffee/coffee_cmyk.jpg",
    "coffee/coffee_palette.png",
    "coffee/coffee_16bit.png",
    "coffee/coffee.webp",
    "coffee/coffee.bmp",
    "coffee/coffee_link.jpg",  # symlink to coffee.jpg
    "coffee/caf\\xe9.jpg",  # Latin-1 name b"caf\xe9.jpg", backslash-escaped
    "coffee/nested/coffee_deep.jpg",
    "rocket/rocket.jpg",
    "rocket/rocket_anim.gif",
    "rocket/rocket_pages.tif",
    "rocket/rocket_strip.png",  # 8000x8
    "space/astronaut.jpg",
    "space/hubble_deep_field.png",
    "space/immunohistochemistry.jpg",
    "space/colorwheel.png",
}
BROKEN = {  # image_path → (stage, error_type)
    "cat/broken_cut60.jpg": ("decode", "DecodeError.truncated"),
    "cat/dangling.jpg": ("scan", "ScanError"),
    "coffee/broken_prog30.jpg": ("decode", "DecodeError.truncated"),
    "coffee/empty.jpg": ("decode", "DecodeError.empty"),
    "rocket/readme.jpg": ("decode", "DecodeError.unidentified"),
    "space/IMG_0001.png": ("decode", "DecodeError.unidentified"),
    "space/bomb.png": ("decode", "DecodeError.too_large"),
    "space/whiteboard.png": ("inference", "Error"),  # torch.jit.Error from the probe's marker check
}
MESSAGES = {
    "cat/dangling.jpg": "broken symlink",
    "coffee/empty.jpg": "zero-byte file",
    "rocket/readme.jpg": "text file with an image extension",
    "space/IMG_0001.png": "HEIC/HEIF image (brand 'heic')",
    "space/bomb.png": "exceeds input.max_pixels",
    "space/whiteboard.png": "marker image in batch",
}
CLASSES = ["cat", "coffee", "empty_class", "rocket", "space"]
SKIPPED = [  # every other non-hidden file, with its reason (class folders first, then input.root itself)
    {"image_path": "space/IMG_0002.heic", "reason": "HEIC/HEIF needs the pillow-heif plugin, which is not installed"},
    {"image_path": "notes.txt", "reason": "not an image format this Pillow reads"},
]
JUNK_MARKERS = (".DS_Store", "._", ".ipynb_checkpoints", "__MACOSX", "checkpoint")


def build_messy_folder(root: Path, photos: dict[str, Image.Image]) -> Path:
    """The acceptance folder: 25 valid images, 8 broken ones, 1 unsupported, junk everywhere."""
    small = {
        n: im.resize((im.width * 2 // 3, im.height * 2 // 3)) if im.width > 500 else im for n, im in photos.items()
    }
    for d in (
        "cat",
        "coffee/nested",
        "rocket",
        "space",
        "empty_class",
        ".ipynb_checkpoints",
        "cat/.ipynb_checkpoints",
        "__MACOSX",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    cat, coffee, rocket = photos["chelsea"], small["coffee"], small["rocket"]
    # cat: encodings
    (root / "cat/chelsea.jpg").write_bytes(jpeg_bytes(cat))
    (root / "cat/chelsea_progressive.jpg").write_bytes(jpeg_bytes(cat, progressive=True))
    (root / "cat/chelsea_upright.jpg").write_bytes(jpeg_bytes(cat))
    stored, _ = exif_rotated(cat)
    (root / "cat/chelsea_phone.jpg").write_bytes(jpeg_bytes(stored, exif=corrupt_exif(6)))
    rgba = np.asarray(cat.convert("RGBA")).copy()
    rgba[:, :80, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "cat/chelsea_rgba.png")
    Image.merge("LA", [cat.convert("L"), Image.new("L", cat.size, 200)]).save(root / "cat/chelsea_la.png")
    cat.convert("L").save(root / "cat/chelsea_gray.png")
    (root / "cat/Chelsea Café.JPEG").write_bytes(jpeg_bytes(cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    write_truncated_jpeg(root / "cat/broken_cut60.jpg", cat, 0.6, progressive=False)
    os.symlink(root / "cat/missing.jpg", root / "cat/dangling.jpg")
    # coffee
    (root / "coffee/coffee.jpg").write_bytes(jpeg_bytes(coffee, quality=95))
    (root / "coffee/coffee_cmyk.jpg").write_bytes(jpeg_bytes(coffee.convert("CMYK"), quality=95))
    palette_with_transparency(coffee).save(root / "coffee/coffee_palette.png")
    Image.fromarray(np.asarray(coffee.convert("L")).astype(np.uint16) * 257).save(root / "coffee/coffee_16bit.png")
    coffee.save(root / "coffee/coffee.webp", quality=90)
    coffee.save(root / "coffee/coffee.bmp")
    os.symlink(root / "coffee/coffee.jpg", root / "coffee/coffee_link.jpg")
    with open(os.fsencode(root / "coffee") + b"/caf\xe9.jpg", "wb") as f:
        f.write(jpeg_bytes(coffee.rotate(10)))
    (root / "coffee/nested/coffee_deep.jpg").write_bytes(jpeg_bytes(coffee.crop((50, 50, 350, 300))))
    write_truncated_jpeg(root / "coffee/broken_prog30.jpg", coffee, 0.3, progressive=True)
    (root / "coffee/empty.jpg").write_bytes(b"")
    # rocket
    (root / "rocket/rocket.jpg").write_bytes(jpeg_bytes(rocket))
    frames = [rocket, rocket.transpose(Image.Transpose.FLIP_LEFT_RIGHT), rocket.convert("L").convert("RGB")]
    frames[0].save(root / "rocket/rocket_anim.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    frames[0].save(root / "rocket/rocket_pages.tif", save_all=True, append_images=frames[1:])
    rocket.resize((8000, 8)).save(root / "rocket/rocket_strip.png")
    (root / "rocket/readme.jpg").write_text("this folder holds the launch photos\n")
    # space
    (root / "space/astronaut.jpg").write_bytes(jpeg_bytes(small["astronaut"]))
    small["hubble_deep_field"].save(root / "space/hubble_deep_field.png")
    (root / "space/immunohistochemistry.jpg").write_bytes(jpeg_bytes(small["immunohistochemistry"]))
    small["colorwheel"].save(root / "space/colorwheel.png")
    (root / "space/IMG_0001.png").write_bytes(heic_like_bytes())
    (root / "space/IMG_0002.heic").write_bytes(heic_like_bytes())
    (root / "space/bomb.png").write_bytes(png_header_only(10_000, 10_000))
    Image.new("RGB", (320, 240), (255, 255, 255)).save(root / "space/whiteboard.png")
    # junk: never a class, never an image, never an error
    for d in ("", "cat/", "space/"):
        (root / f"{d}.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (root / "cat/._chelsea.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (root / ".ipynb_checkpoints/astronaut-checkpoint.jpg").write_bytes(jpeg_bytes(small["astronaut"]))
    (root / "cat/.ipynb_checkpoints/chelsea-checkpoint.jpg").write_bytes(jpeg_bytes(cat))
    (root / "__MACOSX/._rocket.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory, photos) -> Path:
    return build_messy_folder(tmp_path_factory.mktemp("messy") / "images", photos)


def read_table(out, table: str, run_id: str):
    """A run's rows of ``table`` under ``out`` (a local folder or an object-store root)."""
    fs, paths = storage.arrow_files(storage.glob(storage.join(out, table, "run_date=*", run_id, "part-*.parquet")))
    return pads.dataset(paths, format="parquet", filesystem=fs).to_table().to_pylist()


# ---------------------------------------------------------------- scan: names, junk, skipped


def test_scan_junk_names_and_skipped(messy_folder):
    index = scan_images(messy_folder)
    assert index.layout == "imagefolder"
    assert index.classes == CLASSES  # empty_class is a class with zero images; no hidden folder is one
    paths = [e.image_path for e in index.entries]
    assert set(paths) == VALID | set(BROKEN) and len(paths) == len(set(paths)) == 33
    assert not any(m in p for p in paths for m in JUNK_MARKERS)
    assert index.skipped == SKIPPED
    by_path = {e.image_path: e for e in index.entries}
    assert by_path["coffee/caf\\xe9.jpg"].rel == os.fsdecode(b"coffee/caf\xe9.jpg")  # still opens the file
    assert by_path["coffee/coffee_link.jpg"].size == (messy_folder / "coffee/coffee.jpg").stat().st_size
    assert by_path["cat/dangling.jpg"].scan_error.startswith("broken symlink")
    assert {e.label_name for e in index.entries if e.label == 2} == set()  # empty_class: no images
    assert by_path["coffee/nested/coffee_deep.jpg"].label_name == "coffee"


def test_twins_are_discriminating_for_the_probe(messy_folder, probe_model):
    """The acceptance checks compare twins within 2 %; here the probe proves that a wrong EXIF or
    CMYK policy would move its scores by far more than that."""
    up = decode_image(str(messy_folder / "cat/chelsea_upright.jpg"), SPEC, OPTS)
    raw = decode_image(
        str(messy_folder / "cat/chelsea_phone.jpg"), SPEC, DecodeOptions(PILLOW_MAX_PIXELS, exif_orientation=False)
    )
    rgb = decode_image(str(messy_folder / "coffee/coffee.jpg"), SPEC, OPTS)
    assert np.abs(probs_of(probe_model, up) - probs_of(probe_model, raw)).max() > 0.1
    assert np.abs(probs_of(probe_model, rgb) - probs_of(probe_model, ImageOps.invert(rgb))).max() > 0.1


# ---------------------------------------------------------------- inference isolation


def test_bisection_isolates_the_failing_image():
    x = torch.zeros(8, 3, 4, 4)
    x[5] = 7.0  # marker
    calls = []

    def fn(xs):
        calls.append(len(xs))
        if bool((xs == 7.0).any()):
            raise ValueError("bad input")
        return torch.softmax(xs.flatten(1)[:, :3] + torch.arange(3.0), 1)

    state = Isolation(max_batch=8)
    out = score_isolated(fn, x, list(range(10, 18)), state)
    assert [p for p, _ in out] == [10, 11, 12, 13, 14, 16, 17]
    assert state.failures == [(15, "ValueError", "bad input")]
    assert calls == [8, 4, 4, 2, 1, 1, 2]  # halves until the marker is alone; 7 forwards, not 8
    assert state.max_batch == 8 and state.oom_events == 0


def test_cuda_oom_halves_the_batch_for_the_rest_of_the_shard():
    def fn(xs):
        if len(xs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.full((len(xs), 3), 1 / 3)

    state = Isolation(max_batch=8)
    out = score_isolated(fn, torch.zeros(8, 3, 2, 2), list(range(8)), state)
    assert [p for p, _ in out] == list(range(8)) and state.failures == []
    assert state.max_batch == 2 and state.oom_events == 2  # 8 → 4 → 2, then every chunk fits
    out = score_isolated(fn, torch.zeros(3, 3, 2, 2), [20, 21, 22], state)  # next batch starts at 2
    assert [p for p, _ in out] == [20, 21, 22] and state.oom_events == 2


def test_non_finite_output_is_a_failure_of_that_image():
    def fn(xs):
        p = torch.full((len(xs), 2), 0.5)
        p[xs[:, 0, 0, 0] > 0] = float("nan")
        return p

    x = torch.zeros(4, 3, 2, 2)
    x[1] = 1
    state = Isolation(max_batch=4)
    out = score_isolated(fn, x, [0, 1, 2, 3], state)
    assert [p for p, _ in out] == [0, 2, 3]
    assert [(p, t) for p, t, _ in state.failures] == [(1, "NonFiniteOutput")]


# ---------------------------------------------------------------- acceptance: end to end through the flow


def _run(folder, ckpt, out, **extra):
    cfg = build_config({}, base_overrides(folder, ckpt, out, **extra))
    return execute(cfg, quiet=True)


def _cli(folder, ckpt, out, *flags, **extra) -> int:
    """``imgscore run --set ... -q [flags]`` in this process; returns the exit code."""
    sets = [a for kv in base_overrides(folder, ckpt, out, **extra) for a in ("--set", kv)]
    ours = logging.getLogger("imgscore")
    level = ours.level
    try:
        return main(["run", *sets, "-q", *flags])
    finally:
        ours.setLevel(level)


def check_acceptance(out: Path, run_id: str, summary: dict | None = None) -> dict:
    preds = read_table(out, "predictions", run_id)
    errs = read_table(out, "errors", run_id)
    pred_paths = [r["image_path"] for r in preds]
    err_paths = [r["image_path"] for r in errs]
    assert sorted(pred_paths) == sorted(VALID)  # exactly one row each
    assert sorted(err_paths) == sorted(BROKEN)  # exactly one row each, none in predictions
    for r in errs:
        assert (r["stage"], r["error_type"]) == BROKEN[r["image_path"]], r
        assert (
            r["run_id"] == run_id and r["attempt"] == 1 and r["occurred_at"] is not None and r["shard_id"] is not None
        )
        assert r["batch_id"] is not None
        if r["image_path"] in MESSAGES:
            assert MESSAGES[r["image_path"]] in r["message"], r
    labels = {r["image_path"]: (r["label"], r["label_name"]) for r in preds}
    assert labels["coffee/caf\\xe9.jpg"] == (1, "coffee") and labels["space/colorwheel.png"] == (4, "space")
    by = {r["image_path"]: r for r in preds}

    # twins re-encoded by JPEG differ by a few grey levels: same answers within 0.02 (the
    # probe is a smooth map of mean colours), near-ties allowed to swap (conftest docstring)
    assert_same_answers(
        by["cat/chelsea_phone.jpg"], by["cat/chelsea_upright.jpg"], atol=0.02, what="EXIF-rotated vs upright twin"
    )
    assert_same_answers(by["coffee/coffee_cmyk.jpg"], by["coffee/coffee.jpg"], atol=0.02, what="CMYK vs RGB twin")
    assert by["coffee/coffee_link.jpg"]["topk_scores"] == by["coffee/coffee.jpg"]["topk_scores"]
    assert len(by["rocket/rocket.jpg"]["topk_scores"]) == 5
    # the whiteboard's batch mates were scored by bisection
    white = next(r for r in errs if r["image_path"] == "space/whiteboard.png")
    mates = [r["image_path"] for r in preds if (r["shard_id"], r["batch_id"]) == (white["shard_id"], white["batch_id"])]
    assert mates, "the failing image's batch mates must be scored"

    m = read_manifest(out / "runs" / run_id / "manifest.json")
    c = m["counts"]
    assert (c["scanned"], c["scored"], c["failed"], c["skipped"]) == (33, 25, 8, 2)
    assert c["scanned"] == c["scored"] + c["failed"]
    assert m["skipped"] == SKIPPED
    assert m["input"]["classes"] == CLASSES
    assert sum(s["scored"] for s in m["shards"]) == 25 and sum(s["failed"] for s in m["shards"]) == 8
    failed_images = sorted(p for s in m["shards"] for p in s.get("failed_images", []))
    assert failed_images == sorted(BROKEN)
    everything = repr((pred_paths, err_paths, m["skipped"], m["input"]))
    assert not any(j in everything for j in JUNK_MARKERS)
    warned = {k: v for s in m["shards"] for k, v in (s.get("warnings") or {}).items()}
    assert warned.get("UserWarning: Tag data larger than file. Skipping tag 271", 0) >= 1  # counted
    if summary is not None:
        assert summary["warnings"] >= 1
        assert (summary["scanned"], summary["scored"], summary["failed"], summary["skipped"]) == (33, 25, 8, 2)
    return by


@pytest.mark.slow
def test_acceptance_messy_folder_end_to_end(prefect_server, messy_folder, probe_checkpoint, tmp_path, capfd):
    """Every valid image scored once, every broken one recorded once, same rows both ways. The
    probe model is a seeded linear map of mean colours (no training): twins and the two runs are
    compared as probabilities within a stated tolerance, near-ties allowed to swap
    (``assert_same_answers``), so the result cannot depend on the CPU's rounding."""
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    # 8/33 = 24.2 % failed: under a 30 % budget → exit 0
    code, summary = _run(messy_folder, probe_checkpoint, out_a, **{"run.max_error_rate": 0.3})
    assert code == 0 and summary["status"] == "partial"
    by_a = check_acceptance(out_a, summary["run_id"], summary)
    capfd.readouterr()
    # same folder through the CLI, 2 decode worker processes, batches of 4, a 20 % budget → exit 1, same rows
    with engine_records() as records:
        code = _cli(
            messy_folder,
            probe_checkpoint,
            out_b,
            **{
                "inference.num_workers": 2,
                "inference.batch_size": 4,
                "run.max_error_rate": 0.2,
                "run.run_id": "accept-b",
            },
        )
    assert code == 1
    assert read_manifest(out_b / "runs/accept-b/manifest.json")["status"] == "failed"
    by_b = check_acceptance(out_b, "accept-b")
    for p in VALID:  # other batch composition: equal up to float summation order
        assert_same_answers(by_a[p], by_b[p], atol=1e-5, what=p)
    term = capfd.readouterr()
    assert (
        "imgscore: run accept-b over its error budget: error rate 24.24% > run.max_error_rate 20.00% (8 failed, "
        f"run.min_errors 5); errors are in {out_b / 'errors'}" in term.err
    )
    assert (
        "warnings        2" in term.out
    )  # the summary counts Pillow's warnings (no ResourceWarning from multi-frame files) …
    for noise in ("Tag data larger than file", "UserWarning", "DecompressionBomb"):
        assert noise not in term.out + term.err, noise  # … and the terminal shows none of them
    assert tracebacks_for_the_terminal(records) == []
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    ended = [
        r for r in records if r.getMessage().startswith("Encountered exception during execution: ErrorBudgetExceeded")
    ]
    assert len(ended) == 1 and ended[0].levelno == logging.INFO  # still logged (to the API), not to the terminal


@contextlib.contextmanager
def engine_records(names=("prefect.flow_runs", "prefect.task_runs")):
    """Records of the named loggers (default: Prefect's flow-run and task-run loggers) as their
    handlers receive them (after ``imgscore.runtime.startup``'s filter), gathered by a logger filter: Prefect's
    logging setup may replace handlers mid-session (pytest's ``caplog`` among them), never filters."""
    from imgscore.runtime import startup

    startup.quiet_expected_failures()
    seen: list[logging.LogRecord] = []

    class Spy(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen.append(record)
            return True

    spy = Spy()
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addFilter(spy)
    try:
        yield seen
    finally:
        for lg in loggers:
            lg.removeFilter(spy)


def tracebacks_for_the_terminal(records: list[logging.LogRecord]) -> list[str]:
    """Records that reach the console (WARNING and up) and carry a traceback."""
    return [r.getMessage()[:200] for r in records if r.levelno >= logging.WARNING and (r.exc_info or r.exc_text)]


def test_expected_failures_lose_their_traceback_others_keep_it():
    from imgscore.errors import ErrorBudgetExceeded, ShardError
    from imgscore.runtime.startup import ExpectedFailureFilter

    def record(exc):
        try:
            raise exc
        except Exception:
            import sys

            return logging.LogRecord(
                "prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception: %r", (exc,), sys.exc_info()
            )

    f = ExpectedFailureFilter()
    for exc in (ErrorBudgetExceeded("over budget"), ShardError("shard 3: DataLoader failed")):
        r = record(exc)
        assert f.filter(r) and (r.levelno, r.exc_info) == (logging.INFO, None)
    r = record(ValueError("a bug"))
    assert f.filter(r) and r.levelno == logging.ERROR and r.exc_info[0] is ValueError


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "reason"),
    [("hang", "DataLoader timed out after 1"), ("die", "exited unexpectedly")],
)
def test_shard_that_cannot_run_is_retried_then_failed(
    prefect_server, photos, probe_checkpoint, tmp_path, monkeypatch, capfd, fault, reason, out_root
):
    """A DataLoader that times out (a decode that hangs) or whose worker process dies (a decoder
    crash) fails its shard after run.shard_retries; the manifest says so with the reason, and the
    other shards are scored — into a local folder or a bucket (the failed shard's commit there
    too: errors rows, an empty predictions part, its record)."""
    root = tmp_path / "images"
    root.mkdir()
    names = ["astronaut", "coffee", "chelsea", "rocket", "colorwheel", "immunohistochemistry"]
    for i, n in enumerate(names):
        photos[n].resize((96, 72)).save(root / f"{i}_{n}.jpg")
    (root / "2_chelsea.jpg").rename(root / "2_hang.jpg")  # shard 1 = images 2..3
    import imgscore.images.dataset

    real = imgscore.images.dataset.decode_file

    def faulty_decode(path, *a, **k):  # inherited by the forked DataLoader workers
        if path.endswith("hang.jpg"):
            if fault == "die":
                os._exit(1)  # only ever runs in the DataLoader worker process
            time.sleep(4)
        return real(path, *a, **k)

    monkeypatch.setattr(imgscore.images.dataset, "decode_file", faulty_decode)
    t0 = time.perf_counter()
    with engine_records() as records:
        code = _cli(
            root,
            probe_checkpoint,
            out_root,
            **{
                "run.shard_size": 2,
                "inference.num_workers": 1,
                "inference.timeout_s": 1,
                "run.shard_retries": 1,
                "run.max_error_rate": 0.9,
                "run.run_id": "hang",
            },
        )
    elapsed = time.perf_counter() - t0
    assert code == 1
    m = read_manifest(storage.path(out_root, "runs/hang/manifest.json"))
    states = [(s["shard_id"], s["state"], s["attempts"]) for s in m["shards"]]
    assert states == [(0, "complete", 1), (1, "failed", 2), (2, "complete", 1)]
    assert reason in m["shards"][1]["reason"]
    assert (m["counts"]["scanned"], m["counts"]["scored"], m["counts"]["failed"]) == (6, 4, 2)
    errs = read_table(out_root, "errors", "hang")
    assert sorted((r["image_path"], r["error_type"], r["attempt"]) for r in errs) == [
        ("2_hang.jpg", "ShardFailed", 2),
        ("3_rocket.jpg", "ShardFailed", 2),
    ]
    preds = read_table(out_root, "predictions", "hang")
    assert sorted(r["image_path"] for r in preds) == [
        "0_astronaut.jpg",
        "1_coffee.jpg",
        "4_colorwheel.jpg",
        "5_immunohistochemistry.jpg",
    ]
    err = capfd.readouterr().err
    assert "imgscore: run hang over its error budget: 1 shard(s) failed (error rate 33.33%)" in err
    assert tracebacks_for_the_terminal(records) == []
    retried = [r.getMessage() for r in records if r.name == "prefect.task_runs" and "Retry 1/1" in r.getMessage()]
    assert len(retried) == 1 and reason in retried[0]
    print(f"shard-failure run: {elapsed:.1f} s")


def read_back(out_root, table: str, run_date: str, run_id: str, shard_id: int) -> list[dict]:
    """One part file of a local or object-store root, read through the storage layer."""
    import pyarrow.parquet as pq

    from imgscore.io.parquet import part_dir, part_name

    with storage.open_input(storage.join(str(part_dir(out_root, table, run_date, run_id)), part_name(shard_id))) as f:
        return pq.read_table(f).to_pylist()


def test_a_shard_failed_after_its_retries_is_committed_on_either_root(out_root):
    """What the flow does when a shard fails after its retries (``commit_failed_shard``), given
    ``output.root`` as the config holds it (a string): an earlier attempt's embeddings part is
    removed, one errors row per image (stage inference, ShardFailed, the reason), an empty
    predictions part, and a ``failed`` commit record — on a bucket as on disk."""
    from imgscore.images.entries import ImageEntry
    from imgscore.inference.commit import commit_failed_shard
    from imgscore.io.parquet import part_dir, part_name
    from imgscore.runstate.manifest import ShardRef, read_commit_record

    root = str(out_root)
    run_dir = storage.join(root, "runs", "failed-shard")
    ref = ShardRef(
        run_id="failed-shard",
        run_date="2026-01-02",
        run_dir=run_dir,
        input_root="/data/in",
        shard_id=3,
        start=6,
        stop=8,
        fingerprint="f" * 64,
    )
    entries = [ImageEntry("a/1.jpg", 0, "a", 10, 1), ImageEntry("b/2.jpg", 1, "b", 20, 2)]
    stale = storage.join(str(part_dir(root, "embeddings", "2026-01-02", "failed-shard")), part_name(3))
    storage.write_bytes(stale, b"an earlier attempt's vectors")
    result = commit_failed_shard(
        ref, entries, root, {"arch": "resnet18", "model_id": "m" * 64}, "DataLoader timed out after 1 s", attempts=2
    )
    assert (result.state, result.scored, result.failed, result.failed_images) == (
        "failed",
        0,
        2,
        ["a/1.jpg", "b/2.jpg"],
    )
    assert not storage.exists(stale)
    errs = read_back(root, "errors", "2026-01-02", "failed-shard", 3)
    assert [
        (r["image_path"], r["stage"], r["error_type"], r["attempt"], r["message"], r["shard_id"]) for r in errs
    ] == [
        ("a/1.jpg", "inference", "ShardFailed", 2, "DataLoader timed out after 1 s", 3),
        ("b/2.jpg", "inference", "ShardFailed", 2, "DataLoader timed out after 1 s", 3),
    ]
    assert read_back(root, "predictions", "2026-01-02", "failed-shard", 3) == []
    record = read_commit_record(run_dir, 3)
    assert (record.state, record.failed, record.attempt, record.reason) == (
        "failed",
        2,
        2,
        "DataLoader timed out after 1 s",
    )


@pytest.mark.slow
def test_verbose_shows_per_image_detail_quiet_does_not(prefect_server, photos, probe_checkpoint, tmp_path, capfd):
    root = tmp_path / "images"
    root.mkdir()
    for n in ("astronaut", "coffee", "rocket"):
        photos[n].resize((96, 72)).save(root / f"{n}.jpg")
    (root / "broken.jpg").write_text("not a jpeg")
    with engine_records(("imgscore",)) as quiet:
        assert _cli(root, probe_checkpoint, tmp_path / "out", **{"run.max_error_rate": 0.5}) == 0
    with engine_records(("imgscore",)) as loud:
        assert _cli(root, probe_checkpoint, tmp_path / "out", "--verbose", **{"run.max_error_rate": 0.5}) == 0
    assert [r.getMessage() for r in quiet] == []  # the imgscore logger stays at WARNING without --verbose
    detail = [r.getMessage() for r in loud if "broken.jpg" in r.getMessage()]
    assert (
        len(detail) == 1
        and "broken.jpg failed at decode: DecodeError.unidentified: text file with an image extension" in detail[0]
    )
    capfd.readouterr()


def test_latin1_class_folder_is_a_class_with_a_utf8_name(tmp_path, photos):
    root = tmp_path / "images"
    for cls in (b"caf\xe9", b"tea"):
        os.makedirs(os.fsencode(root) + b"/" + cls)
        photos["coffee"].resize((64, 48)).save(os.fsencode(root) + b"/" + cls + b"/x.jpg")
    index = scan_images(root)
    assert index.classes == ["caf\\xe9", "tea"]
    assert [(e.image_path, e.label, e.label_name) for e in index.entries] == [
        ("caf\\xe9/x.jpg", 0, "caf\\xe9"),
        ("tea/x.jpg", 1, "tea"),
    ]
    assert index.to_table().column("label_name").to_pylist() == ["caf\\xe9", "tea"]  # Parquet-safe


@pytest.mark.slow
def test_model_load_failing_once_on_the_worker_is_retried(
    prefect_server, photos, probe_checkpoint, tmp_path, monkeypatch, out_root
):
    """The model loads in the flow's preflight but fails once inside the shard (a worker whose
    disk hiccups): Prefect retries the shard and the rows say attempt 2 — into a local folder or
    a bucket."""
    import imgscore.inference.scorer
    from imgscore.errors import ModelError

    root = tmp_path / "images"
    root.mkdir()
    for n in ("astronaut", "coffee", "rocket"):
        photos[n].resize((96, 72)).save(root / f"{n}.jpg")
    (root / "zero.jpg").write_bytes(b"")
    real, calls = imgscore.inference.scorer.load_model, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise ModelError("model.checkpoint could not be read on this worker (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(imgscore.inference.scorer, "load_model", flaky)
    code, summary = _run(root, probe_checkpoint, out_root, **{"run.shard_size": 10, "run.max_error_rate": 0.5})
    assert code == 0 and len(calls) == 2
    m = read_manifest(summary["manifest"])
    assert [(s["state"], s["attempts"], s["scored"], s["failed"]) for s in m["shards"]] == [("partial", 2, 3, 1)]
    errs = read_table(out_root, "errors", summary["run_id"])
    assert [(r["image_path"], r["stage"], r["error_type"], r["attempt"]) for r in errs] == [
        ("zero.jpg", "decode", "DecodeError.empty", 2)
    ]
