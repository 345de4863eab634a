"""Mutated real photos for fuzzing the decode path (``tests/test_fuzz_decode.py`` runs a fixed
number of cases with hypothesis; ``benchmarks/fuzz_decode.py`` runs many more from a seed).

A case is a seed file — a scikit-image photo saved in one of the default ``input.formats`` (and
a few variants: progressive JPEG, palette PNG with transparency, 16-bit PNG, animated GIF,
uncompressed and deflate TIFF) — and a short list of byte edits. :func:`run_case` feeds the
result to :func:`imgscore.images.decode.decode_bytes` and the model's transform, as a shard
does, and says whether the outcome keeps the contract: a float32 [3, 224, 224] tensor, or a
``DecodeError``; anything else, or a decode slower than :data:`CASE_BUDGET_S`, is a crasher.
"""

from __future__ import annotations

import functools
import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from imgscore.images.decode import decode_bytes
from imgscore.images.formats import DEFAULT_FORMATS
from imgscore.images.preprocess import DecodeError, DecodeOptions, PreprocessSpec, build_transform

# 4 MP: a mutated header may declare any size up to this, so one case allocates at most about
# 16 MB of pixels (RGBA) — the memory bound of a run is then a small multiple of that.
FUZZ_OPTS = DecodeOptions(max_pixels=4_000_000, decode_timeout_s=5.0)
SPEC = PreprocessSpec()
# The slowest case allowed, seconds: the decode budget plus time for the transform.
CASE_BUDGET_S = FUZZ_OPTS.decode_timeout_s + 5.0
EDITS = ("flip", "set", "truncate", "insert", "delete", "repeat")


@functools.cache
def seed_files() -> dict[str, bytes]:
    """Name → bytes of each seed: a 64x48 crop of skimage's astronaut (and chelsea) saved in
    every default format this Pillow can write, plus variants that reach other decoder paths."""
    import skimage.data

    rgb = Image.fromarray(skimage.data.astronaut()).resize((64, 48))
    cat = Image.fromarray(skimage.data.chelsea()).resize((48, 64))
    out: dict[str, bytes] = {}

    def save(name: str, img: Image.Image, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out[name] = buf.getvalue()

    save("astronaut.jpg", rgb, "JPEG", quality=85)
    save("progressive.jpg", cat, "JPEG", progressive=True, quality=70)
    save("astronaut.png", rgb, "PNG")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal.info["transparency"] = 0
    save("palette.png", pal, "PNG", transparency=0)
    save("gray16.png", Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG")
    save("astronaut.webp", rgb, "WEBP", quality=80)
    save("lossless.webp", cat.convert("RGBA"), "WEBP", lossless=True)
    save("astronaut.tif", rgb, "TIFF")
    save("deflate.tif", cat, "TIFF", compression="tiff_adobe_deflate")
    save("astronaut.bmp", rgb, "BMP")
    save("astronaut.gif", rgb.convert("P"), "GIF")
    save(
        "animated.gif",
        rgb.convert("P"),
        "GIF",
        save_all=True,
        append_images=[cat.resize((64, 48)).convert("P")],
        duration=100,
    )
    save("pair.mpo", rgb, "MPO", save_all=True, append_images=[cat.resize((64, 48))])
    if "AVIF" in Image.SAVE:
        save("astronaut.avif", rgb, "AVIF", quality=60)
    assert {Image.open(io.BytesIO(b)).format for b in out.values()} <= set(DEFAULT_FORMATS)
    return out


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    """``data`` with ``edits`` applied in order; each is (kind, position, value), the position
    taken modulo the current length and ``value`` in 0..255:

    - ``flip``: XOR the byte at position with ``value`` (a bit-flip for powers of two);
    - ``set``: the byte at position becomes ``value``;
    - ``truncate``: cut the file at position;
    - ``insert``: ``value % 16 + 1`` bytes of ``value`` at position;
    - ``delete``: remove ``value % 64 + 1`` bytes at position;
    - ``repeat``: the ``value % 64 + 1`` bytes at position written twice (a stuttered chunk).
    """
    b = bytearray(data)
    for kind, pos, value in edits:
        if not b:
            break
        i = pos % len(b)
        if kind == "flip":
            b[i] ^= value or 1
        elif kind == "set":
            b[i] = value
        elif kind == "truncate":
            del b[i:]
        elif kind == "insert":
            b[i:i] = bytes([value]) * (value % 16 + 1)
        elif kind == "delete":
            del b[i : i + value % 64 + 1]
        elif kind == "repeat":
            b[i:i] = b[i : i + value % 64 + 1]
    return bytes(b)


@dataclass
class Outcome:
    """What one case did: ``result`` is ``tensor``, ``DecodeError.<kind>``, or ``crash`` (then
    ``detail`` says what broke the contract); ``seconds`` the wall time of decode + transform."""

    result: str
    seconds: float
    detail: str = ""


_TRANSFORM = build_transform(SPEC)


def run_case(data: bytes, name: str = "case") -> Outcome:
    """Decode ``data`` as a shard does and check the contract (module docstring)."""
    t0 = time.monotonic()
    try:
        tensor = _TRANSFORM(decode_bytes(data, name, SPEC, FUZZ_OPTS).image)
    except DecodeError as exc:
        out = Outcome(f"DecodeError.{exc.kind}", time.monotonic() - t0)
    except Exception as exc:  # the contract is broken: recorded as the crasher it is
        return Outcome("crash", time.monotonic() - t0, f"{type(exc).__name__}: {exc}"[:300])
    else:
        out = Outcome("tensor", time.monotonic() - t0)
        if tuple(tensor.shape) != (3, SPEC.crop, SPEC.crop) or not bool(tensor.isfinite().all()):
            return Outcome(
                "crash",
                out.seconds,
                f"tensor {tuple(tensor.shape)} {tensor.dtype}, finite={bool(tensor.isfinite().all())}",
            )
    if out.seconds > CASE_BUDGET_S:
        return Outcome("crash", out.seconds, f"took {out.seconds:.1f} s, over {CASE_BUDGET_S} s")
    return out


# A case may grow the process's peak resident memory by at most this, MiB: a few copies of the
# largest image FUZZ_OPTS lets through (4 MP x 4 bytes = 16 MB) plus the transform's tensors.
CASE_MEMORY_MIB = 256


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory of this process during a stretch of code, MiB above where it began.

    On Linux the kernel's high-water mark is reset first (``/proc/self/clear_refs`` ← 5, then
    ``VmHWM``), so each case is measured on its own whatever ran before it. Elsewhere,
    ``ru_maxrss`` growth: a lower bound (a case below an earlier peak shows no growth).
    """

    def __enter__(self) -> PeakMemory:
        self.exact = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = _status_kib("VmHWM") is not None
        except OSError:
            pass
        self.start_kib = _status_kib("VmRSS") if self.exact else _maxrss_kib()
        return self

    def __exit__(self, *exc) -> None:
        end = _status_kib("VmHWM") if self.exact else _maxrss_kib()
        self.growth_mib = max(0, end - self.start_kib) / 1024


def _maxrss_kib() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak
