"""Images reach only the decoders of ``input.formats``; no program ever runs on input content.

Pillow's ``Image.open`` tries every plugin whatever a file is called, and its EPS plugin runs
Ghostscript: PostScript named ``holiday.jpg`` made a run execute ``gs``. These tests put a
recording ``gs`` first on ``PATH`` (the real hazard path), hide PostScript under photo
extensions, and check the allow-list in config, scan, decode and report.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgscore.config.loading import build_config
from imgscore.errors import ConfigError
from imgscore.images.decode import decode_bytes, decode_file
from imgscore.images.formats import DEFAULT_FORMATS, check_formats, detect_format, known_formats
from imgscore.images.preprocess import DecodeError, DecodeOptions, PreprocessSpec
from imgscore.report.thumbnails import thumbnail_data_uri
from imgscore.runstate.incremental import decode_settings, model_key
from imgscore.runstate.state import read_manifest
from tests.conftest import base_overrides
from tests.test_every_file import fits_bytes, read_rows

IMGSCORE = str(Path(sys.executable).parent / "imgscore")
POSTSCRIPT = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
    b"0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
)
OPTS = DecodeOptions(max_pixels=10**8)
SPEC = PreprocessSpec()


@pytest.fixture
def recording_gs(tmp_path) -> tuple[Path, dict]:
    """A ``gs`` that appends its arguments to a file, first on ``PATH``: (record file, env)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "gs-calls.txt"
    gs = bindir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\n')
    gs.chmod(gs.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "CUDA_VISIBLE_DEVICES": "",
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    assert subprocess.run(["gs", "--version"], env=env).returncode == 0 and record.exists()  # the recorder works
    record.unlink()
    return record, env


@pytest.mark.slow
def test_postscript_under_photo_names_never_runs_ghostscript(tmp_path, photos, tiny_checkpoint, recording_gs):
    """End to end through ``imgscore run``: PostScript named .jpg, .png and .tif is an errors row
    naming EPS, the .eps file is skipped with the reason, the real photos are scored, and the
    recording gs on PATH was never called."""
    record, env = recording_gs
    root = tmp_path / "images"
    root.mkdir()
    photos["astronaut"].resize((96, 96)).save(root / "real.jpg", format="JPEG")
    photos["chelsea"].resize((96, 64)).save(root / "real.png", format="PNG")
    for name in ("holiday.jpg", "scan.png", "page.tif", "figure.eps"):
        (root / name).write_bytes(POSTSCRIPT)
    out = tmp_path / "out"
    sets = [
        a
        for kv in base_overrides(root, tiny_checkpoint, out, **{"run.run_id": "ps", "run.max_error_rate": 1.0})
        for a in ("--set", kv)
    ]
    proc = subprocess.run([IMGSCORE, "run", "-q", *sets], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not record.exists(), f"gs was run: {record.read_text()}"
    preds = sorted(r["image_path"] for r in read_rows(out, "predictions", "ps"))
    errs = {r["image_path"]: r for r in read_rows(out, "errors", "ps")}
    skipped = {s["image_path"]: s["reason"] for s in read_manifest(out / "runs" / "ps" / "manifest.json")["skipped"]}
    assert preds == ["real.jpg", "real.png"]
    assert sorted(errs) == ["holiday.jpg", "page.tif", "scan.png"]
    for row in errs.values():
        assert (row["stage"], row["error_type"]) == ("decode", "DecodeError.format_not_allowed")
        assert row["message"].startswith("EPS (PostScript) file, never decoded: Pillow's EPS plugin runs Ghostscript")
    assert list(skipped) == ["figure.eps"] and "never decoded" in skipped["figure.eps"]


def test_eps_cannot_be_enabled_and_unknown_names_get_a_suggestion(tmp_path, image_folder, tiny_checkpoint):
    for value in ("[JPEG, EPS]", "[ps]"):
        with pytest.raises(
            ConfigError,
            match=r"config input.formats: input.formats names '(EPS|ps)', which is never decoded here: "
            r"Pillow's EPS plugin runs Ghostscript .* remove it from input.formats",
        ):
            build_config({}, [f"input.formats={value}"])
    with pytest.raises(
        ConfigError,
        match=r"input.formats names 'JPG', which is not an image format Pillow reads here; "
        r"did you mean JPEG\? valid names: AVIF, BLP, BMP, .*TIFF",
    ):
        build_config({}, ["input.formats=[PNG, JPG]"])
    with pytest.raises(ConfigError, match=r"input.formats is empty"):
        build_config({}, ["input.formats=[]"])
    assert build_config({}, ["input.formats=[png, Tiff, PNG]"]).input.formats == ["PNG", "TIFF"]
    assert build_config({}, ["input.formats=JPEG,FITS"]).input.formats == ["JPEG", "FITS"]
    # through the CLI: exit 2, one line, nothing written
    out = tmp_path / "out"
    sets = [
        a
        for kv in base_overrides(image_folder, tiny_checkpoint, out, **{"input.formats": "[JPEG, EPS]"})
        for a in ("--set", kv)
    ]
    proc = subprocess.run(
        [IMGSCORE, "run", *sets],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "input.formats names 'EPS', which is never decoded here" in proc.stderr
    assert not out.exists() or not (out / "runs").exists()


def test_default_formats_are_photo_formats_and_valid():
    assert check_formats(list(DEFAULT_FORMATS)) == DEFAULT_FORMATS
    assert "EPS" not in known_formats() and {"MPO", "HEIF", "FITS", "TGA"} <= set(known_formats())


def test_detect_format_names_the_format_from_magic_bytes_only():
    assert detect_format(POSTSCRIPT[:16], DEFAULT_FORMATS) == "EPS"
    assert detect_format(b"SIMPLE  =      T", DEFAULT_FORMATS) == "FITS"
    assert detect_format(b"\x89PNG\r\n\x1a\n" + bytes(8), DEFAULT_FORMATS) is None  # a corrupt PNG is PNG's
    assert detect_format(b"just some text..", DEFAULT_FORMATS) is None


@pytest.mark.parametrize("name", ["holiday.jpg", "scan.png", "page.tif"])
def test_postscript_bytes_are_refused_by_name_of_format(tmp_path, name, recording_gs):
    record, env = recording_gs
    old_path = os.environ["PATH"]
    os.environ["PATH"] = env["PATH"]  # the hazard in this process too: a gs first on PATH
    try:
        p = tmp_path / name
        p.write_bytes(POSTSCRIPT)
        with pytest.raises(DecodeError, match=r"^EPS \(PostScript\) file, never decoded") as exc:
            decode_file(str(p), SPEC, OPTS)
        assert exc.value.kind == "format_not_allowed"
        uri, why = thumbnail_data_uri(str(p))
        assert uri is None and "EPS (PostScript) file, never decoded" in why
    finally:
        os.environ["PATH"] = old_path
    assert not record.exists()


def test_a_format_outside_the_list_names_itself_and_the_key():
    ramp = np.tile(np.linspace(0, 1000, 64), (48, 1)).astype(np.float32)
    data = fits_bytes(ramp)
    with pytest.raises(
        DecodeError,
        match=r"^FITS file, and FITS is not in input.formats \(JPEG, PNG, WEBP, TIFF, BMP, GIF, MPO, AVIF, HEIF\); "
        r"add FITS to input.formats to decode such files$",
    ) as exc:
        decode_bytes(data, "stars.png", SPEC, OPTS)
    assert exc.value.kind == "format_not_allowed"
    img = decode_bytes(data, "stars.png", SPEC, DecodeOptions(max_pixels=10**8, formats=("PNG", "FITS"))).image
    assert img.size == (64, 48) and img.getpixel((0, 0))[0] < img.getpixel((63, 0))[0]  # the ramp, decoded


def test_mpo_is_its_own_format(photos):
    """MPO files come from the JPEG plugin: allowing JPEG alone does not let them through."""
    buf = io.BytesIO()
    a = photos["astronaut"].resize((64, 64))
    a.save(buf, format="MPO", save_all=True, append_images=[a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    data = buf.getvalue()
    assert decode_bytes(data, "pair.mpo", SPEC, OPTS).image.size == (64, 64)
    with pytest.raises(DecodeError, match=r"^MPO file, and MPO is not in input.formats \(JPEG\)") as exc:
        decode_bytes(data, "pair.jpg", SPEC, DecodeOptions(max_pixels=10**8, formats=("JPEG",)))
    assert exc.value.kind == "format_not_allowed"
    jpeg = io.BytesIO()
    a.save(jpeg, format="JPEG")
    with pytest.raises(DecodeError, match=r"^JPEG file, and JPEG is not in input.formats \(MPO\)"):
        decode_bytes(jpeg.getvalue(), "one.jpg", SPEC, DecodeOptions(max_pixels=10**8, formats=("MPO",)))


def test_allowing_a_format_changes_the_skip_key():
    """Images refused under one allow-list are eligible again under another (run.skip_scored and
    the failure ledger key on the decode settings); the default list keeps the key runs made
    before it existed had, and the order of the list does not matter."""
    default = build_config().input
    wider = build_config({}, ["input.formats=[JPEG, PNG, WEBP, TIFF, BMP, GIF, MPO, AVIF, HEIF, FITS]"]).input
    reordered = build_config({}, [f"input.formats=[{', '.join(reversed(DEFAULT_FORMATS))}]"]).input
    assert (
        decode_settings(default)
        == decode_settings(None)
        == {
            "max_pixels": default.max_pixels,
            "exif_orientation": True,
            "max_metadata_bytes": default.max_metadata_bytes,
        }
    )
    assert decode_settings(reordered) == decode_settings(default)
    assert decode_settings(wider)["formats"] == sorted([*DEFAULT_FORMATS, "FITS"])
    info = {"model_id": "m", "preprocess": {}}
    assert model_key({**info, "decode": decode_settings(wider)}) != model_key(
        {**info, "decode": decode_settings(default)}
    )
    opts = DecodeOptions.from_input(wider)
    assert opts.formats == (*DEFAULT_FORMATS, "FITS")
    import pickle

    assert pickle.loads(pickle.dumps(opts)) == opts  # as DataLoader and Dask worker processes receive it


# ------------------------------------------------------------------ budgets beyond the pixel count


def tiff_with_tile(side: int) -> bytes:
    """A 16x16 RGB deflate TIFF whose one tile's TileWidth/TileLength tags say ``side``: the
    decoder allocates a whole tile (``side``² pixels) whatever the image size says."""
    import struct

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((16, 16, 3), np.uint8), tile=(16, 16), compression="zlib", photometric="rgb")
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tf:
        for name in ("TileWidth", "TileLength"):
            tag = tf.pages[0].tags[name]
            struct.pack_into(tf.byteorder + {3: "H", 4: "I"}[int(tag.dtype)], data, tag.valueoffset, side)
    return bytes(data)


def test_a_tiff_tile_bigger_than_its_image_is_refused_before_any_allocation():
    """303 bytes that made libtiff allocate 805 MB for one 16384x16384 tile (peak RSS 809 MB here
    before the check) are refused from the tags, naming the numbers and the setting."""
    data = tiff_with_tile(16384)
    assert len(data) < 1000 and Image.open(io.BytesIO(data)).size == (16, 16)
    with pytest.raises(
        DecodeError,
        match=r"^TIFF tile 16384x16384 = 268435456 pixels for a 16x16 image: .*at most "
        r"max\(image pixels, 4194304\) = 4194304 pixels, image and tile together at most "
        r"input.max_pixels=100000000 ",
    ) as exc:
        decode_bytes(data, "tiny.tif", SPEC, OPTS)
    assert exc.value.kind == "too_large"
    with pytest.raises(DecodeError, match=r"image and tile together at most input.max_pixels=1000 "):
        decode_bytes(tiff_with_tile(256), "tiny.tif", SPEC, DecodeOptions(max_pixels=1000))


def test_ordinary_tiled_tiffs_still_decode(photos):
    import tifffile

    a = np.asarray(photos["astronaut"].resize((300, 200)))
    for tile, shape in (((256, 256), (200, 300, 3)), ((16, 16), (200, 300, 3))):
        buf = io.BytesIO()
        tifffile.imwrite(buf, a[: shape[0], : shape[1]], tile=tile, compression="zlib", photometric="rgb")
        img = decode_bytes(buf.getvalue(), "tiled.tif", SPEC, OPTS).image
        assert img.size == (300, 200) and np.abs(np.asarray(img).astype(int) - a).max() == 0
    buf = io.BytesIO()  # a tile larger than a small image, as tiled writers make them
    tifffile.imwrite(buf, a[:16, :16], tile=(256, 256), compression="zlib", photometric="rgb")
    assert decode_bytes(buf.getvalue(), "small.tif", SPEC, OPTS).image.size == (16, 16)


@pytest.fixture
def slow_format():
    """A Pillow plugin ``SLOWTEST`` (files starting ``SLOWTEST``, 8x8 grey) registered through
    Pillow's plugin API — as third-party plugins such as pillow-heif register — whose decoder
    sleeps 50 ms per 16-byte chunk, so decoding its 1 KiB takes over 3 s on any CPU;
    unregistered afterwards. Yields the bytes of one such file."""
    import time

    from PIL import ImageFile

    class Decoder(ImageFile.PyDecoder):
        _pulls_fd = False

        def init(self, args):
            self.seen = 0

        def decode(self, buffer):
            time.sleep(0.05)
            self.seen += len(buffer)
            if self.seen < 1024:
                return len(buffer), 0
            self.set_as_raw(bytes(64))
            return -1, 0

    class SlowImageFile(ImageFile.ImageFile):
        format, format_description = "SLOWTEST", "test format with a slow decoder"

        def _open(self):
            if self.fp.read(8) != b"SLOWTEST":
                raise SyntaxError("not SLOWTEST")
            self.decodermaxblock = 16  # 16-byte reads: 64 decode calls of 50 ms for the file
            self._mode, self._size = "L", (8, 8)
            self.tile = [ImageFile._Tile("slowtest", (0, 0, 8, 8), 8, None)]

    Image.register_open("SLOWTEST", SlowImageFile, lambda prefix: prefix[:8] == b"SLOWTEST")
    Image.register_decoder("slowtest", Decoder)
    try:
        yield b"SLOWTEST" + bytes(1024)
    finally:
        Image.OPEN.pop("SLOWTEST", None)
        Image.DECODERS.pop("slowtest", None)
        if "SLOWTEST" in Image.ID:
            Image.ID.remove("SLOWTEST")


def test_a_slow_decode_inline_is_a_timeout_row_and_the_batch_goes_on(tmp_path, photos, slow_format):
    """``inference.num_workers: 0``: the DataLoader decodes in this process and thread; the slow
    image stops at ``input.decode_timeout_s`` and the other images of its batch are scored."""
    import time

    from torch.utils.data import DataLoader

    from imgscore.images.dataset import ShardDataset, collate_samples
    from imgscore.images.entries import ImageEntry

    photos["astronaut"].resize((64, 64)).save(tmp_path / "a.jpg", format="JPEG")
    (tmp_path / "slow.png").write_bytes(slow_format)
    photos["chelsea"].resize((64, 48)).save(tmp_path / "c.png", format="PNG")
    entries = [ImageEntry(n, None, None, None, None) for n in ("a.jpg", "slow.png", "c.png")]
    opts = DecodeOptions(max_pixels=10**8, formats=(*DEFAULT_FORMATS, "SLOWTEST"), decode_timeout_s=0.3)
    loader = DataLoader(
        ShardDataset(str(tmp_path), entries, SPEC, opts), batch_size=3, num_workers=0, collate_fn=collate_samples
    )
    t0 = time.monotonic()
    (batch,) = list(loader)
    elapsed = time.monotonic() - t0
    assert batch.positions == [0, 2] and tuple(batch.tensor.shape) == (2, 3, 224, 224)
    (fail,) = batch.failures
    assert (fail.pos, fail.image_path, fail.stage, fail.error_type) == (1, "slow.png", "decode", "DecodeError.timeout")
    assert "over input.decode_timeout_s=0.3 s" in fail.message and "raise input.decode_timeout_s" in fail.message
    assert elapsed < 2.0  # stopped near 0.3 s, not after the 3.2 s the whole decode takes
    img = decode_bytes(
        slow_format, "slow.png", SPEC, DecodeOptions(max_pixels=10**8, formats=("SLOWTEST",), decode_timeout_s=30)
    ).image
    assert img.size == (8, 8)  # with time enough, the same file decodes


def test_a_folder_with_no_file_of_the_listed_formats_is_refused_naming_the_key(tmp_path, photos):
    from imgscore.errors import InputError
    from imgscore.images.scan import has_images, scan_images

    photos["astronaut"].resize((32, 32)).save(tmp_path / "a.jpg", format="JPEG")
    assert has_images(tmp_path) and not has_images(tmp_path, formats=["PNG"])
    with pytest.raises(
        InputError,
        match=r"holds no image files that this Pillow reads \(\.png and 1 more extensions\); .*"
        r"or that input.formats \(PNG\) lists their format$",
    ):
        scan_images(tmp_path, formats=["PNG"])


def _iptc_wrapping(payload: bytes) -> bytes:
    """An IPTC/NAA record (Pillow's IPTC plugin) whose image data, compression 5, is ``payload``."""
    import struct

    def field(rec: int, ds: int, data: bytes) -> bytes:
        return bytes([0x1C, rec, ds]) + struct.pack(">H", len(data)) + data

    return (
        field(3, 60, b"\x01\x00")
        + field(3, 20, b"\x00\x0a")
        + field(3, 30, b"\x00\x0a")
        + field(3, 120, b"\x05")
        + field(8, 10, payload)
    )


def test_iptc_cannot_be_enabled_since_it_opens_embedded_data_with_every_plugin(tmp_path, recording_gs):
    """IptcImagePlugin has no magic-byte test and its load() calls Image.open on the embedded
    data with no formats= list: with IPTC allowed, PostScript wrapped in IPTC reached gs."""
    with pytest.raises(
        ConfigError,
        match=r"input.formats names 'IPTC', which is never decoded here: Pillow's IPTC plugin opens "
        r"the image data embedded in the file with every Pillow plugin, EPS included",
    ):
        build_config({}, ["input.formats=[JPEG, PNG, IPTC]"])
    assert "IPTC" not in known_formats()
    record, env = recording_gs
    old_path = os.environ["PATH"]
    os.environ["PATH"] = env["PATH"]
    try:
        p = tmp_path / "holiday.png"
        p.write_bytes(_iptc_wrapping(POSTSCRIPT))
        with pytest.raises(DecodeError) as exc:  # every known format allowed: still a DecodeError, no program
            decode_file(str(p), SPEC, DecodeOptions(max_pixels=10**8, formats=tuple(known_formats())))
        assert exc.value.kind in ("unidentified", "format_not_allowed")
    finally:
        os.environ["PATH"] = old_path
    assert not record.exists(), f"gs was run: {record.read_text()}"


def _opens_nested_images(image_class) -> bool:
    """Whether the methods Pillow runs to open and load ``image_class`` call ``Image.open`` or a
    subprocess themselves (comments left out)."""
    import inspect
    import re

    for name in ("_open", "load", "load_prepare", "load_end", "load_read", "load_seek", "seek", "_seek"):
        method = getattr(image_class, name, None)
        if method is None or getattr(method, "__qualname__", "").split(".")[0] != image_class.__name__:
            continue
        code = "\n".join(line.split("#")[0] for line in inspect.getsource(method).splitlines())
        if re.search(r"\bImage\.open\(|\bsubprocess\.", code):
            return True
    return False


def test_no_allowed_plugin_opens_nested_data_with_every_plugin():
    """A contract on the installed Pillow: the plugin of every format input.formats accepts never
    opens embedded data with Image.open (which tries every plugin: how IPTC reached EPS) or runs a
    program while opening or loading; a new Pillow whose plugin does fails here, not in a night."""
    from PIL import IptcImagePlugin

    assert _opens_nested_images(IptcImagePlugin.IptcImageFile)  # the check sees the case it is for
    Image.init()
    offenders = [fmt for fmt in known_formats() if fmt in Image.OPEN and _opens_nested_images(Image.OPEN[fmt][0])]
    assert offenders == []


def test_a_report_opens_only_default_formats_whatever_the_manifest_says():
    """The manifest lies under output.root: a planted input.formats must not switch decoders on."""
    from imgscore.images.formats import recorded_formats

    assert recorded_formats(["PNG", "IPTC", "EPS", "FITS", "jpeg"]) == ("PNG", "JPEG")
    assert recorded_formats(["FITS"]) == DEFAULT_FORMATS
    assert recorded_formats("PNG") == DEFAULT_FORMATS
    assert recorded_formats(None) == DEFAULT_FORMATS


def test_a_rerun_takes_recorded_non_default_formats_only_when_repeated(tmp_path):
    from imgscore.config.rerun import rerun_config

    recorded = build_config({"run": {"run_id": "r1"}}, ["input.formats=[JPEG, FITS]"]).to_dict()
    with pytest.raises(
        ConfigError, match=r"recorded input.formats = \['JPEG', 'FITS'\], which opens the images with those decoders"
    ):
        rerun_config(recorded, None, [])
    assert rerun_config(recorded, None, ["input.formats=[JPEG, FITS]"]).input.formats == ["JPEG", "FITS"]
    default = build_config({"run": {"run_id": "r2"}}).to_dict()
    assert rerun_config(default, None, []).input.formats == list(DEFAULT_FORMATS)


def test_the_decode_budget_also_covers_the_conversion_after_the_load(tmp_path, monkeypatch):
    """A wide float image's conversion to RGB is numpy work that reads nothing: the budget is
    checked after it, so an image whose decode overran is a timeout, not a slow success."""
    import time

    from imgscore.images import decode

    p = tmp_path / "float.tif"
    Image.fromarray(np.full((64, 64), 2.0, dtype=np.float32)).save(p)
    real = decode.to_rgb  # the conversion as the decode looks it up

    def slow_to_rgb(img, spec):
        time.sleep(0.6)  # stands for numpy over tens of megapixels of float32
        return real(img, spec)

    monkeypatch.setattr(decode, "to_rgb", slow_to_rgb)
    opts = DecodeOptions(max_pixels=10**8, decode_timeout_s=0.5)
    with pytest.raises(
        DecodeError, match=r"decoding stopped after .* s while converting to RGB: over input.decode_timeout_s=0.5 s"
    ) as exc:
        decode_file(str(p), SPEC, opts)
    assert exc.value.kind == "timeout"
    monkeypatch.setattr(decode, "to_rgb", real)
    assert decode_file(str(p), SPEC, opts).image.size == (64, 64)  # within the budget: decoded


def test_a_jpeg_header_followed_by_garbage_is_corrupt_not_unreadable(tmp_path):
    """Pillow raises OSError('Truncated File Read') while parsing the headers: bad bytes, which
    the errors table calls truncated/corrupt; unreadable is kept for the OS refusing the read."""
    p = tmp_path / "bad.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 5)
    with pytest.raises(DecodeError, match=r"cannot open: Truncated File Read") as exc:
        decode_file(str(p), SPEC, OPTS)
    assert exc.value.kind == "truncated"
    q = tmp_path / "gone.jpg"
    with pytest.raises(DecodeError) as exc:
        decode_file(str(q), SPEC, OPTS)
    assert exc.value.kind == "unreadable"
