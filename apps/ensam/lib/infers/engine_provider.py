"""One shared :class:`lib.engine.EnsamEngine` per device for every ensam task, reloaded when new weights land.

Weights follow the MONAI Label convention ``[model/pretrained_ensam.pt, model/ensam.pt]``: the LAST file that
exists wins, so weights published by fine-tuning replace the pre-trained ones without a restart. The file's
identity (path, inode, size, mtime in ns) is checked on every request (one ``stat``); a change rebuilds the engine
(and so drops its encoding cache). Publication is one ``os.replace`` (:mod:`lib.weights`): a new inode, so even a
file system with coarse mtimes shows the change, and every server sharing the model folder (replicas behind a
proxy, docs/SCALE_OUT.md) answers its next request with the new weights. ``weights_version`` (in each answer and in
``/info``) is a fingerprint of the file's bytes (SHA-256, 16 hex digits), computed once per file identity: the same
on every replica that serves the same weights.

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

from lib.io.digest import sha256_file

logger = logging.getLogger(__name__)


def _in_background_task() -> bool:
    from lib.background import in_background_task

    return in_background_task()


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
        self._engines: Dict[str, Tuple[object, Optional[str], tuple]] = {}  # device -> (engine, path, identity)
        self._versions: Dict[tuple, str] = {}  # (path, identity) -> fingerprint of the bytes
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

    @staticmethod
    def _identity(path: Optional[str]) -> tuple:
        """What changes whenever the file is replaced or rewritten: (inode, size, mtime ns); () when absent."""
        if not path:
            return ()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return ()
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def weights_version(self, path: Optional[str], identity: tuple) -> Optional[str]:
        """Fingerprint (SHA-256 of the bytes, 16 hex digits) of ``path`` as it is at ``identity``; None when the
        file changed meanwhile (the next request then rebuilds and fingerprints the new one)."""
        if not path or not identity:
            return None
        key = (path, identity)
        with self._build_lock:
            known = self._versions.get(key)
        if known is not None:
            return known
        try:
            with open(path, "rb") as f:
                if self._identity_of_open(f) != identity:
                    return None
                version = sha256_file(f)[:16]
        except FileNotFoundError:
            return None
        with self._build_lock:
            if len(self._versions) > 16:  # old publications
                self._versions.clear()
            self._versions[key] = version
        return version

    @staticmethod
    def _identity_of_open(f) -> tuple:
        st = os.fstat(f.fileno())
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def weights_info(self, engine=None) -> dict:
        """Name, mtime and version (fingerprint) of the weights: those ``engine`` was built from (what a result was
        computed with), else the newest file on disk (what the next request will be answered with)."""
        if engine is not None:
            p, mtime_ns = getattr(engine, "weights", None), getattr(engine, "mtime_ns", None) or 0
            if not p:
                return {"weights": None}
            info = {"weights": os.path.basename(p), "weights_mtime": mtime_ns // 10**9, "weights_mtime_ns": mtime_ns}
            version = getattr(engine, "_ensam_weights_version", None)
            if version:
                info["weights_version"] = version
            return info
        p = self.weights_path()
        identity = self._identity(p)
        if not identity:
            return {"weights": None}
        return {"weights": os.path.basename(p), "weights_mtime": identity[2] // 10**9,
                "weights_version": self.weights_version(p, identity)}

    # ---- engine ----------------------------------------------------------------------------------------------
    def device_lock(self, device: str) -> threading.Lock:
        with self._build_lock:
            lock = self._device_locks.get(device)
            if lock is None:
                lock = self._device_locks[device] = threading.Lock()
            return lock

    def get(self, device: Optional[str] = None):
        """The engine for ``device`` with the newest weights (built or rebuilt as needed): weights published since
        the last request (by this server's training, another replica's, or an upload) are used from this one on."""
        device = resolve_device(device)
        path = self.weights_path()
        identity = self._identity(path)
        with self._build_lock:
            cached = self._engines.get(device)
            if cached is not None and cached[1] == path and cached[2] == identity:
                return cached[0]
        from lib.engine import EnsamEngine  # imported late: the app loads even before the engine exists

        with self._build_lock:
            cached = self._engines.get(device)  # another thread may have built it meanwhile
            if cached is not None and cached[1] == path and cached[2] == identity:
                return cached[0]
            start = time.time()
            engine = EnsamEngine(
                weights=path, device=device, network_config=self.network_config, **self.engine_kwargs
            )
            self._engines[device] = (engine, path, identity)
            self.loads += 1
        if _in_background_task():  # scoring / batch processes: every layer is a pause point for the server's clicks
            from lib.activelearning.interactive_gate import gate

            gate().watch(getattr(engine, "network", None), getattr(engine, "refiner", None))
        # the fingerprint of what the engine read: the file is unchanged since the stat before the read, so it
        # still has that identity (when it changed, the version is unknown and the next request rebuilds anyway)
        read_ns = getattr(engine, "mtime_ns", None)
        if path and (read_ns is None or not identity or read_ns == identity[2]):
            engine._ensam_weights_version = self.weights_version(path, identity)
        logger.info(
            f"ensam engine ready on {device} with weights {path or '(none: untrained network)'} "
            f"(version {getattr(engine, '_ensam_weights_version', None)}) in {time.time() - start:.2f}s "
            f"(load #{self.loads})"
        )
        return engine

    def warm_up(self, device: Optional[str] = None) -> dict:
        """Build the engine for ``device`` and run the click path once on a dummy volume, so that the first real
        click pays only for its own work. In the server process the first forward pass of each network costs many
        times the next ones (issue 30, 2 busy CPU threads: a first click of 6-13 s, 2.6-6.3 s of it encoding and
        1.4-4.5 s decoding, then 0.9 s; the refiner's first corrective step up to 8 s), whatever the image; the
        model grid has one fixed shape, so one pass of each network covers every later click. Steps: a lone
        foreground click (the main network: encode, decode, paste, graph cut), then a corrective step with that
        answer as the previous mask (the refiner, when the weights have one). The dummy's encodings are dropped
        from the cache afterwards. Returns the timings (also logged)."""
        import numpy as np

        t0 = time.perf_counter()
        engine = self.get(device)
        built = time.perf_counter() - t0
        # a CT-like dummy: a bright ellipsoid in noise, anisotropic voxels (the resampling paths of real scans)
        shape, spacing = (96, 96, 32), (0.8, 0.8, 3.0)
        rng = np.random.default_rng(0)
        ii, jj, kk = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
        inside = ((ii - 48) / 20) ** 2 + ((jj - 46) / 16) ** 2 + ((kk - 16) / 6) ** 2 <= 1.0
        image = (rng.normal(-100.0, 30.0, shape) + 160.0 * inside).astype(np.int16)
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        key = "ensam-warm-up"  # never a real image's key (those are file identities)
        steps = []
        with self.device_lock(str(getattr(engine, "device", resolve_device(device)))):
            t = time.perf_counter()
            first, _ = engine.segment_step(image, affine, points=[[48, 46, 16]], point_labels=[1], image_key=key)
            steps.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.segment_step(image, affine, points=[[48, 46, 16], [66, 46, 16]], point_labels=[1, 0],
                                prev_mask=first, image_key=key)
            steps.append(time.perf_counter() - t)
            cache = getattr(engine, "cache", None)
            if cache is not None:  # nothing of the dummy stays: the first real click starts from an empty cache
                cache.clear()
                if hasattr(cache, "hits"):
                    cache.hits = cache.misses = 0
        info = {"device": str(getattr(engine, "device", device)), "build_s": round(built, 3),
                "click_s": round(steps[0], 3), "corrective_s": round(steps[1], 3),
                "seconds": round(time.perf_counter() - t0, 3)}
        logger.info(f"ensam warm-up on {info['device']}: engine {info['build_s']:.2f}s, first click "
                    f"{info['click_s']:.2f}s, corrective step {info['corrective_s']:.2f}s (a dummy volume; the first "
                    f"real click runs warm), {info['seconds']:.2f}s in all")
        return info

