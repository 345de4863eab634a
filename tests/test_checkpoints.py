"""Checkpoints people actually have: PyTorch Lightning, any uniform key prefix, pre-0.4
state dicts, safetensors (by content), class names as class_to_idx/idx_to_class, replaced heads
with ``model.factory`` — each loads to the same function as the model it was saved from, or is
refused with the file described and the one fix that applies.

Every file is written in the test from a seeded model; "same function" is checked as logits
within float tolerance of the source model's on the same input, on the same CPU path, which
holds by construction (the same weights in the same architecture).
"""

import json
import sys
import textwrap
import warnings
from collections import OrderedDict

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from imgscore.config.scoring import ModelConfig, PreprocessConfig
from imgscore.errors import ModelError
from imgscore.inference.checkpoint import is_safetensors, read_checkpoint
from imgscore.inference.model import clear_model_cache, load_model

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_model_cache()
    yield
    clear_model_cache()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _load(path, **kw):
    return load_model(
        ModelConfig(arch=kw.pop("arch", "mobilenet_v3_small"), checkpoint=path, **kw),
        PreprocessConfig(),
        CPU,
        channels_last=False,
    )


def _same_function(lm, model: nn.Module, x) -> None:
    with torch.inference_mode():
        torch.testing.assert_close(lm.module(x), model.eval()(x), atol=1e-5, rtol=1e-4)


def _prefixed(sd, prefix):
    out = OrderedDict((prefix + k, v) for k, v in sd.items())
    return out


def lightning_checkpoint(state_dict, prefix="model.", hyper_parameters=None, extra=None) -> dict:
    """What ``Trainer.save_checkpoint`` writes for a LightningModule holding the network as
    ``self.model`` (keys from pytorch_lightning 2.x's _dump_checkpoint, plain types only)."""
    sd = _prefixed(state_dict, prefix)
    sd.update(extra or {})
    return {
        "epoch": 7,
        "global_step": 840,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 8, "completed": 7}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.31), "dirpath": "/ckpt"}
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0, 1]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters or {"lr": 0.01, "num_classes": 3},
    }


# ------------------------------------------------------------------------------------ Lightning and prefixes


def test_lightning_checkpoint_loads_with_its_class_names(tiny_model, x, tmp_path):
    p = tmp_path / "epoch=7-step=840.ckpt"
    torch.save(
        lightning_checkpoint(tiny_model.state_dict(), hyper_parameters={"lr": 0.01, "classes": ["cat", "dog", "fox"]}),
        p,
    )
    lm = _load(p)
    assert lm.source == "training_checkpoint" and lm.classes == ["cat", "dog", "fox"]
    _same_function(lm, tiny_model, x)


@pytest.mark.parametrize(
    "prefix", ["model.", "net.", "backbone.", "module.", "_orig_mod.", "model._orig_mod.", "net.module."]
)
def test_any_uniform_prefix_is_stripped_when_the_rest_fits(prefix, tiny_model, x, tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(_prefixed(tiny_model.state_dict(), prefix), p)
    _same_function(_load(p), tiny_model, x)
    assert read_checkpoint(p).state_dict is not None


def test_prefix_on_only_some_keys_is_refused_naming_the_group_that_fits(tiny_model, tmp_path):
    """A LightningModule holding a loss with a weight buffer beside the network: ``model.`` is on
    most keys, not all. Never stripped from some; the message says which keys fit and how to save them."""
    p = tmp_path / "with_loss.ckpt"
    torch.save(lightning_checkpoint(tiny_model.state_dict(), extra={"criterion.weight": torch.ones(3)}), p)
    with pytest.raises(ModelError) as info:
        _load(p)
    msg = str(info.value)
    assert (
        "PyTorch zip archive holding a dict with keys epoch, global_step, pytorch-lightning_version, state_dict" in msg
    )
    assert "under 'state_dict'" in msg
    assert "the keys under 'model.' alone fit mobilenet_v3_small" in msg and "criterion. (1)" in msg
    assert "k.removeprefix('model.')" in msg


# ------------------------------------------------------------------------------------ pre-0.4 state dicts


def _without_num_batches_tracked(sd, keep_metadata: bool):
    out = OrderedDict((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    if keep_metadata:
        out._metadata = sd._metadata
    return out


def test_state_dict_without_num_batches_tracked_loads_exactly_when_pytorch_accepts_it(x, tmp_path):
    """torch <= 0.3 state dicts carry no BatchNorm ``num_batches_tracked`` and no ``_metadata``;
    PyTorch's strict load accepts them (the module version is unknown). The same keys with
    ``_metadata`` saying version 2 are refused by PyTorch. We decide as PyTorch does, by
    construction: the load is PyTorch's own, and the answer is compared with a plain model's."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    decisions = {}
    for keep_metadata in (False, True):
        sd = _without_num_batches_tracked(model.state_dict(), keep_metadata)
        assert sum(k.endswith("num_batches_tracked") for k in model.state_dict()) == 20
        p = tmp_path / f"old_{keep_metadata}.pth"
        torch.save(sd, p)
        try:
            torchvision.models.resnet18(num_classes=4).load_state_dict(torch.load(p, weights_only=True), strict=True)
            pytorch_accepts = True
        except RuntimeError:
            pytorch_accepts = False
        try:
            lm = _load(p, arch="resnet18")
            ours = True
        except ModelError as exc:
            assert "20 missing keys (e.g. bn1.num_batches_tracked" in str(exc)
            ours = False
        decisions[keep_metadata] = (ours, pytorch_accepts)
        if ours:
            _same_function(lm, model, x)
            buffers = dict(lm.module.named_buffers())
            assert not any(
                t.is_meta for t in (*lm.module.parameters(), *buffers.values())
            )  # built on meta, nothing left there
            assert int(buffers["bn1.num_batches_tracked"]) == 0
    assert decisions == {False: (True, True), True: (False, False)}


# ------------------------------------------------------------------------------------ safetensors


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "weights.pt"])
def test_safetensors_by_content_with_class_names_from_metadata(name, tiny_model, x, tmp_path):
    p = tmp_path / name
    save_file(
        {k: v.contiguous() for k, v in tiny_model.state_dict().items()},
        str(p),
        metadata={"format": "pt", "classes": json.dumps(["a", "b", "c"])},
    )
    assert is_safetensors(p)
    lm = _load(p)
    assert lm.source == "safetensors" and lm.classes == ["a", "b", "c"]
    _same_function(lm, tiny_model, x)


def test_safetensors_reads_no_pickle(tiny_model, tmp_path, monkeypatch):
    """Read with safetensors alone: torch.load (the pickle path) is never called."""
    p = tmp_path / "w.safetensors"
    save_file(
        {f"module.{k}": v.contiguous() for k, v in tiny_model.state_dict().items()},
        str(p),
        metadata={"class_to_idx": json.dumps({"b": 1, "a": 0, "c": 2})},
    )

    def no_pickle(*a, **k):
        raise AssertionError("torch.load called for a safetensors file")

    monkeypatch.setattr(torch, "load", no_pickle)
    lm = _load(p)
    assert lm.classes == ["a", "b", "c"]


def test_safetensors_weights_do_not_follow_the_file(tiny_model, x, tmp_path):
    """A long-lived worker keeps its model when the file is overwritten in place (``cp new old``):
    the loaded tensors hold their own copy of the bytes, not a view of the file."""
    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(p))
    lm = _load(p)
    size = p.stat().st_size
    with open(p, "r+b") as f:  # same inode, every byte after the header zeroed
        f.seek(4096)
        f.write(bytes(size - 4096))
    _same_function(lm, tiny_model, x)


def test_truncated_safetensors_is_named_as_such(tiny_model, tmp_path):
    p = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"is a safetensors file that cannot be read .*copy it again"):
        _load(p)


# ------------------------------------------------------------------------------------ class names


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"class_to_idx": {"fox": 2, "cat": 0, "dog": 1}}, ["cat", "dog", "fox"]),
        ({"idx_to_class": {0: "cat", 1: "dog", 2: "fox"}}, ["cat", "dog", "fox"]),
        ({"idx_to_class": {"0": "cat", "1": "dog", "2": "fox"}}, ["cat", "dog", "fox"]),
        ({"classes": ["cat", "dog", "fox"], "class_to_idx": {"cat": 0, "dog": 1, "fox": 2}}, ["cat", "dog", "fox"]),
    ],
)
def test_class_names_from_class_to_idx_and_idx_to_class(extra, expected, tiny_model, tmp_path):
    p = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": tiny_model.state_dict(), "epoch": 3, **extra}, p)
    lm = _load(p)
    assert lm.classes == expected


@pytest.mark.parametrize(
    "extra, match",
    [
        (
            {"classes": ["a", "b", "c"], "class_to_idx": {"a": 0, "c": 1, "b": 2}},
            r"names its classes twice and the lists disagree",
        ),
        ({"class_to_idx": {"a": 0, "b": 2, "c": 5}}, r"does not number the classes 0..2"),
        ({"class_to_idx": {"a": 0, "b": 1}}, r"it names 2 classes but the model has 3 outputs"),
    ],
)
def test_unusable_class_names_are_refused_not_dropped(extra, match, tiny_model, tmp_path):
    p = tmp_path / "ckpt.pth"
    torch.save({"model": tiny_model.state_dict(), **extra}, p)
    with pytest.raises(ModelError, match=match):
        _load(p)


# ------------------------------------------------------------------------------------ replaced heads and model.factory

FACTORY_MODULE = """
import torchvision
from torch import nn


def resnet18_dropout():
    m = torchvision.models.resnet18()
    m.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 2))
    return m


def not_a_module():
    return 42


def broken():
    raise RuntimeError("needs a GPU")
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A user module ``heads_for_tests`` on sys.path, as PYTHONPATH=. would make it."""
    (tmp_path / "heads_for_tests.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "heads_for_tests"
    sys.modules.pop("heads_for_tests", None)


@pytest.fixture(scope="module")
def dropout_head_model() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18()
    m.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 2))
    return m.eval()


def test_replaced_head_is_named_and_points_at_factory(dropout_head_model, tmp_path):
    p = tmp_path / "finetuned.pth"
    torch.save(dropout_head_model.state_dict(), p)
    with pytest.raises(ModelError) as info:
        _load(p, arch="resnet18")
    msg = str(info.value)
    assert "holding a plain state_dict of 122 tensors" in msg
    assert (
        "classifier head (fc) is not resnet18's: resnet18 has fc.weight, fc.bias, the checkpoint has fc.1.weight, "
        "fc.1.bias" in msg
    )
    assert "model.factory" in msg and "TorchScript" in msg and "Check model.arch" not in msg


def test_factory_builds_the_module_and_the_checkpoint_loads_strictly(factory_module, dropout_head_model, x, tmp_path):
    p = tmp_path / "finetuned.pth"
    torch.save(
        {"state_dict": _prefixed(dropout_head_model.state_dict(), "model."), "class_to_idx": {"cat": 0, "dog": 1}}, p
    )
    lm = _load(p, factory=f"{factory_module}:resnet18_dropout")
    assert lm.arch == f"{factory_module}:resnet18_dropout" and lm.classes == ["cat", "dog"] and lm.num_classes == 2
    assert not lm.module.training
    _same_function(lm, dropout_head_model, x)


def test_factory_refusals_name_the_fix(factory_module, tiny_model, tmp_path):
    p = tmp_path / "sd.pth"
    torch.save(tiny_model.state_dict(), p)
    with pytest.raises(ModelError, match=r"cannot import 'no_such_pkg_xyz' .*importable on every machine"):
        _load(p, factory="no_such_pkg_xyz:build")
    with pytest.raises(ModelError, match=r"has no function 'resnet18_dropot'; did you mean resnet18_dropout"):
        _load(p, factory=f"{factory_module}:resnet18_dropot")
    with pytest.raises(ModelError, match=r"returned a int, not a torch.nn.Module"):
        _load(p, factory=f"{factory_module}:not_a_module")
    with pytest.raises(ModelError, match=r"raised RuntimeError: needs a GPU"):
        _load(p, factory=f"{factory_module}:broken")
    with pytest.raises(
        ModelError, match=r"do not fit the module model.factory .* returns.*Make model.factory build the architecture"
    ):
        _load(p, factory=f"{factory_module}:resnet18_dropout")  # mobilenet weights, resnet module


def test_factory_setting_is_checked(tmp_path):
    from imgscore.config.loading import build_config
    from imgscore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.factory 'heads.build' is not 'package.module:function'"):
        build_config({"model": {"factory": "heads.build"}})


# ------------------------------------------------------------------------------------ messages and other archs


def test_wrong_arch_in_the_family_is_named(tmp_path):
    torch.manual_seed(0)
    p = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), p)
    with pytest.raises(
        ModelError,
        match=r"weights do not fit resnet34: .*Its keys and shapes are torchvision's resnet18: set model.arch=resnet18",
    ):
        _load(p, arch="resnet34")


def test_builders_that_cannot_build_on_meta_still_load(x, tmp_path):
    """regnet computes its widths with tensors while building, which the meta device refuses."""
    torch.manual_seed(0)
    model = torchvision.models.regnet_x_400mf(num_classes=3).eval()
    p = tmp_path / "regnet.pth"
    torch.save(model.state_dict(), p)
    _same_function(_load(p, arch="regnet_x_400mf"), model, x)


def test_torchscript_loads_without_the_deprecation_warning(tiny_model, x, tmp_path):
    p = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(tiny_model, x[:1]), str(p))
    with warnings.catch_warnings(record=True) as direct:
        warnings.simplefilter("always")
        torch.jit.load(str(p))
    assert any("torch.jit.load` is deprecated" in str(w.message) for w in direct)  # what users saw
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        lm = _load(p)
    assert lm.source == "torchscript"
    assert not [str(w.message) for w in ours if "deprecated" in str(w.message)]


def test_a_refused_checkpoint_names_only_the_refused_types_and_an_empty_one_says_empty(tiny_model, tmp_path):
    """numpy scalars and argparse.Namespace are allowed (a checkpoint holding only them loads), so
    a refusal caused by a numpy array names the array's globals and not them; a zero-byte file
    is called empty, not an EOFError."""
    import argparse

    import numpy as np

    sd = tiny_model.state_dict()
    ok, bad = tmp_path / "ok.pt", tmp_path / "bad.pt"
    torch.save({"state_dict": sd, "np_scalar": np.float32(1.0), "args": argparse.Namespace(a=1)}, ok)
    torch.save(
        {"state_dict": sd, "best": np.array([0.5]), "np_scalar": np.float32(1.0), "args": argparse.Namespace(a=1)}, bad
    )
    assert read_checkpoint(ok).kind == "training_checkpoint"
    with pytest.raises(ModelError, match=r"holds pickled Python objects \(([^)]*)\)") as err:
        read_checkpoint(bad)
    listed = err.value.args[0].split("(", 1)[1].split(")", 1)[0]
    assert (
        "numpy.ndarray" in listed
        and "Namespace" not in listed
        and "scalar" not in listed
        and "numpy.dtype" not in listed
    )
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match=r"is empty \(0 bytes\)"):
        read_checkpoint(empty)


# ------------------------------------------------------------------------------------ torch.export programs (.pt2)


def _export(model: nn.Module, path, batch: int = 2, size: int = 64, dynamic=None):
    """``torch.export.save`` of ``model`` for ``batch`` × 3 × ``size`` × ``size`` inputs; ``dynamic``
    a ``torch.export.Dim`` for the batch (None: every dimension static, as exported)."""
    shapes = ({0: dynamic},) if dynamic is not None else None
    ep = torch.export.export(model.eval(), (torch.zeros(batch, 3, size, size),), dynamic_shapes=shapes)
    torch.export.save(ep, str(path))
    return path


@pytest.fixture(scope="module")
def pt2_files(tiny_model, tmp_path_factory) -> dict:
    """The tiny model exported for 64×64 inputs: ``dynamic`` (batch ``Dim``), ``batch1`` (a static
    batch of 1, what MLflow writes for a one-image input_example) and ``named_pt`` (``dynamic``
    under a ``.pt`` name)."""
    d = tmp_path_factory.mktemp("pt2")
    files = {
        "dynamic": _export(tiny_model, d / "model.pt2", dynamic=torch.export.Dim("batch")),
        "batch1": _export(tiny_model, d / "batch1.pt2", batch=1),
    }
    files["named_pt"] = d / "exported_model.pt"
    files["named_pt"].write_bytes(files["dynamic"].read_bytes())
    return files


def _load_at(path, crop: int = 64, channels_last: bool = True, **kw):
    return load_model(
        ModelConfig(arch="mobilenet_v3_small", checkpoint=path, **kw),
        PreprocessConfig(crop=crop, resize=crop),
        CPU,
        channels_last=channels_last,
    )


def _answers(lm, x) -> list[dict]:
    """Prediction rows (all classes, best first) of ``lm``'s folded module, as scoring makes them."""
    with torch.inference_mode():
        p = torch.softmax(lm.folded().module(x.contiguous(memory_format=torch.channels_last)).float(), dim=1)
    s, i = torch.sort(p, dim=1, descending=True)
    return [{"topk_indices": a.tolist(), "topk_scores": b.tolist()} for a, b in zip(i, s, strict=True)]


@pytest.mark.parametrize("form", ["dynamic", "batch1", "named_pt"])
def test_torch_export_program_gives_the_state_dicts_answers(form, pt2_files, tiny_checkpoint, tmp_path):
    """By construction: the same weights, the same ops, the program unfolded and the state_dict's
    module conv-BN folded (rounding apart, 1e-5). The static batch of 1 scores a batch of 5 (one
    image at a time); a .pt name is read by content; class names come from model.classes."""
    from tests.conftest import assert_same_answers

    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nfox\n")
    lm = _load_at(pt2_files[form], trust_checkpoint=True, classes=classes)
    assert lm.source == "torch_export" and lm.classes == ["cat", "dog", "fox"] and lm.info()["source"] == "torch_export"
    assert lm.folded().module is lm.module  # an exported graph has no Conv2d/BatchNorm2d modules to fold
    ref = _load_at(tiny_checkpoint)
    for k, (a, b) in enumerate(zip(_answers(ref, x), _answers(lm, x), strict=True)):
        assert_same_answers(a, b, atol=1e-5, what=f"{form} image {k}")


def test_a_bounded_batch_runs_in_chunks_it_accepts(tiny_model, tmp_path):
    """A batch Dim bounded to 2..3: a batch of 1 is padded to 2 (the copy's output dropped), one of
    7 runs as 3 + 3 + 1 (padded); each image's logits are the eager model's."""
    lm = _load_at(
        _export(tiny_model, tmp_path / "b.pt2", dynamic=torch.export.Dim("b", min=2, max=3)), trust_checkpoint=True
    )
    assert lm.module.input_text() == "float32 [2..3, 3, 64, 64]"
    xs = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    for batch in (xs[:1], xs):
        with torch.inference_mode():
            torch.testing.assert_close(lm.module(batch), tiny_model(batch), atol=1e-5, rtol=1e-4)


def test_torch_export_program_is_refused_unless_trusted_and_the_refusal_unpickles_nothing(pt2_files, tmp_path):
    """torch.export.load unpickles from the file: a pickle planted as the program's example inputs
    (``data/sample_inputs/model.pt``, read by ``deserialize_torch_artifact``, which retries a failed
    ``weights_only=True`` load with ``weights_only=False``) runs when torch loads the archive. That
    is why a .pt2 needs model.trust_checkpoint: without it, the file is refused before torch reads it."""
    import contextlib
    import io
    import zipfile

    marker = tmp_path / "unpickled"

    class OpensMarker:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = io.BytesIO()
    torch.save(OpensMarker(), payload)
    planted = tmp_path / "planted.pt2"
    with zipfile.ZipFile(pt2_files["dynamic"]) as src, zipfile.ZipFile(planted, "w") as out:
        for info in src.infolist():
            data = payload.getvalue() if info.filename.endswith("sample_inputs/model.pt") else src.read(info)
            out.writestr(info, data)
    with pytest.raises(ModelError) as info:
        _load_at(planted)
    msg = str(info.value)
    assert "is a torch.export archive (torch.export.save); torch.export.load can run code from the file" in msg
    assert "Set model.trust_checkpoint=true if you trust this file" in msg and "torch.save(model.state_dict()" in msg
    assert not marker.exists()
    # what the refusal prevents (torch 2.14): torch runs the planted pickle, then fails on what it returned
    with contextlib.suppress(Exception):
        torch.export.load(str(planted))
    assert marker.exists()


def test_content_detection_tells_the_zip_archives_apart(tiny_model, pt2_files, tiny_checkpoint, x, tmp_path):
    """pt2, TorchScript and torch.save zips are all zips: each is recognised as itself only."""
    from imgscore.inference.checkpoint import is_torchscript
    from imgscore.inference.exported import is_torch_export

    ts = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(tiny_model, x[:1]), str(ts))
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(st))
    text = tmp_path / "notes.pt"
    text.write_text("archive_format pt2")
    found = {
        name: (is_torch_export(p), is_torchscript(p), is_safetensors(p))
        for name, p in {
            "pt2": pt2_files["dynamic"],
            "pt2_named_pt": pt2_files["named_pt"],
            "torchscript": ts,
            "torch_save": tiny_checkpoint,
            "safetensors": st,
            "text": text,
        }.items()
    }
    assert found == {
        "pt2": (True, False, False),
        "pt2_named_pt": (True, False, False),
        "torchscript": (False, True, False),
        "torch_save": (False, False, False),
        "safetensors": (False, False, True),
        "text": (False, False, False),
    }
    assert read_checkpoint(ts).kind == "torchscript" and read_checkpoint(tiny_checkpoint).kind == "state_dict"
    assert read_checkpoint(pt2_files["named_pt"], trust=True).kind == "torch_export"


def test_torch_export_program_exported_at_another_size_or_in_training_mode_is_refused(tiny_model, pt2_files, tmp_path):
    with pytest.raises(ModelError) as info:
        _load_at(pt2_files["batch1"], crop=224, trust_checkpoint=True)
    msg = str(info.value)
    assert "(a torch.export archive of a program taking float32 [1, 3, 64, 64])" in msg
    assert "it was exported for 64x64 images but the preprocessing crops 224x224" in msg
    assert "Set preprocess.crop=64 and preprocess.resize=73" in msg and "torch.zeros(2, 3, 224, 224)" in msg
    torch.manual_seed(0)
    trained = torchvision.models.mobilenet_v3_small(num_classes=3).train()
    p = tmp_path / "train_mode.pt2"
    torch.export.save(torch.export.export(trained, (torch.zeros(2, 3, 64, 64),)), str(p))
    with pytest.raises(
        ModelError, match=r"exported from a model in training mode \(aten.batch_norm.default.*model.eval\(\)"
    ):
        _load_at(p, trust_checkpoint=True)


def test_torch_export_program_has_no_embeddings_and_a_static_batch_no_onnx_export(pt2_files, tmp_path):
    """Its submodules are empty containers (no hook would run), and re-exporting a static batch to
    ONNX would fix that batch into the graph: both refused with the fix, never a wrong output."""
    from imgscore.errors import ConfigError
    from imgscore.inference.backends.export import export_onnx
    from imgscore.inference.embeddings import choose_layer

    lm = _load_at(pt2_files["batch1"], trust_checkpoint=True)
    with pytest.raises(ConfigError, match=r"a torch.export program has no hookable layers"):
        choose_layer(lm.module, None, 3)
    with pytest.raises(ConfigError, match=r"takes float32 \[1, 3, 64, 64\]; use inference.backend=torch"):
        export_onnx(lm, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
