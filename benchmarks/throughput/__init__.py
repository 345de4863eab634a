"""The parts of ``make bench`` (``python -m benchmarks.run``), by what a reader looks for:
``specs`` (the workloads and their sizes), ``in_process`` (the paths timed inside this process:
forward-only, decode, the plain and tuned loops, references), ``command_runs`` (``imgscore run``
as a subprocess), ``workloads`` (each workload's measurements, in order), ``report``
(results/latest.md), ``targets`` and ``ablations`` (each speed option alone)."""
