"""Every file under input.root ends in exactly one place: a prediction, an errors row,
or ``skipped`` with a reason — except hidden names and ``__MACOSX``, which appear nowhere.

The acceptance folder holds one file for every extension Pillow registers — written by Pillow in
that format where Pillow can write it, real FITS and PFM float images, PNG bytes under the
extensions Pillow only reads — plus junk and broken files. It is scored end to end through the
flow; the test reads predictions, errors and the manifest back and checks the partition.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from imgscore.config.loading import build_config
from imgscore.flows.cli import execute, main
from imgscore.images.extensions import (
    NOT_AN_IMAGE,
    SCORABLE_EXTENSIONS,
    UNSUPPORTED_EXTENSIONS,
    _stub_has_handler,
)
from imgscore.images.formats import known_formats
from imgscore.images.scan import scan_images
from imgscore.report.build import build_report
from imgscore.runstate.state import read_manifest
from tests.conftest import base_overrides

HIDDEN = {".DS_Store", "._img.jpg", ".ipynb_checkpoints/img-checkpoint.jpg", "__MACOSX/._img.jpg", ".hidden/img.png"}
BROKEN = {
    "empty.jpg": ("decode", "DecodeError.empty"),
    "fake.png": ("decode", "DecodeError.unidentified"),
    "pipe.jpg": ("scan", "ScanError"),
}
JUNK = {"notes.txt", "labels.json", "README", "archive.tar.gz", "clip.mp4", "photo.heic", "sub/Thumbs.db"}


def fits_bytes(a: np.ndarray) -> bytes:
    """A minimal FITS file (one float32 image HDU), as astronomy pipelines write them."""
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                  -32",
        "NAXIS   =                    2",
        f"NAXIS1  = {a.shape[1]:>20}",
        f"NAXIS2  = {a.shape[0]:>20}",
        "END",
    ]
    head = "".join(c.ljust(80) for c in cards).encode()
    data = a.astype(">f4").tobytes()
    return head + b" " * (-len(head) % 2880) + data + bytes(-len(data) % 2880)


def _save_as(img: Image.Image, path: Path, fmt: str) -> bool:
    """Write ``img`` in Pillow format ``fmt``, trying the modes formats commonly need."""
    for mode in ("RGB", "L", "1", "P"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # Pillow 13: "IM image format is deprecated"
                img.convert(mode).save(path, format=fmt)
            return True
        except Exception:
            path.unlink(missing_ok=True)
    return False


def build_every_extension_folder(root: Path, photo: Image.Image) -> dict[str, str]:
    """One file per registered extension (``img<ext>``) plus junk; returns name → how it was made."""
    root.mkdir(parents=True)
    img = photo.resize((64, 64))
    png = root / "_tmp"
    img.save(png, format="PNG")
    png_bytes = png.read_bytes()
    png.unlink()
    made = {}
    ramp = np.tile(np.linspace(0, 1000, 64), (48, 1)).astype(np.float32)
    for ext, fmt in sorted(Image.registered_extensions().items()):
        p = root / f"img{ext}"
        if ext in (".fits", ".fit"):
            p.write_bytes(fits_bytes(ramp))
            made[p.name] = "FITS float32"
        elif ext == ".pfm":
            Image.fromarray(ramp, mode="F").save(p, format="PPM")
            made[p.name] = "PFM float32"
        elif fmt in Image.SAVE and _save_as(img, p, fmt):
            made[p.name] = f"saved as {fmt}"
        else:
            p.write_bytes(png_bytes)  # formats Pillow cannot write: PNG bytes under that name
            made[p.name] = "PNG bytes"
    for name in JUNK:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\x00\x00\x00\x18ftypheic" if name.endswith(".heic") else b"not an image\n")
    (root / "sub" / "nested.jfif").write_bytes((root / "img.jpg").read_bytes())
    made["sub/nested.jfif"] = "saved as JPEG"
    (root / "empty.jpg").write_bytes(b"")
    (root / "fake.png").write_text("a text file named .png\n")
    os.mkfifo(root / "pipe.jpg")  # reading it would block forever
    for name in HIDDEN:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png_bytes)
    return made


def all_files(root: Path) -> set[str]:
    """Every non-hidden file under ``root`` (relative, ``/``), FIFOs included."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        for f in filenames:
            if not f.startswith("."):
                out.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return out


@pytest.fixture(scope="module")
def every_ext_folder(tmp_path_factory, photos) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("every") / "images"
    return root, build_every_extension_folder(root, photos["astronaut"])


ALL_FORMATS = [
    f for f in known_formats() if f not in ("AVIF", "HEIF") or f in Image.OPEN
]  # every format decodable here


def test_scan_accounts_for_every_file(every_ext_folder):
    """With every format this Pillow decodes allowed in input.formats (EPS never is)."""
    root, made = every_ext_folder
    index = scan_images(root, formats=ALL_FORMATS)
    entries = [e.image_path for e in index.entries]
    skipped = [s["image_path"] for s in index.skipped]
    assert len(entries) == len(set(entries)) and len(skipped) == len(set(skipped)) and not set(entries) & set(skipped)
    assert set(entries) | set(skipped) == all_files(root)
    assert not any(h in entries or h in skipped for h in HIDDEN)
    reasons = {s["image_path"]: s["reason"] for s in index.skipped}
    for name in JUNK - {"photo.heic"}:
        assert reasons[name] == NOT_AN_IMAGE
    assert reasons["photo.heic"].startswith("HEIC/HEIF needs the pillow-heif plugin")
    assert reasons["img.pdf"] == "Pillow writes PDF files but cannot read them"
    assert reasons["img.eps"].startswith("EPS (PostScript) file, never decoded: Pillow's EPS plugin runs Ghostscript")
    assert reasons["img.mpg"].startswith("Pillow reads only the MPEG video header")
    assert "register_handler" in reasons["img.h5"]
    # JPEG under its other names, JPEG 2000, and every other format this Pillow decodes: scanned
    for name in (
        "img.jfif",
        "img.jpe",
        "img.jp2",
        "img.j2k",
        "img.apng",
        "img.qoi",
        "img.fits",
        "img.pfm",
        "sub/nested.jfif",
    ):
        assert name in entries, name


def test_default_formats_skip_the_rarer_formats_by_extension(every_ext_folder):
    """By default only the photo formats are images; the files of the rarer formats are listed in
    ``skipped`` with the format and the key that allows it, and the photo formats are scanned."""
    root, _ = every_ext_folder
    index = scan_images(root)
    entries = {e.image_path for e in index.entries}
    reasons = {s["image_path"]: s["reason"] for s in index.skipped}
    assert entries | set(reasons) == all_files(root)
    for name, fmt in (("img.jp2", "JPEG2000"), ("img.fits", "FITS"), ("img.tga", "TGA"), ("img.mpo", None)):
        if fmt is not None:
            assert reasons[name].startswith(f"{fmt} file, and {fmt} is not in input.formats (JPEG, PNG,"), reasons[name]
            assert reasons[name].endswith(f"add {fmt} to input.formats to decode such files")
    for name in (
        "img.jpg",
        "img.jfif",
        "img.png",
        "img.webp",
        "img.tif",
        "img.bmp",
        "img.gif",
        "img.mpo",
        "sub/nested.jfif",
    ):
        assert name in entries, name
    narrow = scan_images(root, formats=["PNG"])
    assert {e.image_path for e in narrow.entries} == {"img.png", "img.apng", "fake.png"}


def test_extension_lists_come_from_pillow():
    """Scorable = Pillow's registry minus what this build cannot decode; nothing hand-listed is
    scorable that Pillow does not register."""
    registered = {e.lower() for e in Image.registered_extensions()}
    assert SCORABLE_EXTENSIONS <= registered
    assert registered - SCORABLE_EXTENSIONS <= set(UNSUPPORTED_EXTENSIONS)
    assert {".jfif", ".jpe", ".jpg", ".jpeg"} <= SCORABLE_EXTENSIONS
    from PIL import features

    assert (".jp2" in SCORABLE_EXTENSIONS) == features.check_codec("jpg_2000")
    assert (".webp" in SCORABLE_EXTENSIONS) == features.check_module("webp")


def test_pillow_stub_handler_contract():
    """The adapter reads StubImageFile's ``_handler`` class attribute, which its load() checks:
    without a handler the stub cannot decode; registering one makes the format decodable."""
    from PIL import BufrStubImagePlugin, ImageFile

    assert "_handler" in vars(ImageFile.StubImageFile)
    cls = BufrStubImagePlugin.BufrStubImageFile
    assert not _stub_has_handler(cls)

    class Handler(ImageFile.StubHandler):
        def open(self, im):
            pass

        def load(self, im):
            return Image.new("L", (1, 1))

    BufrStubImagePlugin.register_handler(Handler())
    try:
        assert _stub_has_handler(cls)
    finally:
        BufrStubImagePlugin.register_handler(None)


def read_rows(out: Path, table: str, run_id: str) -> list[dict]:
    files = sorted((out / table).glob(f"run_date=*/{run_id}/part-*.parquet"))
    return pads.dataset([str(f) for f in files], format="parquet").to_table().to_pylist() if files else []


@pytest.mark.slow
def test_every_file_ends_in_exactly_one_place_through_the_flow(
    prefect_server, every_ext_folder, tiny_checkpoint, tmp_path
):
    root, made = every_ext_folder
    out = tmp_path / "out"
    cfg = build_config(
        {},
        base_overrides(
            root, tiny_checkpoint, out, **{"run.max_error_rate": 1.0, "run.shard_size": 16, "run.run_id": "every"}
        ),
    )
    cfg.input.formats = ALL_FORMATS
    code, summary = execute(cfg, quiet=True)
    assert code == 0, summary
    preds = [r["image_path"] for r in read_rows(out, "predictions", "every")]
    errs = {r["image_path"]: (r["stage"], r["error_type"]) for r in read_rows(out, "errors", "every")}
    manifest = read_manifest(out / "runs" / "every" / "manifest.json")
    skipped = [s["image_path"] for s in manifest["skipped"]]
    places = preds + list(errs) + skipped
    assert sorted(places) == sorted(all_files(root))  # every file, each exactly once
    assert errs == BROKEN
    # every file Pillow wrote in a format it decodes here was scored, under whatever extension
    for name, how in made.items():
        if os.path.splitext(name)[1] in SCORABLE_EXTENSIONS:
            assert name in preds, (name, how, errs.get(name))
    assert summary["skipped"] == len(skipped) == manifest["counts"]["skipped"]
    assert summary["scanned"] == len(preds) + len(errs)
    by_reason = {g.reason: g.count for g in build_report(out, "every").skipped.by_reason}
    assert by_reason[NOT_AN_IMAGE] == len(JUNK) - 1  # all but the .heic


@pytest.mark.slow
def test_a_folder_with_only_a_jfif_is_scored(prefect_server, photos, tiny_checkpoint, tmp_path):
    root = tmp_path / "only"
    root.mkdir()
    photos["chelsea"].resize((96, 64)).save(root / "cat.jfif", format="JPEG")
    sets = [
        a
        for kv in base_overrides(root, tiny_checkpoint, tmp_path / "out", **{"run.run_id": "jfif"})
        for a in ("--set", kv)
    ]
    assert main(["run", *sets, "-q"]) == 0
    assert [r["image_path"] for r in read_rows(tmp_path / "out", "predictions", "jfif")] == ["cat.jfif"]
