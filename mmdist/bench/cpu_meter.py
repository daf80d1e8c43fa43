"""CPU seconds by process kind (driver, Ray workers and daemons, DataLoader workers) of this
process and its descendants: what `mmdist bench ingest` charges each side."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import psutil


class CpuMeter:
    """CPU seconds used by this process and all its descendants (Ray's GCS, raylet and workers,
    DataLoader workers) while running, grouped by process kind. Unlike wall time this does not
    depend on what else the machine is running, so it shows the cost of each side honestly on
    a shared box.

    Processes are polled every ``interval`` seconds; a direct child that exits and is reaped
    while the meter runs (DataLoader workers at the end of the epoch) is counted in full from
    the kernel's totals for reaped children, not just up to the last poll before it exited
    (as "reaped children" if it exited before any poll saw it). Polling is not free: a poll
    reads /proc for every process, and at 0.2 s polls the meter itself used 0.37 CPU-s per
    20 s beside an idle Ray (~15 processes), CPU the side with more processes lost on a busy
    box; at 1 s it is a fifth of that.
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self._base: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._parent: dict[int, int] = {}
        self._kinds: dict[tuple[int, str], str] = {}
        self._alive: set[int] = set()
        self._reaped = 0.0
        self._stop = None
        self._thread = None

    def _poll(self) -> None:
        me = psutil.Process()
        alive = set()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                # A Ray worker's title changes with the task it runs, its kind does not: the
                # kind is derived once per (process, name); a forked DataLoader worker is
                # "python" until torch renames it, so the name is part of the key.
                if p.pid not in self._last:
                    self._parent[p.pid] = p.ppid()
                key = (p.pid, p.name())
                if key not in self._kinds:
                    self._kinds[key] = self._kind(p)
                self._last[p.pid] = (self._kinds[key], t.user + t.system)
                alive.add(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self._alive = alive

    @staticmethod
    def _kind(p: Any) -> str:
        name = p.name()
        if name.startswith("ray::") or name in ("python", "python3"):
            cmd = p.cmdline()
            if name.startswith("ray::"):
                # actors keep their class as title (ray::_StatsActor.method, ray::DashboardAgent);
                # task workers show ray::IDLE or the task running (ray::ReadParquet->...)
                title = cmd[0].split("(")[0].split(".")[0]
                actor = title.startswith("ray::_") or title.endswith(("Actor", "Agent"))
                name = title if actor else "ray::worker"
            else:  # Ray's helper daemons (dashboard, log_monitor, ...)
                name = Path(next((c for c in cmd[1:] if c.endswith(".py")), name)).stem
            name = name[:40]
        return name

    @staticmethod
    def _reaped_children_s() -> float:
        t = os.times()
        return t.children_user + t.children_system

    def __enter__(self) -> CpuMeter:
        self._poll()
        self._base = {pid: v for pid, (_, v) in self._last.items()}
        self._reaped = self._reaped_children_s()
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.interval):
                self._poll()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self._reaped = self._reaped_children_s() - self._reaped

    def by_kind(self) -> dict[str, float]:
        me = os.getpid()
        out: dict[str, float] = {}
        gone: dict[str, float] = {}  # direct children that exited: CPU seen up to their last poll
        for pid, (name, v) in self._last.items():
            kind = "driver" if pid == me else name
            used = v - self._base.get(pid, 0.0)
            out[kind] = out.get(kind, 0.0) + used
            if pid not in self._alive and self._parent.get(pid) == me:
                gone[kind] = gone.get(kind, 0.0) + v  # reaped totals count from their start
        unseen = self._reaped - sum(gone.values())
        if unseen > 0:  # what they used after their last poll, or in full if never polled
            kind = max(gone, key=gone.get) if gone else "reaped children"
            out[kind] = out.get(kind, 0.0) + unseen
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.01}
