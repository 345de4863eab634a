"""Pixels that must not be silently wrong: float and wide-integer images, NaN/Inf
no-data, PNGs with large text or ICC chunks, embedded ICC profiles, and a file replaced between
the scan and the decode. Every image is written in the test with Pillow.

Expected values follow from the documented policy by arithmetic (``value_range``: the range
that becomes 0..255), so each assertion would fail if the policy were not applied.
"""

from __future__ import annotations

import io
import os
import struct
import threading

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from imgscore.config.scoring import PILLOW_MAX_PIXELS, PreprocessConfig
from imgscore.images.dataset import Failure, Sample, ShardDataset, collate_samples
from imgscore.images.decode import decode_file, decode_image
from imgscore.images.entries import ImageEntry
from imgscore.images.preprocess import DecodeError, DecodeOptions, PreprocessSpec
from imgscore.images.rgb import value_range

SPEC = PreprocessSpec(max_aspect_ratio=100.0)
OPTS = DecodeOptions(PILLOW_MAX_PIXELS)


def gray(path, spec: PreprocessSpec = SPEC, opts: DecodeOptions = OPTS) -> np.ndarray:
    """Decoded image → uint8 [H, W] (the three channels must be equal)."""
    rgb = np.asarray(decode_image(str(path), spec, opts))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


def ramp(lo: float, hi: float, dtype, shape=(8, 256)) -> np.ndarray:
    """Each row lo → hi in equal steps."""
    return np.tile(np.linspace(lo, hi, shape[1]), (shape[0], 1)).astype(dtype)


# ------------------------------------------------------------------------------------ float and wide integers


def test_float_tiff_0_to_1_keeps_its_gradient(tmp_path):
    Image.fromarray(ramp(0.0, 1.0, np.float32), mode="F").save(tmp_path / "unit.tif")
    row = gray(tmp_path / "unit.tif")[0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1


def test_float_tiff_with_nan_rows_is_an_error_not_a_black_image(tmp_path):
    a = ramp(0.0, 1.0, np.float32)
    a[2:4] = np.nan
    a[5, :3] = np.inf
    Image.fromarray(a, mode="F").save(tmp_path / "nodata.tif")
    with pytest.raises(
        DecodeError, match=r"515 of 2048 pixels are NaN or infinite .*preprocess.non_finite=fill"
    ) as info:
        decode_image(str(tmp_path / "nodata.tif"), SPEC, OPTS)
    assert info.value.kind == "non_finite"
    filled = gray(tmp_path / "nodata.tif", PreprocessSpec(max_aspect_ratio=100.0, non_finite="fill"))
    assert (filled[2:4] == 0).all()  # NaN → the low end of the range
    assert (filled[5, :3] == 255).all()  # +Inf → the high end
    assert filled[0, -1] == 255 and abs(int(filled[0, 128]) - 128) <= 1  # the rest: the 0..1 range of the finite pixels


def test_all_nan_is_an_error_even_with_fill(tmp_path):
    Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(tmp_path / "empty.tif")
    with pytest.raises(DecodeError, match="every pixel is NaN or infinite"):
        decode_image(str(tmp_path / "empty.tif"), PreprocessSpec(non_finite="fill"), OPTS)


def test_12bit_float_image_is_scaled_from_4095_not_clipped_at_255(tmp_path):
    Image.fromarray(ramp(0, 4095, np.float32), mode="F").save(tmp_path / "f12.tif")
    row = gray(tmp_path / "f12.tif")[0].astype(int)
    assert row[-1] == 255 and abs(row[128] - 128) <= 1  # clipping at 255 would make most of the row white
    assert (row < 255).sum() > 250


def test_12bit_data_in_a_16bit_png_keeps_its_contrast(tmp_path):
    Image.fromarray(ramp(0, 4095, np.uint16)).save(tmp_path / "u12.png")
    assert Image.open(tmp_path / "u12.png").mode == "I;16"
    row = gray(tmp_path / "u12.png")[0].astype(int)
    assert row[-1] == 255 and abs(row[128] - 128) <= 1  # /65535 would give at most 16
    fixed = gray(tmp_path / "u12.png", PreprocessSpec(max_aspect_ratio=100.0, value_range=(0, 65535)))
    assert fixed.max() == 16  # preprocess.value_range wins: 4095 * 255 / 65535 = 15.9


def test_signed_int32_image_uses_its_own_range(tmp_path):
    Image.fromarray(ramp(-500, 1500, np.int32)).save(tmp_path / "signed.tif")
    assert Image.open(tmp_path / "signed.tif").mode == "I"
    row = gray(tmp_path / "signed.tif")[0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1  # not nearly black


@pytest.mark.parametrize(
    "values, is_float, expected",
    [
        ([0.0, 0.5, 1.0], True, (0.0, 1.0)),
        ([-0.5, 0.9], True, (-1.0, 1.0)),
        ([0.0, 200.0], True, (0.0, 255.0)),  # whole numbers in a float image: 8-bit
        ([0.0, 1.5], True, (0.0, 1.5)),  # not whole: its own maximum
        ([0, 200], False, (0.0, 255.0)),
        ([3, 1000], False, (0.0, 1023.0)),  # 10-bit
        ([0, 4095], False, (0.0, 4095.0)),
        ([0, 40000], False, (0.0, 65535.0)),
        ([-500, 1500], False, (-500.0, 1500.0)),
        ([-7, -7], False, (-7.0, -6.0)),  # constant: a range of one, never a division by zero
    ],
)
def test_value_range_policy(values, is_float, expected):
    assert value_range(np.array(values, dtype=np.float64), is_float) == expected
    assert value_range(np.array(values, dtype=np.float64), is_float, (2.0, 3.0)) == (2.0, 3.0)


def test_value_range_setting_is_validated():
    with pytest.raises(ValueError, match=r"low < high"):
        PreprocessConfig(value_range=(5, 5))


# ------------------------------------------------------------------------------------ PNG metadata


def _png_with(path, kind: str, n_bytes: int) -> None:
    im = Image.new("RGB", (48, 32), (10, 200, 30))
    if kind == "ztxt":  # what image generators write: a big JSON workflow, compressed
        info = PngImagePlugin.PngInfo()
        info.add_text("workflow", "{" + "x" * n_bytes + "}", zip=True)
        im.save(path, pnginfo=info)
    else:  # a scanner's large ICC profile
        im.save(path, icc_profile=bytes(n_bytes))


@pytest.mark.parametrize("kind", ["ztxt", "iccp"])
def test_png_with_a_large_text_or_icc_chunk_decodes_and_pillow_is_left_as_it_was(kind, tmp_path):
    p = tmp_path / f"{kind}.png"
    _png_with(p, kind, 3 << 20)
    with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"):  # Pillow alone refuses it
        Image.open(p).load()
    before = (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY)
    out = np.asarray(decode_image(str(p), SPEC, OPTS))
    assert out.shape == (32, 48, 3) and tuple(out[0, 0]) == (10, 200, 30)
    assert (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY) == before  # scoped: restored
    with pytest.raises(
        DecodeError, match=r"larger than input.max_metadata_bytes=2097152 .*raise input.max_metadata_bytes"
    ) as info:
        decode_image(str(p), SPEC, DecodeOptions(PILLOW_MAX_PIXELS, max_metadata_bytes=2 << 20))
    assert info.value.kind == "metadata_too_large"
    assert (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY) == before  # restored after an error too


def test_metadata_limit_is_never_seen_by_a_concurrent_decode(tmp_path):
    """The raised limit lives inside the per-process decode lock: a decode in another thread that
    asks for Pillow's default limit still refuses the large chunk while others decode."""
    big = tmp_path / "big.png"
    _png_with(big, "ztxt", 3 << 20)
    small_limit = DecodeOptions(PILLOW_MAX_PIXELS, max_metadata_bytes=1)  # never lowers Pillow's own 1 MiB
    errors: list[str] = []

    def worker(opts, expect_ok):
        for _ in range(20):
            try:
                decode_image(str(big), SPEC, opts)
                ok = True
            except DecodeError:
                ok = False
            if ok != expect_ok:
                errors.append(f"{opts.max_metadata_bytes}: {ok}")

    threads = [
        threading.Thread(target=worker, args=(OPTS, True)),
        threading.Thread(target=worker, args=(small_limit, False)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ------------------------------------------------------------------------------------ ICC profiles


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def rgb_icc_profile(r, g, b, gamma: float = 2.2) -> bytes:
    """A minimal ICC v2 matrix/TRC RGB display profile with the given D50 primaries (XYZ)."""
    d50 = (0.9642, 1.0, 0.8249)

    def xyz(x, y, z):
        return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    text = b"test profile\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(*d50)),
        (b"rXYZ", xyz(*r)),
        (b"gXYZ", xyz(*g)),
        (b"bXYZ", xyz(*b)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text" + bytes(4) + b"none\0\0\0\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    header = (
        struct.pack(">I", offset + len(data))
        + b"lcms"
        + bytes([2, 0x10, 0, 0])
        + b"mntrRGB XYZ "
        + bytes(12)
        + b"acsp"
        + b"APPL"
        + bytes(20)
        + bytes(4)
        + _s15(d50[0])
        + _s15(d50[1])
        + _s15(d50[2])
        + b"lcms"
        + bytes(44)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


SRGB_D50 = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def test_icc_profile_ignored_by_default_and_converted_with_color_manage(tmp_path):
    """A profile whose red and blue primaries are sRGB's blue and red: the stored red pixels are
    blue once colour-managed. Off (the default, like torchvision), the pixels are as stored."""
    r, g, b = SRGB_D50
    swapped = rgb_icc_profile(b, g, r)
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(swapped))).strip() == "test profile"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "swapped.png", icc_profile=swapped)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "swapped.jpg", icc_profile=swapped, quality=100)
    for name in ("swapped.png", "swapped.jpg"):
        stored = np.asarray(decode_image(str(tmp_path / name), SPEC, OPTS))[0, 0].astype(int)
        managed = np.asarray(decode_image(str(tmp_path / name), PreprocessSpec(color_manage=True), OPTS))[0, 0].astype(
            int
        )
        assert np.abs(stored - (200, 30, 30)).max() <= 3, name
        assert managed[2] > 180 and managed[0] < 50, (name, managed)  # red as stored, blue in sRGB


def test_broken_icc_profile_keeps_pixels_and_counts_a_warning(tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "bad_icc.png", icc_profile=b"not a profile" * 10)
    warned: list[str] = []
    out = np.asarray(decode_image(str(tmp_path / "bad_icc.png"), PreprocessSpec(color_manage=True), OPTS, warned))
    assert tuple(out[0, 0]) == (200, 30, 30)
    assert warned and warned[0].startswith("ICC profile not applied")


# ------------------------------------------------------------------------------------ files that change under us


def test_row_describes_the_file_that_was_decoded_not_the_one_scanned(tmp_path, photos):
    """A file replaced between the scan and the decode: the sample carries the size and mtime of
    the bytes actually read (fstat of the decoded file object)."""
    p = tmp_path / "a.jpg"
    photos["coffee"].resize((64, 48)).save(p, quality=60)
    scanned = os.stat(p)
    entry = ImageEntry("a.jpg", None, None, scanned.st_size, scanned.st_mtime_ns)
    replacement = tmp_path / ".a.jpg.new"
    photos["rocket"].resize((200, 150)).save(replacement, format="JPEG", quality=95)
    os.utime(replacement, ns=(scanned.st_atime_ns, scanned.st_mtime_ns + 5_000_000_000))
    os.replace(replacement, p)  # after the scan, before the decode
    now = os.stat(p)
    assert now.st_size != scanned.st_size
    ds = ShardDataset(str(tmp_path), [entry], SPEC, OPTS)
    sample = ds[0]
    assert isinstance(sample, Sample) and (sample.file_size, sample.file_mtime_ns) == (now.st_size, now.st_mtime_ns)
    assert collate_samples([sample]).file_stats == {0: (now.st_size, now.st_mtime_ns)}
    d = decode_file(str(p), SPEC, OPTS)
    assert (d.file_size, d.file_mtime_ns) == (now.st_size, now.st_mtime_ns)


@pytest.mark.slow
def test_flow_row_records_the_replacement_not_the_scan(prefect_server, photos, tiny_checkpoint, tmp_path, monkeypatch):
    """Through the flow: the file is replaced just before its shard decodes it; the predictions
    row carries the replacement's size and mtime, the index keeps what the scan saw."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    import imgscore.images.dataset
    from imgscore.config.loading import build_config
    from imgscore.flows.cli import execute
    from tests.conftest import base_overrides

    root = tmp_path / "images"
    root.mkdir()
    for name, photo in (("a.jpg", "coffee"), ("b.jpg", "rocket")):
        photos[photo].resize((64, 48)).save(root / name, quality=60)
    real = imgscore.images.dataset.decode_file
    replaced = {}

    def replace_then_decode(path, *a, **k):  # runs in this process: inference.num_workers=0
        if path.endswith("b.jpg") and not replaced:
            photos["astronaut"].resize((300, 300)).save(path, format="JPEG", quality=95)
            st = os.stat(path)
            replaced["b.jpg"] = (st.st_size, st.st_mtime_ns)
        return real(path, *a, **k)

    monkeypatch.setattr(imgscore.images.dataset, "decode_file", replace_then_decode)
    out = tmp_path / "out"
    code, _ = execute(
        build_config(
            {}, base_overrides(root, tiny_checkpoint, out, **{"run.run_id": "swap", "inference.num_workers": 0})
        ),
        quiet=True,
    )
    assert code == 0
    rows = {
        r["image_path"]: r
        for r in pads.dataset(str(out / "predictions"), format="parquet", partitioning="hive").to_table().to_pylist()
    }
    scanned = {r["image_path"]: r for r in pq.read_table(out / "runs" / "swap" / "index.parquet").to_pylist()}
    assert (
        (rows["b.jpg"]["file_size"], rows["b.jpg"]["file_mtime_ns"])
        == replaced["b.jpg"]
        != (scanned["b.jpg"]["size"], scanned["b.jpg"]["mtime_ns"])
    )
    assert (rows["a.jpg"]["file_size"], rows["a.jpg"]["file_mtime_ns"]) == (
        scanned["a.jpg"]["size"],
        scanned["a.jpg"]["mtime_ns"],
    )


def test_file_gone_or_unreadable_after_the_scan_is_a_decode_error(tmp_path):
    """The scan only stats files; reading happens at decode, so a file that cannot be read then
    (deleted, or no read permission) is an errors row at stage decode, DecodeError.unreadable."""
    entry = ImageEntry("gone.jpg", None, None, 100, 1)
    f = ShardDataset(str(tmp_path), [entry], SPEC, OPTS)[0]
    assert isinstance(f, Failure) and (f.stage, f.error_type) == ("decode", "DecodeError.unreadable")
    assert "No such file or directory" in f.message
    if os.geteuid() != 0:  # root reads anything: only an unprivileged user can see permission denied
        p = tmp_path / "locked.jpg"
        Image.new("RGB", (8, 8)).save(p)
        p.chmod(0)
        f = ShardDataset(str(tmp_path), [ImageEntry("locked.jpg", None, None, 1, 1)], SPEC, OPTS)[0]
        assert (f.stage, f.error_type) == ("decode", "DecodeError.unreadable") and "Permission denied" in f.message
