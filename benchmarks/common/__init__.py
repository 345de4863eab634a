"""What several benchmarks share: folders (``paths``), the machine (``machine``), photo
workloads (``images``), checkpoints (``models``), memory sampling (``memory``), timing
(``timing``) and result files (``results``)."""
