"""The server process measured from outside: RSS and peak RSS, CPU time (its own and the machine's), sampled in a
thread while a check runs (`Sampler`, also a /metrics gauge)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from loadtest.attack.client import metric, scrape


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of `pid` to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Sampler:
    """Samples a process's RSS and CPU time every `interval` s in a thread (and optionally a /metrics gauge)."""

    def __init__(self, pid: int, interval: float = 0.02, metrics_url: str = "", gauge: str = "") -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.metrics_url, self.gauge = metrics_url, gauge
        self.times: list[float] = []
        self.rss: list[int] = []
        self.cpu: list[float] = []
        self.gauge_samples: list[tuple[float, float | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)]
        if gauge:
            self._threads.append(threading.Thread(target=self._run_gauge, daemon=True))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.process.oneshot():
                    cpu = self.process.cpu_times()
                    self.rss.append(self.process.memory_info().rss)
                    self.cpu.append(cpu.user + cpu.system)
                    self.times.append(time.monotonic())
            except Exception:  # noqa: BLE001 - the process has exited
                return
            self._stop.wait(self.interval)

    def _run_gauge(self) -> None:
        while not self._stop.is_set():
            try:
                value = metric(scrape(self.metrics_url, 1.0), self.gauge)
            except Exception:  # noqa: BLE001
                value = None
            self.gauge_samples.append((time.monotonic(), value))
            self._stop.wait(0.1)

    def __enter__(self) -> Sampler:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    @property
    def peak(self) -> int:
        return max(self.rss, default=0)


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def busy_cpu_seconds() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)
