"""imgscore's benchmarks: scripts run from the repository root as modules, ``python -m benchmarks.<name>``.

Scripts (each one's docstring says what it measures and how to run it; numbers and their
machines are in benchmarks/NOTES.md):

- ``run``: ``make bench``, throughput against the forward-only limit and a plain loop
  (its parts are in ``benchmarks.throughput``);
- ``decoders``, ``decode_share``, ``several_models``: the decode-bound path;
- ``object_store``: local disk against a local S3 server;
- ``scale_plan``, ``scale_run``, ``prefect_overhead``: what a 10-million-image night costs;
- ``bench_skip_scored``: finding already-scored images;
- ``gpu_check``: CPU/GPU agreement and GPU throughput (needs CUDA);
- ``acceptance_checkpoints``, ``fuzz_decode``: checks that take longer than the test suite.

Code more than one script uses is in ``benchmarks.common``: the repository's folders, the
machine's description, the synthetic photo workloads, checkpoints, memory sampling, timing and
result files.
"""
