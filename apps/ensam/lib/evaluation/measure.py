"""What the evaluator measures besides the scores: peak memory during a prediction (:class:`_PeakRSS`, CUDA's
peak allocation) and the machine a run was on (:func:`machine_info`)."""

from __future__ import annotations

import os
import platform
import threading

__all__ = ["machine_info"]


class _PeakRSS:
    """Peak resident set size above the value at entry, sampled in a thread (MB)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_mb = 0.0
        try:
            import psutil

            self._proc = psutil.Process(os.getpid())
        except Exception:  # pragma: no cover - psutil comes with monailabel
            self._proc = None

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _run(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        if self._proc is None:
            return self
        self._start = self._rss()
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._proc is None:
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.peak_mb = (self._peak - self._start) / 2 ** 20
        return False


def _cuda_peak_reset():
    try:
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return torch
    except Exception:  # pragma: no cover
        pass
    return None


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        import sys

        torch = sys.modules.get("torch")
        if torch is not None:
            info["torch_threads"] = torch.get_num_threads()
            info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover
        pass
    return info
