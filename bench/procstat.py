"""CPU time and peak memory (PSS) of a process and all its descendants, from /proc."""

from __future__ import annotations

import os
import threading
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds including reaped children) or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / CLOCK_TICKS


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st:
                parents[int(entry)] = st[0]
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def cpu_seconds(root: int) -> float:
    return sum((_stat(pid) or (0, 0.0))[1] for pid in descendants(root))


def pss_bytes(root: int) -> int:
    total = 0
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class ProcessTree:
    """Measure a tree between start() and stop(): CPU seconds used and peak PSS."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root = root
        self.interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._cpu0 = cpu_seconds(self.root)
        self._peak = pss_bytes(self.root)
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, pss_bytes(self.root))
        return {"cpu_s": cpu_seconds(self.root) - self._cpu0, "peak_pss": self._peak}

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, pss_bytes(self.root))
            time.sleep(0)
