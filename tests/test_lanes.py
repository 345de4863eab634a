"""Lanes (``inference.num_workers: auto``'s split that runs the forward inside the DataLoader
processes, imgscore/inference/autotune.py): the same rows as the forward in the scoring process, failures
recorded per image inside a lane, and decode failures passed through untouched."""

from __future__ import annotations

import pytest
import torch

from imgscore.config.loading import build_config
from imgscore.images.dataset import Sample
from imgscore.images.scan import scan_images
from imgscore.inference import autotune as A
from imgscore.inference.backends.forward import Forward
from imgscore.inference.loader import LaneCollate, build_loader, loader_batches, loader_timeout
from imgscore.inference.rows import RowContext, score_batches
from imgscore.inference.scorer import load_scorer
from tests.conftest import assert_same_answers, base_overrides


def _rows(folder, ckpt, tmp_path, split: A.Split, backend: str = "torch"):
    extra = (
        {}
        if backend == "torch"
        else {"inference.backend": backend, "inference.cache_dir": str(tmp_path.parent / "cache")}
    )
    cfg = build_config({}, base_overrides(folder, ckpt, tmp_path / "out", **extra))
    scorer = load_scorer(cfg.model, cfg.preprocess_for(cfg.model), cfg.inference)
    entries = list(scan_images(folder).entries)
    loader, used = build_loader(entries, str(folder), scorer, cfg.input, split)
    lm = scorer.lm
    ctx = RowContext("run", str(folder), 0, 1, lm.model_id, list(lm.classes), "cpu", scorer.worker, 3, scorer.name)
    rows = score_batches(loader_batches(loader, 0), entries, scorer, ctx, max_batch=used.batch)
    rows.split = used  # as score_entries records it
    return rows, used, loader.num_workers


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_lanes_score_like_the_forward_in_this_process(backend, image_folder, tiny_checkpoint, tmp_path):
    """Two forked lanes against the inline forward on the same 12 photos plus one broken file:
    every image gets the same probabilities (to 1e-5), the broken file is one decode error row in
    both, and the commit facts say lanes ran — for eager torch and for an ONNX Runtime session
    built before the fork."""
    if backend != "torch":
        pytest.importorskip(backend, reason=f"{backend} has no wheel for this platform")
    (image_folder / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    inline, _, nw0 = _rows(image_folder, tiny_checkpoint, tmp_path / "a", A.Split(0, 1, 4, {}, None), backend)
    lanes, used, nw2 = _rows(
        image_folder, tiny_checkpoint, tmp_path / "b", A.Split(2, 1, 4, {}, None, lanes=True), backend
    )
    assert (nw0, nw2) == (0, 2) and used.lanes and lanes.facts()["lanes"] is True and "lanes" not in inline.facts()
    assert lanes.facts()["backend"] == inline.facts()["backend"] == backend
    a = {r["image_path"]: r for r in inline.predictions}
    b = {r["image_path"]: r for r in lanes.predictions}
    assert len(a) == 12 and a.keys() == b.keys()
    for k in a:  # same function, other thread count: near-ties within the tolerance may swap
        assert_same_answers(a[k], b[k], atol=1e-5, what=k)
    for rows in (inline, lanes):
        assert [(e["image_path"], e["stage"]) for e in rows.errors] == [("coffee/broken.jpg", "decode")]


class _PoisonForward(Forward):
    """Softmax of per-channel means; raises for any image whose first pixel is 9 (a stand-in
    for a model that fails on one input), NaN for a first pixel of 7."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (x[:, 0, 0, 0] == 9).any():
            raise RuntimeError("poisoned input")
        out = x.mean((2, 3)).softmax(1)
        out[x[:, 0, 0, 0] == 7] = float("nan")
        return out


def test_a_lane_isolates_failing_images_and_skips_unwanted_ones():
    """Inside the lane's collate: the forward that raises for one image and returns NaN for
    another is bisected, those two become (position, type, message) and the rest are scored;
    positions the model does not score (run.skip_scored) are not forwarded at all."""
    samples = [Sample(pos=10 + i, tensor=torch.full((3, 4, 4), float(i))) for i in range(8)]
    collate = LaneCollate(_PoisonForward(), max_batch=8, wanted=frozenset({10, 11, 12, 13, 15, 16, 17, 19}))
    b = collate(samples)
    positions, probs = b.scored
    assert b.tensor is None and positions == [10, 11, 12, 13, 15, 16] and probs.shape == (6, 3)
    assert torch.allclose(probs, torch.full((6, 3), 1 / 3))
    assert [(p, t) for p, t, _ in b.forward_failures] == [(17, "NonFiniteOutput")]
    c = LaneCollate(_PoisonForward(), max_batch=8)([*samples, Sample(pos=18, tensor=torch.full((3, 4, 4), 9.0))])
    assert c.scored[0] == list(range(10, 17)) and [(p, t) for p, t, _ in c.forward_failures] == [
        (17, "NonFiniteOutput"),
        (18, "RuntimeError"),
    ]
    # a one-model list of scorers: 1-tuples in, a 1-list of batches out
    assert LaneCollate(_PoisonForward(), 8, in_list=True)([(s,) for s in samples[:2]])[0].scored[0] == [10, 11]


def test_a_lanes_batch_may_take_its_forward_longer_than_a_decode_batch():
    """With lanes a DataLoader batch includes a one-thread forward: the per-batch timeout grows
    by four times that forward as measured; other splits keep inference.timeout_s."""
    costs = A.Costs(decode=0.01, fwd_1=0.5, fwd_share=0.3, share=2, images=8)
    assert loader_timeout(300.0, A.Split(2, 1, 32, {}, costs, lanes=True)) == pytest.approx(300.0 + 4 * 32 * 0.5)
    assert loader_timeout(300.0, A.Split(2, 1, 32, {}, costs)) == 300.0
