"""Peak memory of a process tree while it runs, sampled on a background thread."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import psutil

SERVER_MARK = "create_app"  # Prefect's temporary server: its command line names the app factory


class TreeRss:
    """Peak memory of process ``pid`` and its descendants, sampled every ``every`` seconds.

    Per sample: the RSS summed over the tree (an upper bound: pages that forked DataLoader
    workers share with their parent count once per process), split into the root process,
    Prefect's temporary server and the rest (DataLoader workers, Dask workers); plus the root's
    exact high-water mark (VmHWM, Linux). Each figure's peak is kept in bytes, and the tree's
    peak before :meth:`mark` (e.g. the planning phase, before the first shard committed).

    Not PSS: reading ``/proc/PID/smaps(_rollup)`` of a torch process costs far more than RSS
    (CUDA libraries map a huge address space), enough to take a core from the throughput being
    measured (benchmarks/NOTES.md, "Targets in the first (loaded) run"). RSS costs microseconds.
    """

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every = pid, every
        self.peak_tree = self.peak_root = self.hwm_root = 0
        self.peak_server = self.peak_others = 0
        self.peak_before_mark = 0
        self.marked = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def mark(self) -> None:
        """From now on the samples no longer count towards ``peak_before_mark``."""
        self.marked = True

    def sample(self) -> None:
        """Take one sample now (a process that is gone is skipped)."""
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = server = others = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                total += rss
                if p.pid == self.pid:
                    self.peak_root = max(self.peak_root, rss)
                elif SERVER_MARK in " ".join(p.cmdline()):
                    server += rss
                else:
                    others += rss
            except psutil.Error:
                pass
        self.peak_tree = max(self.peak_tree, total)
        self.peak_server, self.peak_others = max(self.peak_server, server), max(self.peak_others, others)
        if not self.marked:
            self.peak_before_mark = max(self.peak_before_mark, total)
        self._read_hwm()

    def _read_hwm(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.hwm_root = max(self.hwm_root, int(line.split()[1]) * 1024)
        except OSError:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> TreeRss:
        if self.pid == os.getpid():
            try:  # reset this process's VmHWM so each phase reports its own peak
                Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            except OSError:
                pass
        self.sample()
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sample()
        self._stop.set()
        self._t.join()

    @property
    def mib(self) -> dict[str, float]:
        """The peaks in MiB (one decimal): tree, root's VmHWM, the server, the other processes."""
        return {
            "peak_rss_tree_mib": round(self.peak_tree / 2**20, 1),
            "peak_rss_main_mib": round(self.hwm_root / 2**20, 1),
            "peak_rss_server_mib": round(self.peak_server / 2**20, 1),
            "peak_rss_others_mib": round(self.peak_others / 2**20, 1),
        }
