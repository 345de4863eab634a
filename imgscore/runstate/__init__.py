"""Run state under ``output.root/runs/RUN_ID``: the plan, the manifest and shard ledger, commit
records, the run lock, the image index, incremental nights, rerun planning, old-layout migration."""
