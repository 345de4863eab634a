"""Shared fixtures: real photos (scikit-image), small ImageFolder trees, tiny models, Prefect.

No network: images come from the photos shipped inside scikit-image's wheel, models are built
with random seeded weights (mobilenet_v3_small: 1.5 M parameters, fast on CPU).
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def doc_text(page: str) -> str:
    """The text of ``docs/<page>``: the docs site's pages hold the commands, queries and tables
    that tests execute or check (the README links to them)."""
    return (DOCS / page).read_text(encoding="utf-8")


def doc_section(page: str, heading: str) -> str:
    """The ``## heading`` section of ``docs/<page>``, up to the next ``## `` heading; raises
    ValueError when the page has no such heading (a test must not pass on an empty section)."""
    text = doc_text(page)
    marker = f"\n## {heading}\n"
    if marker not in text:
        raise ValueError(f"docs/{page} has no '## {heading}' section")
    return text.split(marker, 1)[1].split("\n## ", 1)[0]


PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "colorwheel",
    "cat",
)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real RGB photos from scikit-image, by name (PIL images, 300–1000 px)."""
    import skimage.data as data

    return {n: Image.fromarray(getattr(data, n)()).convert("RGB") for n in PHOTO_NAMES}


def make_variants(img: Image.Image, n: int, size: int = 96) -> list[Image.Image]:
    """``n`` distinct images from one photo: different crops, flips and sizes (RGB, about ``size`` px)."""
    out = []
    w, h = img.size
    for i in range(n):
        f = 0.6 + 0.4 * ((i * 37) % 10) / 10
        cw, ch = int(w * f), int(h * f)
        left, top = ((i * 53) % max(1, w - cw + 1)), ((i * 29) % max(1, h - ch + 1))
        v = img.crop((left, top, left + cw, top + ch)).resize((size + 8 * (i % 3), size), Image.Resampling.BILINEAR)
        if i % 2:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(v)
    return out


def make_image_folder(
    root: Path, photos: dict[str, Image.Image], per_class: int = 4, classes=("chelsea", "coffee", "rocket")
) -> Path:
    """ImageFolder tree ``root/<class>/<class>_<i>.jpg|png`` from real photos; returns root."""
    for cls in classes:
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(make_variants(photos[cls], per_class)):
            v.save(d / f"{cls}_{i}.{'png' if i % 2 else 'jpg'}", quality=92)
    return root


@pytest.fixture
def image_folder(tmp_path, photos) -> Path:
    """A 3-class ImageFolder of 12 real-photo images (JPEG and PNG)."""
    return make_image_folder(tmp_path / "images", photos)


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    """mobilenet_v3_small with 3 classes, seeded random weights, eval mode."""
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=3).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory) -> Path:
    """A plain state_dict of :func:`tiny_model` on disk."""
    p = tmp_path_factory.mktemp("ckpt") / "tiny_state_dict.pt"
    torch.save(tiny_model.state_dict(), p)
    return p


def save_as_if_cuda(obj, path: Path) -> None:
    """``torch.save`` with every storage tagged ``cuda:0``, as if saved on a GPU machine.

    Loading such a file without ``map_location`` on a CPU-only machine fails with "Attempting
    to deserialize object on a CUDA device" — the field case we must handle.
    """
    import torch.serialization as ser

    entry = (0, lambda storage: "cuda:0", lambda storage, location: None)
    ser._package_registry.insert(0, entry)
    try:
        torch.save(obj, path)
    finally:
        ser._package_registry.remove(entry)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (SQLite, temporary) for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def base_overrides(root: Path, ckpt: Path, out: Path, arch: str = "mobilenet_v3_small", **extra) -> list[str]:
    """``--set`` overrides for a small CPU run."""
    items = {
        "input.root": str(root),
        "model.arch": arch,
        "model.checkpoint": str(ckpt),
        "output.root": str(out),
        "inference.device": "cpu",
        "inference.batch_size": 4,
        "run.shard_size": 5,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def assert_same_answers(a: dict, b: dict, atol: float, what: str = "") -> None:
    """Two scorings of one image agree: every class probability within ``atol``, and the same
    top-1 wherever ``a``'s top-1 leads its runner-up by more than ``2 * atol``.

    ``a`` and ``b`` are prediction rows (``topk_indices`` list[int], ``topk_scores`` list[float],
    probabilities in [0, 1], best first). This holds *by construction* whenever the two paths
    compute the same function up to ``atol``: on another CPU (other SIMD width, other thread
    count, so another float summation order) two classes whose probabilities tie within the
    tolerance may swap places, and that is not a wrong answer. A class in one top-k but not the
    other must sit at the other's k-th score within ``atol`` (it fell off the end). Comparing
    ``pred_index`` with ``==`` instead fails on the first near-tie a machine happens to produce.
    """
    sa = dict(zip(a["topk_indices"], a["topk_scores"], strict=True))
    sb = dict(zip(b["topk_indices"], b["topk_scores"], strict=True))
    where = f"{what}: {a['topk_indices']} {a['topk_scores']} vs {b['topk_indices']} {b['topk_scores']}"
    for c in sa.keys() & sb.keys():
        assert abs(sa[c] - sb[c]) <= atol, where
    for x, y in ((sa, sb), (sb, sa)):
        for c in x.keys() - y.keys():
            assert x[c] <= min(y.values()) + atol, where
    top_a, top_b = a["topk_indices"][0], b["topk_indices"][0]
    if top_a != top_b:
        lead = a["topk_scores"][0] - (a["topk_scores"][1] if len(a["topk_scores"]) > 1 else 0.0)
        assert lead <= 2 * atol, f"top-1 differs with a lead of {lead:.2e} > 2*atol; {where}"


# ------------------------------------------------------------------ object storage (SeaweedFS)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3-compatible server (SeaweedFS, ``weed server -s3``) on free loopback ports for
    the whole session; stopped (SIGTERM, wait, kill) at the end. ``tests/s3_server.py``."""
    from tests.s3_server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


class S3Bucket:
    """A test's own prefix in the session's bucket: ``url(*parts)`` gives ``s3://bucket/TEST/parts``.
    (SeaweedFS gives each bucket volumes of its own, so tests share one bucket.)"""

    def __init__(self, server, bucket: str, prefix: str):
        self.server, self.bucket, self.prefix = server, bucket, prefix
        self.client = server.client()

    def key(self, *parts: str) -> str:
        return "/".join([self.prefix, *(p.strip("/") for p in parts if p)])

    def url(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"

    def put(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)

    def upload(self, local: Path, prefix: str) -> str:
        """Copy a local folder under ``prefix``; returns its URL."""
        from tests.s3_server import upload_folder

        upload_folder(self.client, local, self.bucket, self.key(prefix))
        return self.url(prefix)

    def keys(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` of this test, relative to the test's prefix."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key(prefix))
        return sorted(o["Key"][len(self.prefix) + 1 :] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_bucket_name(s3_server) -> str:
    """The session's one bucket on the S3 server."""
    s3_server.client().create_bucket(Bucket="imgscore-tests")
    return "imgscore-tests"


@pytest.fixture
def s3(s3_server, s3_bucket_name, monkeypatch, request) -> S3Bucket:
    """A fresh prefix on the session's SeaweedFS, with the standard ``AWS_*`` variables of this
    process (inherited by Dask workers, DataLoader workers and CLI subprocesses) pointing at it."""
    import hashlib

    from imgscore.io import object_store

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    object_store.configure(object_store.Settings())
    yield S3Bucket(s3_server, s3_bucket_name, "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16])
    object_store.configure(object_store.Settings())


@pytest.fixture(params=["local", "s3"])
def root_kind(request) -> str:
    """Which kind of ``output.root`` a failure-path test writes to: a local folder, or a prefix on
    the session's SeaweedFS bucket (what works on disk must work on a bucket when things fail)."""
    return request.param


@pytest.fixture
def out_root(root_kind, tmp_path, request):
    """``output.root`` of the kind :func:`root_kind` names, as the path type the code works
    with (``imgscore.io.storage.path``): ``tmp_path/out``, or ``s3://bucket/TEST/out`` with the
    ``AWS_*`` variables of this process pointing at the session's SeaweedFS (the :func:`s3` fixture)."""
    from imgscore.io import storage

    if root_kind == "local":
        return storage.path(tmp_path / "out")
    return storage.path(request.getfixturevalue("s3").url("out"))
