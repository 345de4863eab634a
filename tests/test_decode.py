"""Unit cases for ``imgscore.images.decode.decode_image`` and the shard dataset/collate: the
field cases of broken and unusual image files (docs/images.md, "What happens to broken and unusual images").

Every input is made here from the real photos of the ``photos`` fixture; every test asserts the
exact outcome (error kind, pixels, shape), so a wrong decode policy fails it.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from imgscore.config.scoring import PILLOW_MAX_PIXELS
from imgscore.images.dataset import Failure, Sample, ShardDataset, collate_samples
from imgscore.images.decode import decode_image
from imgscore.images.entries import ImageEntry, display_path
from imgscore.images.preprocess import DecodeError, DecodeOptions, PreprocessSpec, build_transform

SPEC = PreprocessSpec()
OPTS = DecodeOptions(max_pixels=PILLOW_MAX_PIXELS)


def decode(path, spec: PreprocessSpec = SPEC, opts: DecodeOptions = OPTS, warned=None) -> np.ndarray:
    """decode_image → uint8 [H, W, 3] array, asserting nothing leaks to the warnings machinery."""
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        img = decode_image(str(path), spec, opts, warned)
    assert [str(w.message) for w in leaked] == []
    assert img.mode == "RGB"
    return np.asarray(img)


# ---------------------------------------------------------------- file makers (used by test_failures too)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=kw.pop("quality", 92), **kw)
    return buf.getvalue()


def write_truncated_jpeg(path: Path, img: Image.Image, keep: float, progressive: bool) -> Path:
    """A JPEG cut after ``keep`` (fraction) of its bytes; the header stays intact, so Pillow opens it."""
    data = jpeg_bytes(img, progressive=progressive)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def heic_like_bytes() -> bytes:
    """An ISO-BMFF file with an ``ftyp`` box of brand ``heic`` (what an iPhone photo starts with)."""
    ftyp = b"ftyp" + b"heic" + struct.pack(">I", 0) + b"mif1heic"
    box = struct.pack(">I", 8 + len(ftyp) - 4) + ftyp
    meta = struct.pack(">I", 24) + b"meta" + bytes(16)
    return box + meta + os.urandom(200)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny (< 100 bytes) PNG whose IHDR declares ``width`` x ``height`` RGB pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def palette_with_transparency(img: Image.Image) -> Image.Image:
    """Mode P with a tRNS chunk of alpha bytes: left quarter fully transparent (index 0), next
    quarter half-transparent red (index 1, alpha 128), the rest the opaque photo (indices 2..255)."""
    p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=254)
    arr = np.asarray(p).astype(np.uint8) + 2
    q = arr.shape[1] // 4
    arr[:, :q] = 0
    arr[:, q : 2 * q] = 1
    out = Image.fromarray(arr, mode="P")
    out.putpalette([0, 0, 0, 255, 0, 0] + p.getpalette()[: 254 * 3])
    out.info["transparency"] = bytes([0, 128] + [255] * 254)
    return out


def corrupt_exif(orientation: int = 6) -> bytes:
    """EXIF with an orientation tag and a Make tag whose data lies past the end (Pillow warns)."""
    entries = struct.pack("<HHII", 0x0112, 3, 1, orientation) + struct.pack("<HHII", 0x010F, 2, 400, 5000)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + struct.pack("<I", 0)
    return b"Exif\x00\x00" + tiff


def exif_rotated(img: Image.Image) -> tuple[Image.Image, Image.Exif]:
    """The photo as a phone stores it: pixels rotated 90° counter-clockwise, orientation tag 6."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return img.transpose(Image.Transpose.ROTATE_90), exif


def gradient16() -> Image.Image:
    """16-bit grayscale (I;16) horizontal ramp 0 → 65535 over 256 columns, 64 rows."""
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    return Image.fromarray(np.tile(ramp, (64, 1)))


def solid_frames(colors, size=(64, 48)) -> list[Image.Image]:
    return [Image.new("RGB", size, c) for c in colors]


# ---------------------------------------------------------------- broken files → DecodeError kinds


@pytest.fixture
def photo(photos) -> Image.Image:
    """chelsea (the cat), 451x300 RGB: not square, so rotations are visible in the shape."""
    return photos["chelsea"]


def test_truncated_baseline_jpeg_is_truncated_not_grey(tmp_path, photo):
    p = write_truncated_jpeg(tmp_path / "cut.jpg", photo, 0.6, progressive=False)
    assert Image.open(p).size == photo.size  # opens lazily: only a full decode finds the damage
    with pytest.raises(DecodeError, match="truncated") as ei:
        decode(p)
    assert ei.value.kind == "truncated"


def test_truncated_progressive_jpeg_is_truncated(tmp_path, photo):
    p = write_truncated_jpeg(tmp_path / "cut.jpg", photo, 0.3, progressive=True)
    with pytest.raises(DecodeError) as ei:
        decode(p)
    assert ei.value.kind == "truncated"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # never switched on globally


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(DecodeError, match="zero-byte file") as ei:
        decode(p)
    assert ei.value.kind == "empty"


def test_text_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("shopping list\neggs\nmilk\n")
    with pytest.raises(DecodeError, match="text file with an image extension") as ei:
        decode(p)
    assert ei.value.kind == "unidentified"


def test_heic_named_png(tmp_path):
    p = tmp_path / "IMG_0001.png"
    p.write_bytes(heic_like_bytes())
    with pytest.raises(DecodeError, match=r"HEIC/HEIF image \(brand 'heic'\) with a '.png' name") as ei:
        decode(p)
    assert ei.value.kind == "unidentified"


# ---------------------------------------------------------------- awkward but valid encodings


def test_cmyk_jpeg_matches_rgb_twin(tmp_path, photo):
    (tmp_path / "rgb.jpg").write_bytes(jpeg_bytes(photo, quality=95))
    (tmp_path / "cmyk.jpg").write_bytes(jpeg_bytes(photo.convert("CMYK"), quality=95))
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    rgb, cmyk = decode(tmp_path / "rgb.jpg").astype(int), decode(tmp_path / "cmyk.jpg").astype(int)
    assert cmyk.shape == rgb.shape == (300, 451, 3)
    assert np.abs(cmyk - rgb).mean() < 3.0  # an inverted or channel-swapped CMYK would be ~100


def test_palette_with_transparency_composited_on_background(tmp_path, photo):
    palette_with_transparency(photo).save(tmp_path / "pal.png")
    src = Image.open(tmp_path / "pal.png")
    assert src.mode == "P" and isinstance(src.info["transparency"], bytes)
    out = decode(tmp_path / "pal.png").astype(int)  # decode() fails if a Pillow warning leaks
    q = out.shape[1] // 4
    assert (out[:, :q] == 255).all()  # transparent → white background
    assert (out[:, q : 2 * q] == [255, 127, 127]).all()  # red at alpha 128 over white
    ref = np.asarray(photo).astype(int)
    assert np.abs(out[:, 2 * q :] - ref[:, 2 * q :]).mean() < 12  # opaque part keeps the photo
    black = decode(tmp_path / "pal.png", spec=PreprocessSpec(background=(0, 0, 0))).astype(int)
    assert (black[:, :q] == 0).all() and (black[:, q : 2 * q] == [128, 0, 0]).all()


def test_pillow_warnings_are_collected_not_printed(tmp_path, photo):
    stored, _ = exif_rotated(photo)
    stored.save(tmp_path / "phone.jpg", quality=95, exif=corrupt_exif(6))
    warned: list[str] = []
    out = decode(tmp_path / "phone.jpg", warned=warned)  # asserts that nothing leaked
    assert out.shape == (300, 451, 3)  # the orientation tag still applies
    assert warned and all(w == "UserWarning: Tag data larger than file. Skipping tag 271" for w in warned)


def test_rgba_and_la_composited_on_white(tmp_path, photo):
    rgba = photo.convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:, :100, 3] = 0  # transparent band
    a[:, 100:200, 3] = 128  # half transparent band
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    out = decode(tmp_path / "rgba.png").astype(int)
    src = np.asarray(photo).astype(int)
    assert (out[:, :100] == 255).all()
    half = src[:, 100:200] * 128 / 255 + 255 * 127 / 255
    assert np.abs(out[:, 100:200] - half).max() <= 1
    assert (out[:, 200:] == src[:, 200:]).all()

    la = Image.merge("LA", [photo.convert("L"), Image.new("L", photo.size, 0)])
    la.save(tmp_path / "la.png")
    assert (decode(tmp_path / "la.png") == 255).all()  # fully transparent LA → all background


def test_grayscale_becomes_three_equal_channels(tmp_path, photo):
    photo.convert("L").save(tmp_path / "gray.png")
    out = decode(tmp_path / "gray.png")
    assert out.shape == (300, 451, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert (out[..., 0] == np.asarray(photo.convert("L"))).all()


def test_16bit_png_keeps_gradient(tmp_path):
    gradient16().save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    row = decode(tmp_path / "g16.png")[10, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255  # full range, not clipped to white
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 200  # monotonic, ~every level kept
    assert abs(row[128] - 128) <= 1


def test_exif_orientation_applied_and_optional(tmp_path, photo):
    stored, exif = exif_rotated(photo)
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    photo.save(tmp_path / "upright.jpg", quality=95)
    upright = decode(tmp_path / "upright.jpg").astype(int)
    turned = decode(tmp_path / "phone.jpg").astype(int)
    assert turned.shape == upright.shape == (300, 451, 3)
    assert np.abs(turned - upright).mean() < 3.0
    raw = decode(tmp_path / "phone.jpg", opts=DecodeOptions(PILLOW_MAX_PIXELS, exif_orientation=False))
    assert raw.shape == (451, 300, 3)  # setting off: pixels as stored


def test_animated_gif_first_frame(tmp_path):
    frames = solid_frames([(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    out = decode(tmp_path / "anim.gif")
    assert out.shape == (48, 64, 3)
    assert (out == [255, 0, 0]).all()


def test_multipage_tiff_first_page(tmp_path):
    pages = solid_frames([(0, 0, 255), (0, 255, 0)])
    pages[0].save(tmp_path / "scan.tif", save_all=True, append_images=pages[1:])
    assert Image.open(tmp_path / "scan.tif").n_frames == 2
    assert (decode(tmp_path / "scan.tif") == [0, 0, 255]).all()


# ---------------------------------------------------------------- memory bounds


def test_decompression_bomb_refused_before_any_pixel_buffer(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        ImageFile.ImageFile,
        "load",
        lambda self: calls.append(self) or (_ for _ in ()).throw(AssertionError("load called")),
    )
    over_ours = tmp_path / "bomb1.png"  # 100 MP: above Pillow's default limit, below its hard stop
    over_ours.write_bytes(png_header_only(10_000, 10_000))
    over_pillow = tmp_path / "bomb2.png"  # 900 MP: Pillow's own hard stop at open()
    over_pillow.write_bytes(png_header_only(30_000, 30_000))
    assert over_ours.stat().st_size < 200
    with pytest.raises(DecodeError, match=r"10000x10000 = 100000000 pixels exceeds input.max_pixels") as e1:
        decode(over_ours)
    with pytest.raises(DecodeError, match="decompression bomb") as e2:
        decode(over_pillow)
    assert e1.value.kind == e2.value.kind == "too_large"
    assert calls == []  # the header was enough: no decode, no big allocation
    assert Image.MAX_IMAGE_PIXELS == PILLOW_MAX_PIXELS  # the global limit is untouched


def test_max_pixels_setting_refuses_a_genuine_large_photo(tmp_path, photo):
    photo.save(tmp_path / "big.png")
    with pytest.raises(DecodeError, match="raise input.max_pixels if the image is genuine"):
        decode(tmp_path / "big.png", opts=DecodeOptions(max_pixels=100_000))
    assert decode(tmp_path / "big.png", opts=DecodeOptions(max_pixels=135_300)).shape == (300, 451, 3)  # 451*300


def test_extreme_aspect_ratio_is_bounded(tmp_path, photo):
    strip = photo.resize((8000, 8), Image.Resampling.BILINEAR)
    strip.save(tmp_path / "strip.png")
    img = decode_image(str(tmp_path / "strip.png"), SPEC, OPTS)
    assert img.size == (32, 8)  # center-cropped to max_aspect_ratio=4 before resizing
    x = build_transform(SPEC)(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # without the bound, Resize(256) would have made 256000x256 (65.5 M pixels) from this file
    tall = decode_image(str(tmp_path / "strip.png"), PreprocessSpec(max_aspect_ratio=10.0), OPTS)
    assert tall.size == (80, 8)


# ---------------------------------------------------------------- names, dataset, collate


def test_non_utf8_name_decodes_and_displays_as_valid_utf8(tmp_path, photo):
    raw = os.fsencode(tmp_path) + b"/caf\xe9 photo.jpg"
    with open(raw, "wb") as f:
        f.write(jpeg_bytes(photo))
    rel = os.fsdecode(b"caf\xe9 photo.jpg")
    assert display_path(rel) == "caf\\xe9 photo.jpg"
    display_path(rel).encode("utf-8")  # valid UTF-8
    assert decode(os.path.join(str(tmp_path), rel)).shape == (300, 451, 3)


def _entries(names: list[str]) -> list[ImageEntry]:
    return [ImageEntry(n, None, None, 0, 0) for n in names]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_bad_image_in_a_batch_of_8(tmp_path, photos, num_workers):
    names = []
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "cat", "colorwheel", "immunohistochemistry"]):
        photos[name].resize((120, 90)).save(tmp_path / f"{i}_{name}.jpg")
        names.append(f"{i}_{name}.jpg")
    write_truncated_jpeg(tmp_path / "broken.jpg", photos["coffee"], 0.6, progressive=False)
    names.insert(3, "broken.jpg")
    ds = ShardDataset(str(tmp_path), _entries(names), SPEC, OPTS)
    loader = DataLoader(ds, batch_size=8, num_workers=num_workers, collate_fn=collate_samples)
    batches = list(loader)
    assert len(batches) == 1
    b = batches[0]
    assert b.positions == [0, 1, 2, 4, 5, 6, 7]
    assert b.tensor.shape == (7, 3, 224, 224) and b.tensor.dtype == torch.float32
    assert len(b.failures) == 1
    f = b.failures[0]
    assert (f.pos, f.image_path, f.stage, f.error_type) == (3, "broken.jpg", "decode", "DecodeError.truncated")
    assert "image file is truncated" in f.message
    # no substitute: row k of the tensor is the image at positions[k]
    direct = build_transform(SPEC)(decode_image(str(tmp_path / names[4]), SPEC, OPTS))
    assert torch.equal(b.tensor[3], direct)


def test_scan_error_and_unexpected_exception_become_failures(tmp_path, photos, monkeypatch):
    photos["rocket"].resize((64, 64)).save(tmp_path / "ok.png")
    entries = [
        ImageEntry("gone.jpg", None, None, None, None, scan_error="broken symlink: No such file or directory"),
        *_entries(["ok.png"]),
    ]
    ds = ShardDataset(str(tmp_path), entries, SPEC, OPTS)
    f = ds[0]
    assert isinstance(f, Failure) and (f.stage, f.error_type, f.image_path) == ("scan", "ScanError", "gone.jpg")
    assert isinstance(ds[1], Sample)

    def boom(*a, **k):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr("imgscore.images.dataset.decode_file", boom)
    f = ds[1]
    assert isinstance(f, Failure) and (f.stage, f.error_type, f.message) == ("decode", "MemoryError", "cannot allocate")


def test_collate_with_only_failures(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("hello")
    ds = ShardDataset(str(tmp_path), _entries(["a.jpg", "b.jpg"]), SPEC, OPTS)
    b = collate_samples([ds[0], ds[1]])
    assert b.tensor is None and b.positions == []
    assert [(f.image_path, f.error_type) for f in b.failures] == [
        ("a.jpg", "DecodeError.empty"),
        ("b.jpg", "DecodeError.unidentified"),
    ]


def test_warning_capture_is_thread_safe(tmp_path, photo):
    """Shards decoding in threads of one process (thread runner, num_workers=0): every decode
    counts its own warnings, none leak, and the process's warning state is restored."""
    from concurrent.futures import ThreadPoolExecutor

    stored, _ = exif_rotated(photo)
    stored.save(tmp_path / "phone.jpg", quality=95, exif=corrupt_exif(6))
    photo.save(tmp_path / "clean.jpg", quality=95)
    ref: list[str] = []
    decode(tmp_path / "phone.jpg", warned=ref)
    filters_before, show_before = list(warnings.filters), warnings.showwarning

    def one(i: int) -> list[str]:
        warned: list[str] = []
        decode_image(str(tmp_path / ("phone.jpg" if i % 2 else "clean.jpg")), SPEC, OPTS, warned)
        return warned

    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(64)))
        inner_filters = list(warnings.filters)
    assert [str(w.message) for w in leaked] == []
    assert results == [ref if i % 2 else [] for i in range(64)]
    assert inner_filters[0][0] == "always"  # our outer context was never clobbered by a decode
    assert warnings.filters == filters_before and warnings.showwarning is show_before
