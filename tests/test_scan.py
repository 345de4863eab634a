"""Scan parity with torchvision's ImageFolder, plus the junk ImageFolder gets wrong."""

import os

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from imgscore.errors import ConfigError, InputError
from imgscore.images.scan import has_images, scan_images


def _img(path, color=(200, 10, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, format=fmt)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    for cls, names in {
        "cat": ["b.jpg", "a.PNG", "nested/c.jpeg"],
        "dog": ["x.JPG", "y.bmp"],
        "zebra": ["z.webp"],
    }.items():
        for n in names:
            fmt = {"jpg": "JPEG", "png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "webp": "WEBP"}[
                n.rsplit(".", 1)[1].lower()
            ]
            _img(root / cls / n, fmt=fmt)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_parity(tree):
    ours = scan_images(tree)
    ref = ImageFolder(str(tree))
    assert ours.layout == "imagefolder"
    assert ours.class_to_idx == ref.class_to_idx
    assert [(os.path.join(str(tree), e.rel), e.label) for e in ours.entries] == ref.samples
    assert [e.label_name for e in ours.entries] == [ref.classes[t] for _, t in ref.samples]
    assert all(e.size > 0 and e.mtime_ns > 0 for e in ours.entries)


def test_hidden_folders_and_junk_are_never_classes_or_images(tree):
    _img(tree / ".ipynb_checkpoints" / "cat-checkpoint.jpg", fmt="JPEG")
    _img(tree / "cat" / "._b.jpg", fmt="JPEG")
    (tree / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tree / "__MACOSX").mkdir()
    idx = scan_images(tree)
    assert idx.classes == ["cat", "dog", "zebra"]
    paths = [e.image_path for e in idx.entries]
    assert not any("checkpoint" in p or "._" in p or "DS_Store" in p for p in paths)
    # torchvision would have made a class of the hidden folder and shifted every label
    assert ImageFolder(str(tree), allow_empty=True).classes[0] == ".ipynb_checkpoints"


def test_flat_folder_has_null_labels(tmp_path):
    for n in ["b.jpg", "a.png", "sub/c.jpg"]:
        _img(tmp_path / n, fmt="PNG" if n.endswith("png") else "JPEG")
    idx = scan_images(tmp_path)
    assert idx.layout == "flat" and idx.classes == []
    assert [e.image_path for e in idx.entries] == ["a.png", "b.jpg", "sub/c.jpg"]
    assert all(e.label is None and e.label_name is None for e in idx.entries)


def test_order_is_deterministic(tree):
    assert [e.rel for e in scan_images(tree).entries] == [e.rel for e in scan_images(tree).entries]


def test_missing_root_and_empty_root(tmp_path):
    with pytest.raises(InputError, match=r"input.root '.*nope' does not exist"):
        scan_images(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(InputError, match="holds no image files"):
        scan_images(tmp_path / "empty")


def test_symlinks_never_move_images_into_another_class(tmp_path):
    root = tmp_path / "lbl"
    _img(root / "aa" / "a.jpg", fmt="JPEG")
    _img(root / "zz" / "z.jpg", fmt="JPEG")
    (root / "aa" / "up").symlink_to(root)  # a link back to input.root from inside a class
    (root / "bb").symlink_to(root / "aa")  # a class folder that is a link to another class
    outside = tmp_path / "outside"
    _img(outside / "o.png", fmt="PNG")
    (outside / "loop").symlink_to(outside)  # a cycle outside the root
    (root / "zz" / "ext").symlink_to(outside)  # followed: outside input.root
    idx = scan_images(root)
    got = {(e.image_path, e.label_name) for e in idx.entries}
    assert got == {("aa/a.jpg", "aa"), ("bb/a.jpg", "bb"), ("zz/z.jpg", "zz"), ("zz/ext/o.png", "zz")}
    reasons = {s["image_path"]: s["reason"] for s in idx.skipped}
    assert reasons["aa/up"].startswith("symlink to a folder inside input.root")
    assert reasons["zz/ext/loop"].startswith("symlink cycle")
    assert idx.classes == ["aa", "bb", "zz"]


def _deep_tree(root, depth: int):
    """``root/cls/a/a/…/deep.png`` ``depth`` folders below the class, plus a shallow image; the
    path stays under PATH_MAX (2 characters a level)."""
    deep = os.path.join(str(root), "cls")
    for made in range(0, depth, 100):  # os.makedirs recurses once per missing level: 100 at a time
        deep = os.path.join(deep, *(["a"] * min(100, depth - made)))
        os.makedirs(deep)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(os.path.join(deep, "deep.png"))
    Image.new("RGB", (8, 8), (10, 200, 10)).save(root / "cls" / "top.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(root / "other.png")  # flat layout: a file in the root
    return "/".join(["a"] * depth) + "/deep.png"


def _remove_deep_tree(top: str) -> None:
    """Delete a tree without recursion: ``shutil.rmtree`` and ``os.walk`` (and pytest's clean-up of
    old temporary folders) overflow the stack on it."""
    stack = [top]
    while stack:
        subfolders = []
        with os.scandir(stack[-1]) as it:
            for e in it:
                (subfolders.append if e.is_dir(follow_symlinks=False) else os.unlink)(e.path)
        if subfolders:
            stack.extend(subfolders)
        else:
            os.rmdir(stack.pop())


def test_a_tree_deeper_than_the_recursion_limit_is_scanned_whole(tmp_path, request):
    import sys

    depth = 1400
    assert depth > sys.getrecursionlimit() // 2  # deep enough that a recursive walk (two frames a level) overflows
    rel = _deep_tree(tmp_path, depth)
    request.addfinalizer(lambda: _remove_deep_tree(str(tmp_path / "cls")))
    assert len(os.path.join(str(tmp_path), "cls", rel)) < os.pathconf(str(tmp_path), "PC_PATH_MAX")
    idx = scan_images(tmp_path, layout="flat")
    assert [e.image_path for e in idx.entries] == [
        "other.png",
        "cls/top.png",
        f"cls/{rel}",
    ]  # torchvision's order: files, then folders
    assert idx.entries[2].size == os.path.getsize(os.path.join(str(tmp_path), "cls", rel)) and not idx.skipped
    (tmp_path / "other.png").unlink()
    (tmp_path / "cls" / "top.png").unlink()
    assert has_images(tmp_path)  # the run's preflight walks the same way, to the deep image
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "cls" / "top.png")
    idx = scan_images(tmp_path)  # imagefolder: the deep image is in class cls
    assert [(e.image_path, e.label_name) for e in idx.entries] == [("cls/top.png", "cls"), (f"cls/{rel}", "cls")]


def test_output_root_inside_input_root_is_left_out_of_the_scan(tmp_path):
    from imgscore.images.scan import check_roots_apart, open_scan, output_within_input

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / cls / f"{cls}.png")
    out = tmp_path / "Scores"  # sorts before every class: as a class it would shift every label
    (out / "runs" / "r1").mkdir(parents=True)
    (out / "runs" / "r1" / "manifest.json").write_text("{}")
    Image.new("RGB", (8, 8)).save(out / "runs" / "r1" / "thumb.png")  # even an image there is not the input's
    scan = open_scan(tmp_path, exclude=out)
    entries = [b for b in scan.batches()]
    assert scan.layout == "imagefolder" and scan.classes == ["cat", "dog"]
    assert [r for b in entries for r in b.column("image_path").to_pylist()] == [
        "cat/cat.png",
        "dog/dog.png",
    ] and scan.skipped == []
    assert open_scan(tmp_path).classes == ["Scores", "cat", "dog"]  # what the run used to see

    deep_out = tmp_path / "dog" / "scores"  # inside a class folder, flat layout too
    (deep_out / "predictions").mkdir(parents=True)
    (deep_out / "predictions" / "part-00000.parquet").write_bytes(b"PAR1")
    flat = open_scan(tmp_path, layout="flat", exclude=deep_out)
    rows = [r for b in flat.batches() for r in b.column("image_path").to_pylist()]
    assert "dog/dog.png" in rows and not any("scores" in r for r in rows)
    assert not any("scores" in s["image_path"] for s in flat.skipped)

    assert (
        output_within_input(tmp_path, deep_out) == "dog/scores" and output_within_input(tmp_path / "cat", out) is None
    )
    assert (
        output_within_input("s3://b/data", "S3://b/data/Scores/") == "Scores"
        and output_within_input("s3://b/data", "s3://b/database") is None
    )
    assert output_within_input("s3://b/data", tmp_path) is None
    with pytest.raises(ConfigError, match=r"output.root '.*' is input.root: .*set output.root to a folder outside"):
        check_roots_apart(tmp_path, str(tmp_path) + "/")
    with pytest.raises(ConfigError, match="is input.root"):
        check_roots_apart("s3://b/data", "s3://b/data/")


def test_an_object_store_output_prefix_inside_the_input_prefix_is_left_out(monkeypatch):
    """The same rule on a bucket, compared as normalized URLs (the storage layer's listing faked)."""
    from imgscore.images.scan import open_scan
    from imgscore.io import objects, storage

    keys = [
        "cat/c1.png",
        "dog/d1.png",
        "dog/scores/predictions/part-00000.parquet",
        "Scores/runs/r1/manifest.json",
        "Scores/predictions/run_date=2026-03-01/r1/part-00000.parquet",
    ]

    def list_objects(url, recursive=True):
        rel = storage.normalize_root(url).removeprefix("s3://b/data").strip("/")
        under = [k[len(rel) + 1 :] if rel else k for k in keys if not rel or k.startswith(rel + "/")]
        if recursive:
            return [objects.ObjectInfo(k, 1, 0, "e") for k in sorted(under)], []
        return (
            [objects.ObjectInfo(k, 1, 0, "e") for k in under if "/" not in k],
            sorted({k.split("/")[0] for k in under if "/" in k}),
        )

    monkeypatch.setattr(objects, "list_objects", list_objects)
    scan = open_scan("s3://b/data", exclude="S3://b/data/Scores/")
    rows = [r for b in scan.batches() for r in b.column("image_path").to_pylist()]
    assert scan.classes == ["cat", "dog"] and rows == ["cat/c1.png", "dog/d1.png"]
    assert [s["image_path"] for s in scan.skipped] == [
        "dog/scores/predictions/part-00000.parquet"
    ]  # another folder's: listed
    deep = open_scan("s3://b/data", exclude="s3://b/data/dog/scores")
    deep_rows = [r for b in deep.batches() for r in b.column("image_path").to_pylist()]
    assert deep.classes == ["Scores", "cat", "dog"] and deep_rows == ["cat/c1.png", "dog/d1.png"]
    assert (
        not any(s["image_path"].startswith("dog/scores/") for s in deep.skipped) and len(deep.skipped) == 2
    )  # Scores/: not this run's
