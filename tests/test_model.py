"""Every checkpoint form a team actually has loads to the same function, or is refused clearly."""

import argparse
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision

from imgscore.config.scoring import ModelConfig, PreprocessConfig
from imgscore.errors import ModelError
from imgscore.inference.model import fold_conv_bn, load_model
from imgscore.inference.state_dict import strip_prefix
from tests.conftest import save_as_if_cuda

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def ref_logits(tiny_model, x):
    with torch.inference_mode():
        return tiny_model(x)


def _load(path, **kw):
    return load_model(
        ModelConfig(arch=kw.pop("arch", "mobilenet_v3_small"), checkpoint=path, **kw), PreprocessConfig(), CPU
    )


def _logits(lm, x):
    with torch.inference_mode():
        return lm.module(x.contiguous(memory_format=torch.channels_last))


def _prefixed(sd, prefix):
    return OrderedDict((prefix + k, v) for k, v in sd.items())


def _training_ckpt(sd, key):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    return {
        "epoch": 90,
        key: sd,
        "optimizer": opt.state_dict(),
        "args": argparse.Namespace(arch="mobilenet_v3_small", lr=0.1, epochs=90),
        "best_acc1": np.float64(0.913),
        "step": np.int64(1234),
    }


FORMS = {
    "state_dict": lambda sd: sd,
    "dataparallel": lambda sd: _prefixed(sd, "module."),
    "compiled": lambda sd: _prefixed(sd, "_orig_mod."),
    "compiled_dataparallel": lambda sd: _prefixed(sd, "_orig_mod.module."),
    "ckpt_model": lambda sd: _training_ckpt(sd, "model"),
    "ckpt_state_dict": lambda sd: _training_ckpt(_prefixed(sd, "module."), "state_dict"),
    "ckpt_model_state_dict": lambda sd: _training_ckpt(sd, "model_state_dict"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_checkpoint_forms_give_the_same_logits(form, tiny_model, x, ref_logits, tmp_path):
    p = tmp_path / f"{form}.pt"
    torch.save(FORMS[form](tiny_model.state_dict()), p)
    lm = _load(p)
    assert lm.num_classes == 3 and lm.classes == ["0", "1", "2"]
    assert lm.source == ("training_checkpoint" if form.startswith("ckpt") else "state_dict")
    assert len(lm.model_id) == 64
    torch.testing.assert_close(_logits(lm, x), ref_logits, atol=1e-5, rtol=1e-4)


def test_torchscript_archive(tiny_model, x, ref_logits, tmp_path):
    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(tiny_model, x[:1]), p)
    lm = _load(p)
    assert lm.source == "torchscript" and lm.num_classes == 3
    with torch.inference_mode():
        torch.testing.assert_close(lm.module(x), ref_logits, atol=1e-5, rtol=1e-4)


def test_checkpoint_saved_on_cuda_loads_on_cpu(tiny_model, x, ref_logits, tmp_path):
    p = tmp_path / "gpu_saved.pt"
    save_as_if_cuda(_training_ckpt(_prefixed(tiny_model.state_dict(), "module."), "model"), p)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA device"):
            torch.load(p, weights_only=False)  # what a naive loader hits
    lm = _load(p)
    torch.testing.assert_close(_logits(lm, x), ref_logits, atol=1e-5, rtol=1e-4)


def test_pickled_module_refused_unless_trusted(tiny_model, x, ref_logits, tmp_path):
    p = tmp_path / "whole_module.pt"
    torch.save(tiny_model, p)
    with pytest.raises(
        ModelError, match=r"pickled Python objects \(torchvision\.models\.mobilenetv3\.\w+.*model.trust_checkpoint=true"
    ):
        _load(p)
    lm = _load(p, trust_checkpoint=True)
    assert lm.source == "pickled_module"
    torch.testing.assert_close(_logits(lm, x), ref_logits, atol=1e-5, rtol=1e-4)


def test_head_size_inferred_and_mismatch_named(tiny_model, tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(tiny_model.state_dict(), p)
    with pytest.raises(ModelError, match=r"model.num_classes=10 but the checkpoint's head has 3 classes"):
        _load(p, num_classes=10)
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    with pytest.raises(ModelError, match=r"model.classes has 2 names but the model has 3 outputs"):
        _load(p, classes=classes)
    classes.write_text("cat\ndog\nrocket\n")
    assert _load(p, classes=classes).classes == ["cat", "dog", "rocket"]


def test_checkpoint_classes_are_used(tiny_model, tmp_path):
    p = tmp_path / "with_classes.pt"
    torch.save({"model": tiny_model.state_dict(), "classes": ["a", "b", "c"]}, p)
    assert _load(p).classes == ["a", "b", "c"]


def test_wrong_arch_lists_missing_and_unexpected_keys(tiny_model, tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(tiny_model.state_dict(), p)
    with pytest.raises(ModelError, match=r"missing keys \(e.g\. .*unexpected keys"):
        _load(p, arch="resnet18")


def test_partial_state_dict_is_refused(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    sd.pop(next(iter(sd)))
    p = tmp_path / "partial.pt"
    torch.save(sd, p)
    with pytest.raises(ModelError, match=r"1 missing keys.*random weights"):
        _load(p)


def test_unknown_arch_suggests_close_names(tmp_path):
    with pytest.raises(ModelError, match=r"unknown model.arch 'resnet5'; did you mean resnet50"):
        _load(tmp_path / "x.pt", arch="resnet5")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelError, match=r"model.checkpoint '.*nope.pt' does not exist"):
        _load(tmp_path / "nope.pt")


def test_strip_prefix_only_when_every_key_has_it_and_it_fits():
    sd = {"module.a": 1, "b": 2}
    assert strip_prefix(sd, {"a", "b"}) == (sd, "")  # not every key has it: never stripped from some
    assert strip_prefix({"_orig_mod.module.a": 1, "_orig_mod.module.b": 2}, {"a", "b"}) == (
        {"a": 1, "b": 2},
        "_orig_mod.module.",
    )
    assert strip_prefix({"model.net.a": 1, "model.net.b": 2}, {"net.a", "net.b"}) == (
        {"net.a": 1, "net.b": 2},
        "model.",
    )
    assert strip_prefix({"x.a": 1}, {"y"}) == ({"x.a": 1}, "")  # nothing fits: left as it is for the refusal


def test_torchvision_weights_from_local_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = ModelConfig(arch="mobilenet_v3_small", weights="IMAGENET1K_V1")
    with pytest.raises(
        ModelError, match=r"not in the local torch hub cache: expected mobilenet_v3_small-\w+\.pth in .*checkpoints"
    ):
        load_model(cfg, PreprocessConfig(), CPU)
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), folder / weights.url.rsplit("/", 1)[1])
    lm = load_model(cfg, PreprocessConfig(), CPU)
    assert lm.num_classes == 1000 and lm.classes[0] == "tench"
    assert (lm.preprocess.resize, lm.preprocess.crop) == (256, 224)
    assert lm.source == "torchvision_weights"
    assert load_model(cfg, PreprocessConfig(), CPU) is lm  # cached: loaded once per process


@pytest.mark.parametrize(
    "content", [b"not a checkpoint\n", b"hello world this is not", bytes(range(256)) * 4, b"PK\x03\x04" + bytes(100)]
)
def test_non_pytorch_file_is_not_called_pickled(tmp_path, content):
    p = tmp_path / "garbage.pt"
    p.write_bytes(content)
    for trust in (False, True):
        with pytest.raises(ModelError, match=r"is not a readable PyTorch file") as info:
            _load(p, trust_checkpoint=trust)
        assert "trust_checkpoint=true if you trust" not in str(info.value)


def test_checkpoint_that_is_a_folder(tmp_path):
    with pytest.raises(ModelError, match=r"model.checkpoint '.*' is a folder, not a file"):
        _load(tmp_path)


def test_half_precision_state_dict_loads_as_float32_like_a_copy_into_an_initialised_model(tmp_path, tiny_model):
    """Models are built on the meta device and take the checkpoint's tensors (assign=True). A
    checkpoint saved in fp16 must still give fp32 parameters — what load_state_dict's copy into
    an ordinary model gives — not fp16 ones (slow or unsupported on CPU), and the same logits."""
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny_model.state_dict().items()}
    path = tmp_path / "half.pt"
    torch.save(half, path)
    lm = load_model(
        ModelConfig(arch="mobilenet_v3_small", checkpoint=path),
        PreprocessConfig(),
        torch.device("cpu"),
        channels_last=False,
    )
    assert {p.dtype for p in lm.module.parameters()} == {torch.float32}
    assert not any(t.is_meta for t in (*lm.module.parameters(), *lm.module.buffers()))
    ref = torchvision.models.mobilenet_v3_small(num_classes=3)
    ref.load_state_dict(half)  # the copy path: casts fp16 into the fp32 parameters
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(lm.module(x), ref.eval()(x))


def test_a_class_name_given_twice_is_refused_with_where_it_came_from(tiny_model, tmp_path):
    """Two outputs with one label: the report would count them as one class and contradict itself."""
    p = tmp_path / "dup.pt"
    torch.save({"model": tiny_model.state_dict(), "classes": ["cat", "dog", "cat"]}, p)
    with pytest.raises(
        ModelError, match=r"dup.pt' \(.*\): its class list names 'cat' twice \(outputs 0 and 2\)\. Set model.classes"
    ):
        _load(p)
    torch.save({"model": tiny_model.state_dict(), "idx_to_class": {0: "a", 1: "b", 2: "b"}}, p)
    with pytest.raises(ModelError, match=r"names 'b' twice \(outputs 1 and 2\)"):
        _load(p)
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\n\ndog\ndog \n")
    with pytest.raises(ModelError, match=r"model.classes file '.*classes.txt' names 'dog' twice \(lines 3 and 4\)"):
        _load(p, classes=classes)
    with pytest.raises(ModelError, match=r"model.classes names 'x' twice \(items 0 and 1 of the list\)"):
        _load(p, classes=["x", "x", "y"])
    assert _load(p, classes=["x", "y", "z"]).classes == ["x", "y", "z"]  # the fix the message names works


# ------------------------------------------------------------------------------------ models wrong as a whole


def test_nan_weights_are_refused_at_load_naming_the_tensors(tiny_model, tmp_path):
    """A checkpoint saved after training diverged: every image would be a NonFiniteOutput row."""
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["classifier.3.weight"][0, :10] = float("nan")
    sd["features.0.1.running_var"][0] = float("inf")
    p = tmp_path / "diverged.pt"
    torch.save(sd, p)
    with pytest.raises(ModelError) as info:
        _load(p)
    msg = str(info.value)
    assert f"model mobilenet_v3_small (model.checkpoint '{p}') has non-finite weights: 2 of its" in msg
    assert "classifier.3.weight: 10 NaN of 3072" in msg and "features.0.1.running_var: 1 Inf of 16" in msg
    assert "checkpoint saved before training diverged" in msg


def test_finite_weights_whose_forward_overflows_on_every_input_are_refused(tiny_model, tmp_path):
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["features.0.1.weight"].fill_(
        3e38
    )  # finite (float32 max 3.4e38): the first activations overflow to Inf, then NaN
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    p = tmp_path / "overflow.pt"
    torch.save(sd, p)
    with pytest.raises(
        ModelError,
        match=r"model mobilenet_v3_small .* gives non-finite outputs for every input: its logits hold "
        r"[^;]*NaN[^;]* for all 2 probe images.*Its weights are finite",
    ):
        _load(p)


def test_a_model_finite_on_the_probe_is_accepted(tiny_model, tmp_path):
    p = tmp_path / "ok.pt"
    torch.save(tiny_model.state_dict(), p)
    assert _load(p).num_classes == 3


def test_dynamically_quantized_state_dict_is_named_as_such(tiny_model, tmp_path):
    """quantize_dynamic, then torch.save(qmodel.state_dict()): the advice must not be to do exactly that."""
    from torch import nn

    q = torch.ao.quantization.quantize_dynamic(tiny_model, {nn.Linear}, dtype=torch.qint8)
    p = tmp_path / "int8.pt"
    torch.save(q.state_dict(), p)
    with pytest.raises(ModelError) as info:
        _load(p)
    msg = str(info.value)
    assert (
        "is a quantized state_dict (packed int8 Linear params, as torch.ao.quantization.quantize_dynamic writes them"
        in msg
    )
    assert "2 quantized layer(s), e.g. classifier.0, classifier.3" in msg
    assert "save the float model's state_dict before quantizing" in msg and "no weights under any of" not in msg
    torch.save({"epoch": 3, "state_dict": q.state_dict()}, p)  # inside a training checkpoint too
    with pytest.raises(ModelError, match=r"is a quantized state_dict under 'state_dict' \(packed int8"):
        _load(p)


def test_checkpoint_that_is_a_fifo_is_named_without_blocking(tmp_path):
    """`model.checkpoint=<(cat model.pt)` or a named pipe: not 'does not exist', and never opened
    (a FIFO opened for reading blocks until a writer comes; here none ever does)."""
    import os

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(
        ModelError,
        match=r"model.checkpoint '.*model.pt' is not a regular file: it is a FIFO \(named pipe\), .*"
        r"copy it to a file first \(e.g. cat PATH > model.pt\)",
    ):
        _load(fifo)
    r, w = os.pipe()
    try:
        with pytest.raises(
            ModelError,
            match=rf"'/dev/fd/{r}' is not a regular file: it is a FIFO \(named pipe\) \(a process "
            r"substitution or an inherited file descriptor: .*pipe:",
        ):
            _load(f"/dev/fd/{r}")
    finally:
        os.close(r)
        os.close(w)


def test_class_names_are_compared_in_nfc_and_a_byte_order_mark_is_not_a_name(tiny_model, tmp_path):
    """'café' typed with a combining accent is the same class as with a precomposed one."""
    nfc_cafe, nfd_cafe = "caf\u00e9", "cafe\u0301"
    p = tmp_path / "m.pt"
    torch.save({"model": tiny_model.state_dict(), "classes": [nfc_cafe, "tea", nfd_cafe]}, p)
    with pytest.raises(ModelError, match=r"its class list names 'café' twice \(outputs 0 and 2\)"):
        _load(p)
    with pytest.raises(ModelError, match=r"model.classes names 'café' twice \(items 0 and 2 of the list\)"):
        _load(p, classes=[nfc_cafe, "tea", nfd_cafe])
    classes = tmp_path / "classes.txt"
    classes.write_bytes(f"{nfd_cafe}\ntea\n{nfc_cafe}\n".encode())
    with pytest.raises(ModelError, match=r"names 'café' twice \(lines 1 and 3\)"):
        _load(p, classes=classes)
    classes.write_bytes("\ufeffcat\ndog\ncat\n".encode())
    with pytest.raises(ModelError, match=r"names 'cat' twice \(lines 1 and 3\)"):
        _load(p, classes=classes)
    classes.write_bytes(f"\ufeff{nfd_cafe}\ndog\ncat\n".encode())
    assert _load(p, classes=classes).classes == [nfc_cafe, "dog", "cat"]


def test_folding_in_one_thread_leaves_forwards_in_another_untouched():
    """torch.fx patches nn.Module.__call__ for the whole process while it traces; a forward in
    another thread meanwhile (a Dask worker's warm-up folding while a shard scores) failed with
    "module is not installed as a submodule". The fold is exact and the other thread never fails."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=4).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):  # real statistics, so a fold has work to do
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        want = m(x)
    errors, stop, forwards = [], threading.Event(), [0]

    def keep_scoring():
        while not stop.is_set():
            try:
                with torch.inference_mode():
                    assert torch.allclose(m(x), want, atol=1e-5)
                forwards[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure in the other thread is the bug
                errors.append(exc)
                return

    t = threading.Thread(target=keep_scoring)
    t.start()
    try:
        folded = [fold_conv_bn(m) for _ in range(10)]
    finally:
        stop.set()
        t.join()
    assert not errors, repr(errors[0])
    assert forwards[0] > 0
    with torch.inference_mode():
        got = folded[-1](x)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in folded[-1].modules())
    assert torch.allclose(got, want, atol=1e-4)  # exact up to float rounding, on any CPU (no top-1 check: ties)
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())  # the original is as loaded


def test_a_pin_shares_the_loaded_model_and_a_wrong_pin_is_refused(tiny_checkpoint):
    """The plan loads a checkpoint unpinned, the shards pinned to its sha256: one load, one object.
    A pin written by hand (the sha256 alone) refuses other bytes, for a local file too."""
    from imgscore.inference.model import clear_model_cache, file_sha256

    clear_model_cache()
    base = ModelConfig(arch="mobilenet_v3_small", checkpoint=tiny_checkpoint)
    plain = load_model(base, PreprocessConfig(), CPU)
    pinned = base.model_copy(update={"checkpoint_pin": file_sha256(tiny_checkpoint)})
    assert load_model(pinned, PreprocessConfig(), CPU) is plain
    wrong = base.model_copy(update={"checkpoint_pin": "0" * 64})
    with pytest.raises(ModelError, match="not the 0{64}"):
        load_model(wrong, PreprocessConfig(), CPU)
