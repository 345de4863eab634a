"""Speed must not change answers: every fast path on, then off, over real photos; same top-1 and
top-1 score within 0.01.

Fast paths, each a config key: ``preprocess.jpeg_draft`` (libjpeg DCT-domain downscale to no less
than twice the resize target, when the source is at least four times it),
``inference.channels_last``, ``inference.fold_bn`` (conv-BN folding), ``inference.batch_size`` and
``inference.num_workers`` (DataLoader worker processes). ``torch.inference_mode`` is always on and
has no numeric effect.

What the model is, and why it makes the test hold on every CPU by construction: a seeded
resnet18 backbone with random weights and a classifier head *set from its own features* of these
photos (:func:`photo_model`): one class per photo, the weight of class ``c`` the mean centred
feature of photo ``c``'s images. So the slow path answers "photo c" for each image of photo c,
by the geometry of the features (each image's top-1 leads by ≥ 0.73 logit here, where a CPU's
rounding moves logits by about 1e-5), and the head's scale is chosen so the largest top-1 score
is 0.8 — unsaturated, so a score change shows. A trained model (what this test used before)
cannot promise that: one epoch of training on another CPU's rounding came out with only two
distinct classes and the "not vacuous" check failed. A seeded random 1000-class head cannot
either (its top-1 flips under one grey level of noise: its logits nearly tie). A negative control
shows the 0.01 tolerance catches a wrong decode with this model.
"""

from __future__ import annotations

import json

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image

from imgscore.config.loading import build_config
from imgscore.config.scoring import ModelConfig, PreprocessConfig
from imgscore.flows.cli import execute
from imgscore.images.decode import decode_image
from imgscore.images.preprocess import DecodeOptions, PreprocessSpec, build_transform
from imgscore.inference.backends import canary
from imgscore.inference.backends.canary import run_canary
from imgscore.inference.backends.eager import TorchForward, forward_probs
from imgscore.inference.backends.factory import make_forward
from imgscore.inference.backends.forward import Forward
from imgscore.inference.model import load_model
from tests.conftest import assert_same_answers

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
# Long side of the re-saved photos: 1600 (draft 1/2 where the short side reaches 1024, like the
# compute benchmark), 4000 (draft 1/4, like a 12-megapixel phone photo), and the photos as shipped
# (512 px and smaller: no draft).
LONG_SIDES = (1600, 4000, None)
NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, photos):
    """Flat folder of JPEGs made from the real photos at three sizes, plus two PNGs."""
    root = tmp_path_factory.mktemp("fidelity_photos")
    for name in NAMES:
        img = photos[name]
        for long_side in LONG_SIDES:
            if long_side is None:
                img.save(root / f"{name}.jpg", quality=92)
                continue
            w, h = img.size
            s = long_side / max(w, h)
            img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC).save(
                root / f"{name}_{long_side}.jpg", quality=90
            )
    for name in ("coffee", "rocket"):
        photos[name].save(root / f"{name}.png")
    return root


TOP_SCORE = 0.8  # the head's scale makes the most confident slow-path top-1 exactly this


def photo_of(name: str) -> int:
    """Class index of a fidelity image: the photo it was made from."""
    return next(i for i, n in enumerate(NAMES) if name.startswith(n))


@pytest.fixture(scope="module")
def photo_model(photo_folder, tmp_path_factory):
    """A resnet18 state_dict (6 classes) that tells the six photos apart on any CPU (module doc).

    Backbone: ``torch.manual_seed(0)`` then torchvision's init (the same weights on every machine
    up to the last bit of a few values); every BatchNorm gets a seeded random affine (weight in
    [0.5, 1.5), bias ~ 0.1·N(0, 1)) and running statistics measured on these photos, so
    conv-BN folding has real work to do (a fold that forgot the running mean moves top-1 scores by
    0.65, a wrong eps by 0.04). Head: for features ``f`` (float32 [N, 512], the slow path's
    decode: no draft, resize 256, crop 224) centred on their mean ``mu``, class ``c``'s weight is
    the unit mean of photo ``c``'s centred features times ``scale / mean |f - mu|``, its bias
    ``-w·mu``; ``scale`` is bisected so the largest softmax top-1 over the images is
    :data:`TOP_SCORE`. The fixture checks its own construction: every image's top-1 is its photo,
    with a margin far above what rounding or a faithful fast path moves (0.73 logit measured).
    """
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(NAMES))
    spec = PreprocessSpec(jpeg_draft=False)
    tf, opts = build_transform(spec), DecodeOptions(max_pixels=10**9)
    paths = sorted(photo_folder.iterdir())
    x = torch.stack([tf(decode_image(str(p), spec, opts)) for p in paths])
    g = torch.Generator().manual_seed(1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g))
            bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=g))
            bn.momentum = None  # running statistics = this batch's statistics
        model.train()(x)
    model.eval()
    head, model.fc = model.fc, torch.nn.Identity()
    with torch.inference_mode():
        f = model(x)
    cls = torch.tensor([photo_of(p.name) for p in paths])
    mu = f.mean(0)
    centred = f - mu
    protos = torch.stack([centred[cls == c].mean(0) for c in range(len(NAMES))])
    protos = protos / protos.norm(dim=1, keepdim=True) / centred.norm(dim=1).mean()
    z = centred @ protos.T  # logits at scale 1
    lo, hi = 0.0, 1000.0
    for _ in range(60):  # the largest top-1 probability grows with the scale
        scale = (lo + hi) / 2
        lo, hi = (lo, scale) if (scale * z).softmax(1).max() > TOP_SCORE else (scale, hi)
    logits = scale * z
    top2 = logits.topk(2, dim=1).values
    assert torch.equal(logits.argmax(1), cls), "construction: each image's top-1 must be its own photo"
    assert (top2[:, 0] - top2[:, 1]).min() > 0.1, "construction: top-1 margins must dwarf rounding"
    with torch.no_grad():
        head.weight.copy_(scale * protos)
        head.bias.copy_(-(scale * protos) @ mu)
    model.fc = head
    path = tmp_path_factory.mktemp("photo_model") / "resnet18_photos.pt"
    torch.save(model.state_dict(), path)
    return path


def _rows(out, run_id):
    t = ds.dataset(out / "predictions", format="parquet", partitioning="hive").to_table()
    return {r["image_path"]: r for r in t.to_pylist() if r["run_id"] == run_id}


def _scores(rows):
    return {path: (r["pred_index"], r["score"]) for path, r in rows.items()}


FAST = {
    "preprocess.jpeg_draft": True,
    "inference.channels_last": True,
    "inference.fold_bn": True,
    "inference.batch_size": 8,
    "inference.num_workers": 2,
}
SLOW = {
    "preprocess.jpeg_draft": False,
    "inference.channels_last": False,
    "inference.fold_bn": False,
    "inference.batch_size": 1,
    "inference.num_workers": 0,
}


def _run(root, ckpt, out, paths, expect_code=0):
    sets = {
        "input.root": root,
        "model.arch": "resnet18",
        "model.checkpoint": ckpt,
        "output.root": out,
        "inference.device": "cpu",
        "run.shard_size": 100,
        "preprocess.resize": 256,
        "preprocess.crop": 224,
        **paths,
    }
    code, summary = execute(build_config({}, [f"{k}={v}" for k, v in sets.items()]), quiet=True)
    assert code == expect_code
    if code != 0:
        return None
    assert summary["failed"] == 0
    return _rows(out, summary["run_id"])


@pytest.fixture(scope="module")
def torch_answers(prefect_server, photo_model, photo_folder, tmp_path_factory):
    """fp32 eager torch: the slow path (every fast path off) and the fast path (every one on)."""
    out = tmp_path_factory.mktemp("torch_runs")
    return {
        "slow": _run(photo_folder, photo_model, out / "slow", SLOW),
        "fast": _run(photo_folder, photo_model, out / "fast", FAST),
    }


def test_every_fast_path_on_and_off_give_the_same_answers(torch_answers):
    """Guaranteed by construction on any CPU: the slow path's answers are the photos (the head is
    built from its features, see the module doc), so the test is never vacuous, and a fast path
    passes only if it moves no top-1 score by more than 0.01 (measured: 0.005 for JPEG draft)."""
    slow, fast = _scores(torch_answers["slow"]), _scores(torch_answers["fast"])
    assert len(slow) == len(fast) == 6 * len(LONG_SIDES) + 2
    assert fast.keys() == slow.keys()
    # not vacuous: six distinct answers, one per photo, and no score saturated
    assert {path: idx for path, (idx, _) in slow.items()} == {path: photo_of(path) for path in slow}
    assert max(score for _, score in slow.values()) == pytest.approx(TOP_SCORE, abs=1e-3)
    for path, (idx, score) in slow.items():
        assert fast[path][0] == idx, path
        assert fast[path][1] == pytest.approx(score, abs=0.01), path


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fp32_backends_give_the_answers_of_torch_fp32(
    backend, torch_answers, photo_model, photo_folder, tmp_path, backend_cache
):
    """Every fp32 backend, through ``imgscore run`` with every fast path on, against eager torch
    fp32 with the same decode: the same top-1 and |Δscore| ≤ 1e-3 on every photo.

    By construction on any CPU: both compute the same function in fp32 (measured difference
    about 1e-5 in the probabilities), while every top-1 leads its runner-up by ≥ 0.1 logit
    (:func:`photo_model` asserts it), far more than fp32 rounding of another runtime moves. The
    part files and the manifest say which backend and precision scored."""
    pytest.importorskip(backend, reason=f"{backend} has no wheel for this platform")
    ref = torch_answers["fast"]
    got = _run(
        photo_folder,
        photo_model,
        tmp_path / backend,
        {**FAST, "inference.backend": backend, "inference.cache_dir": backend_cache},
    )
    assert got.keys() == ref.keys()
    for path, r in ref.items():
        assert got[path]["pred_index"] == r["pred_index"] == photo_of(path), path
        assert abs(got[path]["score"] - r["score"]) <= 1e-3, path
        assert_same_answers(r, got[path], atol=1e-3, what=path)
    part = next((tmp_path / backend / "predictions").rglob("*.parquet"))
    meta = json.loads(pq.read_schema(part).metadata[b"imgscore"])
    assert meta["inference"]["backend"] == backend and meta["inference"]["precision"] == "fp32"
    (manifest,) = (tmp_path / backend / "runs").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["inference"]["backend"] == backend and m["inference"]["canary"] is None
    assert m["inference"]["used"] == [{"backend": backend, "precision": "fp32"}]


def test_draft_decode_is_used_and_close_to_full_decode(photo_folder):
    """Pixels only: libjpeg-turbo's scaled decode and Pillow's integer resampling give the same
    bytes on every CPU (their SIMD and C paths are bit-exact), so these sizes and differences are
    the same everywhere (largest measured: 0.017 for chelsea_4000, bound 0.02)."""
    spec_full = PreprocessSpec(jpeg_draft=False)
    spec_draft = PreprocessSpec(jpeg_draft=True)
    opts = DecodeOptions(max_pixels=10**9)
    tf = build_transform(spec_full)
    big = decode_image(str(photo_folder / "astronaut_4000.jpg"), spec_draft, opts)
    assert big.size == (1000, 1000)  # 4000 px decoded at 1/4 scale: still >= 512, twice the resize target
    assert decode_image(str(photo_folder / "coffee_1600.jpg"), spec_draft, opts).size == (800, 534)  # 1/2
    assert decode_image(str(photo_folder / "astronaut.jpg"), spec_draft, opts).size == (512, 512)  # 512 < 4×256: full
    assert decode_image(str(photo_folder / "coffee.jpg"), spec_draft, opts).size == (600, 400)  # full
    for name in ("astronaut_4000.jpg", "rocket_1600.jpg", "chelsea_4000.jpg"):
        p = str(photo_folder / name)
        a = tf(decode_image(p, spec_full, opts))
        b = tf(decode_image(p, spec_draft, opts))
        # normalized units (÷ std ≈ 0.225): 0.02 is about one grey level on average
        assert (a - b).abs().mean() < 0.02, name


def test_tolerance_catches_a_wrong_decode(photo_model, photo_folder):
    """Negative control: the bug the "never below the target" rule prevents — drafting to 1/8 scale
    whatever the size, so a 1600 px photo decodes at 200x150 and is upscaled to 256 — must move
    some top-1 score by more than the 0.01 the fidelity test allows (measured: 0.053 with
    :func:`photo_model`, whose scores are unsaturated by construction)."""
    lm = load_model(
        ModelConfig(arch="resnet18", checkpoint=photo_model),
        PreprocessConfig(resize=256, crop=224),
        CPU,
        channels_last=False,
    )
    spec = PreprocessSpec(jpeg_draft=False)
    tf = build_transform(spec)
    paths = sorted(photo_folder.glob("*_1600.jpg"))
    good = torch.stack([tf(decode_image(str(p), spec, DecodeOptions(max_pixels=10**9))) for p in paths])
    bad = []
    for p in paths:
        img = Image.open(p)
        img.draft("RGB", (img.width // 8, img.height // 8))
        bad.append(tf(img.convert("RGB")))
    with torch.inference_mode():
        pg, pb = forward_probs(lm, good, "fp32"), forward_probs(lm, torch.stack(bad), "fp32")
    top = pg.argmax(1, keepdim=True)
    diff = (pg.gather(1, top) - pb.gather(1, top)).abs()
    assert diff.max() > 0.01


@pytest.fixture(scope="module")
def backend_cache(tmp_path_factory):
    """ONNX exports of :func:`photo_model`, shared by this module's tests."""
    return tmp_path_factory.mktemp("export_cache")


class _FastPath(Forward):
    """A reduced-precision fast path made to order: ``inner`` (an fp32 path) labelled as
    ``precision``, with ``shift`` of each image's top-1 probability moved to its runner-up —
    0 for a faithful path, 0.02 for one broken on purpose (twice the canary's 0.01 bound)."""

    def __init__(self, inner: Forward, precision: str, shift: float = 0.0):
        self.inner, self.precision, self.shift = inner, precision, shift
        self.backend, self.channels_last = inner.backend, inner.channels_last

    def __call__(self, x):
        p = self.inner(x).clone()
        top2 = p.topk(2, dim=1).indices
        rows = torch.arange(len(p))
        p[rows, top2[:, 0]] -= self.shift
        p[rows, top2[:, 1]] += self.shift
        return p


def _photo_batch(photo_folder):
    spec = PreprocessSpec(jpeg_draft=False)
    tf, opts = build_transform(spec), DecodeOptions(max_pixels=10**9)
    return torch.stack([tf(decode_image(str(p), spec, opts)) for p in sorted(photo_folder.iterdir())])


def test_canary_passes_a_faithful_fast_path_and_refuses_a_broken_one(photo_model, photo_folder, backend_cache):
    """By construction on any CPU: ONNX Runtime fp32 computes torch's function (probabilities
    within about 1e-5, every top-1 leading by ≥ 0.1 logit), so it agrees on 100 % with mean
    |Δscore| far below 0.01 and passes; a path that moves 0.02 of every top-1 score away has a
    mean |Δscore| of 0.02 (± rounding) whatever the CPU, and one that swaps classes agrees on
    none — both are refused."""
    lm = load_model(
        ModelConfig(arch="resnet18", checkpoint=photo_model), PreprocessConfig(resize=256, crop=224), CPU
    ).folded()
    reference = TorchForward(lm, "fp32")
    x = _photo_batch(photo_folder)
    batches = [x[:8], x[8:]]
    pytest.importorskip("onnxruntime", reason="onnxruntime has no wheel for this platform")
    faithful = make_forward(lm, "onnxruntime", "fp32", threads=2, cache_dir=backend_cache)
    ok = run_canary(reference, faithful, batches)
    assert ok.passed and ok.images == len(x) and ok.top1_agreement == 1.0 and ok.mean_abs_dscore < 1e-3
    broken = run_canary(reference, _FastPath(faithful, "bf16", shift=0.02), batches)
    assert not broken.passed and broken.mean_abs_dscore == pytest.approx(0.02, abs=1e-3)
    swapped = run_canary(reference, _FastPath(faithful, "bf16", shift=1.0), batches)
    assert not swapped.passed and swapped.top1_agreement == 0.0


def _manifest(out):
    (path,) = (out / "runs").glob("*/manifest.json")
    return json.loads(path.read_text())


def test_reduced_precision_is_gated_at_run_start(
    prefect_server, photo_model, photo_folder, tmp_path, monkeypatch, caplog
):
    """``inference.precision=bf16`` through ``imgscore run``, with the bf16 fast path replaced by
    one made to order (:class:`_FastPath`), so the outcome holds on any CPU, bf16 or not:

    - faithful: the canary passes (100 % agreement), the run scores, and the manifest and every
      part file record backend, precision and the canary's agreement;
    - broken on purpose: exit 2 before any part file or manifest is written;
    - broken, ``inference.on_canary_fail=fp32``: a WARNING, the run scores in fp32, and the
      manifest says the canary failed and what precision ran."""
    real = canary.make_forward  # what the run-start canary builds its fast path with
    shift = {"value": 0.0}

    def fake(lm, backend, precision="fp32", *args, **kwargs):
        if precision == "fp32":
            return real(lm, backend, precision, *args, **kwargs)
        return _FastPath(real(lm, backend, "fp32", *args, **kwargs), precision, shift["value"])

    monkeypatch.setattr(canary, "make_forward", fake)
    bf16 = {"inference.precision": "bf16", "inference.canary_images": 12, "inference.batch_size": 8}

    rows = _run(photo_folder, photo_model, tmp_path / "ok", bf16)
    m = _manifest(tmp_path / "ok")
    assert m["inference"]["precision"] == "bf16" and m["inference"]["canary"]["passed"]
    assert m["inference"]["canary"]["images"] == 12 and m["inference"]["canary"]["top1_agreement"] == 1.0
    assert m["inference"]["used"] == [{"backend": "torch", "precision": "bf16"}]
    meta = json.loads(pq.read_schema(next((tmp_path / "ok" / "predictions").rglob("*.parquet"))).metadata[b"imgscore"])
    assert meta["inference"]["precision"] == "bf16" and meta["inference"]["canary"]["top1_agreement"] == 1.0
    assert {r["pred_index"] for r in rows.values()} == set(range(len(NAMES)))

    shift["value"] = 0.02
    assert _run(photo_folder, photo_model, tmp_path / "refused", bf16, expect_code=2) is None
    assert not (tmp_path / "refused" / "predictions").exists() and not list(
        (tmp_path / "refused").glob("runs/*/manifest.json")
    )

    with caplog.at_level("WARNING", logger="imgscore"):
        rows = _run(photo_folder, photo_model, tmp_path / "fallback", {**bf16, "inference.on_canary_fail": "fp32"})
    assert any("failed the canary" in r.getMessage() and "scoring in fp32" in r.getMessage() for r in caplog.records)
    m = _manifest(tmp_path / "fallback")
    assert m["inference"]["precision"] == "fp32" and m["inference"]["precision_requested"] == "bf16"
    assert not m["inference"]["canary"]["passed"] and m["inference"]["used"] == [
        {"backend": "torch", "precision": "fp32"}
    ]
    assert {r["pred_index"] for r in rows.values()} == set(range(len(NAMES)))
