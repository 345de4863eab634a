"""Inference backends: eager PyTorch, ONNX Runtime and OpenVINO behind one forward contract.

Every backend gives a :class:`~imgscore.inference.backends.forward.Forward`: a callable from a
float32 ``[B, 3, H, W]`` batch to softmax probabilities float32 ``[B, C]`` on the CPU — the
contract of :func:`~imgscore.inference.backends.eager.forward_probs`, so per-image isolation
(:func:`imgscore.inference.isolation.score_isolated`), the NaN/Inf check and top-k are the same
code for every backend.

- :mod:`.forward`: the contract;
- :mod:`.eager`: PyTorch itself (autocast for bf16/fp16);
- :mod:`.onnxruntime`, :mod:`.openvino`: the two runtimes, each on an ONNX export of the model;
- :mod:`.installed`: which runtimes (and the ONNX exporter) this process can import, and the
  pip line of each that is missing;
- :mod:`.export`: the ONNX export and its on-disk cache;
- :mod:`.factory`: :func:`~.factory.make_forward`, the one place a backend's forward is built
  (and refused, before scoring, when it cannot run);
- :mod:`.auto`: ``inference.backend=auto``, the fastest installed backend timed on this machine;
- :mod:`.canary`: the run-start check of reduced precision against fp32 torch.

Threads: each runtime gets the worker's core share that torch gets
(``imgscore.inference.device.configure_threads``). Precision: ``fp32`` everywhere by default —
OpenVINO is told ``f32`` explicitly, because on CPUs with bf16 its default is bf16, which moved
resnet50 logits by up to 0.53. Reduced precision (``bf16``) is opt-in and checked by the canary.
"""
