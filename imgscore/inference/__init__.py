"""Models and scoring: checkpoints, model loading, devices, backends (eager, ONNX Runtime,
OpenVINO), the loader split, one shard scored."""
