"""One shared :class:`lib.engine.EnsamEngine` per device for every ensam task, reloaded when new weights land.

Weights follow the MONAI Label convention ``[model/pretrained_ensam.pt, model/ensam.pt]``: the LAST file that
exists wins, so weights published by fine-tuning replace the pre-trained ones without a restart. The file's
mtime is checked on every request; a change rebuilds the engine (and so drops its encoding cache).

One lock per device guards the model: requests run in parallel threads (the non-blocking infer route) but one
at a time touches a device. (There was an ``infer_concurrency`` option for more; it did nothing, since the engine
serialises its own ``segment`` calls under one lock: its network, encoding cache and timings are shared. On CPU
two inferences would also only share the same cores.) Waiting on it is the answer's ``wait`` latency.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)


def resolve_device(name: Optional[str] = None) -> str:
    import torch

    name = (name or "").strip().lower() if isinstance(name, str) else ""
    if isinstance(name, str) and name.startswith("cuda"):
        if torch.cuda.is_available():
            return name if ":" in name else "cuda:0"
        return "cpu"
    if name in ("", "auto", "default"):
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return name if name == "cpu" or name.startswith("mps") else "cpu"


class EngineProvider:
    def __init__(
        self,
        paths: Sequence[str],
        network_config: Optional[dict] = None,
        engine_kwargs: Optional[dict] = None,
    ):
        self.paths = list(paths)
        self.network_config = network_config  # None: the engine reads <weights>.json beside the weights
        self.engine_kwargs = dict(engine_kwargs or {})
        self._engines: Dict[str, Tuple[object, Optional[str], float]] = {}
        self._build_lock = threading.Lock()
        self._device_locks: Dict[str, threading.Lock] = {}
        self.loads = 0  # how many times an engine was (re)built: visible in results and tests

    # ---- weights ---------------------------------------------------------------------------------------------
    def existing_paths(self) -> list:
        """The weights files that exist, oldest first (pre-trained, then fine-tuned)."""
        return [p for p in self.paths if p and os.path.exists(p)]

    def weights_path(self) -> Optional[str]:
        existing = self.existing_paths()
        return existing[-1] if existing else None

    def weights_info(self, engine=None) -> dict:
        """Name and mtime of the weights: those ``engine`` was built from (what a result was computed with), else
        the newest file on disk."""
        if engine is not None:
            p, mtime_ns = getattr(engine, "weights", None), getattr(engine, "mtime_ns", None) or 0
            if not p:
                return {"weights": None}
            return {"weights": os.path.basename(p), "weights_mtime": mtime_ns // 10**9, "weights_mtime_ns": mtime_ns}
        p = self.weights_path()
        if not p:
            return {"weights": None}
        st = os.stat(p)
        return {"weights": os.path.basename(p), "weights_mtime": int(st.st_mtime)}

    def is_valid(self) -> bool:
        return True  # the network can always be built; without weights it is untrained (logged at load)

    # ---- engine ----------------------------------------------------------------------------------------------
    def device_lock(self, device: str) -> threading.Lock:
        with self._build_lock:
            lock = self._device_locks.get(device)
            if lock is None:
                lock = self._device_locks[device] = threading.Lock()
            return lock

    def get(self, device: Optional[str] = None):
        """The engine for ``device`` with the newest weights (built or rebuilt as needed)."""
        device = resolve_device(device)
        path = self.weights_path()
        mtime = os.stat(path).st_mtime_ns if path else 0
        with self._build_lock:
            cached = self._engines.get(device)
            if cached is not None and cached[1] == path and cached[2] == mtime:
                return cached[0]
            from lib.engine import EnsamEngine  # imported late: the app loads even before the engine exists

            start = time.time()
            engine = EnsamEngine(
                weights=path, device=device, network_config=self.network_config, **self.engine_kwargs
            )
            # the mtime of the file the engine actually read (a publication between the stat above and the read
            # would otherwise pair the new weights with the old mtime, and rebuild once more for nothing)
            mtime = getattr(engine, "mtime_ns", None) or mtime
            self._engines[device] = (engine, path, mtime)
            self.loads += 1
            logger.info(
                f"ensam engine ready on {device} with weights {path or '(none: untrained network)'} "
                f"in {time.time() - start:.2f}s (load #{self.loads})"
            )
            return engine

