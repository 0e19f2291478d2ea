"""Bounded, thread-safe memory of interactive results: the previous mask and an undo history.

A session is keyed by ``(client_id, image, label)``. Each step pushes the new mask; ``undo`` pops it and gives
back the one before (an empty mask when nothing is left). One mask representation: a mask goes in as the engine
gives it (uint8 0/1 or bool), is kept bit-packed (1 bit per voxel) and comes out as a bool array (a view of the
unpacked bits, no further copy), which the engine takes as it is. The store keeps at most ``max_sessions``
sessions and ``max_bytes`` of packed masks, evicting the least recently used session first.

One request's read-modify-write of a session (read the previous mask, run the model, record the result; or undo)
runs inside ``with store.locked(key):``, so that two requests of the same session run one after the other and
neither loses the other's step; requests of other sessions are not held up. ``push(..., reset=True)`` empties the
session and records the new step in one locked step, so a request that fails before it never changes anything.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Dict, Hashable, Iterator, List, Optional, Tuple

import numpy as np

from ..cache import ByteLRU


class _Packed:
    """A mask as bits, in its own memory order (the engine's answers are Fortran-ordered: no transpose either way)."""

    __slots__ = ("shape", "bits", "nbytes", "fortran")

    def __init__(self, mask: np.ndarray):
        m = np.asarray(mask)
        if m.dtype != bool and m.dtype != np.uint8:
            m = m != 0
        self.shape = m.shape
        self.fortran = bool(m.flags.f_contiguous and not m.flags.c_contiguous)
        # any non-zero byte is a 1 bit: no bool copy of a uint8 mask
        self.bits = np.packbits(m.ravel(order="F" if self.fortran else "C"))
        self.nbytes = int(self.bits.nbytes)

    def unpack(self) -> np.ndarray:
        flat = np.unpackbits(self.bits, count=int(np.prod(self.shape))).view(bool)
        return flat.reshape(self.shape, order="F" if self.fortran else "C")


class SessionStore:
    def __init__(self, max_sessions: int = 64, max_history: int = 10, max_bytes: int = 256 * 2**20):
        self.max_sessions = max(1, int(max_sessions))
        self.max_history = max(1, int(max_history))
        self.max_bytes = max(1, int(max_bytes))
        # key -> (time of the last step, history of packed masks); the entry's size = its packed bytes
        self._sessions = ByteLRU(max_bytes=self.max_bytes, max_items=self.max_sessions)
        self._lock = threading.RLock()
        self._key_locks: Dict[Hashable, list] = {}  # key -> [lock, number of requests holding or waiting]

    @staticmethod
    def key(client_id: Optional[str], image_key: str, label: Optional[str]) -> Tuple[str, str, str]:
        return (str(client_id or ""), str(image_key), str(label or ""))

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def nbytes(self) -> int:
        return self._sessions.nbytes

    def depth(self, key) -> int:
        with self._lock:
            entry = self._sessions.peek(key)
            return len(entry[1]) if entry else 0

    def _store(self, key, stamp: float, history: List[_Packed]) -> None:
        """(Re)store a session as the most recently used one, measured again; other sessions are evicted, least
        recently used first, while there are more than ``max_sessions`` or more than ``max_bytes``."""
        self._sessions.put(key, (stamp, history), size=sum(p.nbytes for p in history))

    def last(self, key, shape=None) -> Optional[np.ndarray]:
        """The latest mask of the session, bool (None when there is none or it does not fit ``shape``)."""
        with self._lock:
            entry = self._sessions.peek(key)
            if not entry or not entry[1]:
                return None
            self._sessions.touch(key)
            packed = entry[1][-1]
        if shape is not None and tuple(packed.shape) != tuple(shape):
            return None
        return packed.unpack()

    @contextmanager
    def locked(self, key) -> Iterator[None]:
        """Hold session ``key`` for one request's read-modify-write (requests of the same key wait for it)."""
        with self._lock:
            entry = self._key_locks.get(key)
            if entry is None:
                entry = self._key_locks[key] = [threading.Lock(), 0]
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._key_locks[key]

    def push(self, key, mask: np.ndarray, reset: bool = False) -> int:
        """Record a new step (after emptying the session when ``reset``); returns the session depth."""
        packed = _Packed(mask)
        with self._lock:
            if reset:
                self.reset(key)
            _, history = self._sessions.pop(key, (0.0, []))
            history.append(packed)
            del history[:-self.max_history]
            stamp = time.time()
            self._store(key, stamp, history)  # evicts other sessions first
            if self._sessions.nbytes > self.max_bytes and len(history) > 1:
                # a single session larger than the budget keeps only its newest steps that fit (at least one)
                while len(history) > 1 and sum(p.nbytes for p in history) > self.max_bytes:
                    history.pop(0)
                self._store(key, stamp, history)
            return len(history)

    def peek_undo(self, key) -> Tuple[Optional[np.ndarray], int]:
        """What ``undo`` would give, without changing anything. Raises KeyError when there is nothing to undo."""
        with self._lock:
            entry = self._sessions.peek(key)
            if not entry or not entry[1]:
                raise KeyError(key)
            history = entry[1]
            current = history[-2] if len(history) > 1 else None
            depth = len(history) - 1
        return (current.unpack() if current is not None else None), depth

    def undo(self, key) -> Tuple[Optional[np.ndarray], int]:
        """Drop the latest step. Returns (the mask now current or None if none is left, remaining depth).
        Raises KeyError when the session has nothing to undo."""
        with self._lock:
            entry = self._sessions.peek(key)
            if not entry or not entry[1]:
                raise KeyError(key)
            history = entry[1]
            history.pop()
            self._store(key, entry[0], history)
            current = history[-1] if history else None
            depth = len(history)
        return (current.unpack() if current is not None else None), depth

    def reset(self, key) -> None:
        with self._lock:
            self._sessions.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()
