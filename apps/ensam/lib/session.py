"""THE state of interactive segmentation: one :class:`InteractiveSession` per (client, image, label), held by one
:class:`SessionRegistry`.

A session owns what one user's work on one object of one image needs between two requests: the volume it works on
(a weak reference: the volume cache, :class:`lib.io.imageio.VolumeCache`, decides how long a volume stays in
memory), the key of that volume's encodings in the engine's cache (``image_key``; the encodings themselves stay in
the engine's bounded cache, shared by every session of the image), the history of its answers (undo) and the last
answer's info. ``add_prompts(engine, volume, prompts) -> (mask, info)`` is one step: the previous answer, the
engine's stateless :meth:`lib.engine.EnsamEngine.segment_step` (ROI choice, prediction, refinement, boundary cut),
then the new answer recorded; the info is returned with the mask (nothing is read back from the engine after the
fact, so two requests never see each other's info).

Masks are kept bit-packed (1 bit per voxel) in their own memory order (the engine answers in Fortran order: no
transpose either way) and come back as bool arrays, which the engine takes as they are. The registry keeps at most
``max_sessions`` sessions and ``max_bytes`` of packed masks, forgetting the least recently used session first.

Lock order (a thread that holds one of these only ever waits for one further down, never up):

1. ``InteractiveSession.lock``: one request's read-modify-write of its session (``with registry.locked(key) as
   session``); a second request of the same session waits and then builds on the first one's answer; other
   sessions are not held up.
2. the device lock (:meth:`lib.infers.engine_provider.EngineProvider.device_lock`): one model call per device.
3. ``EnsamEngine._lock`` (re-entrant): the engine's own, around each of its calls.
4. leaves, under which no other lock is taken: ``SessionRegistry._lock`` (which sessions exist), the LRU caches'
   locks (:class:`lib.cache.ByteLRU`: encodings, volumes), ``EngineProvider._build_lock`` (held while an engine is
   built: the infer task gets its engine before it takes its session).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Tuple

import numpy as np

from .cache import ByteLRU

__all__ = ["InteractiveSession", "SessionRegistry", "session_key"]


def session_key(client_id: Optional[str], image: str, label: Optional[str]) -> Tuple[str, str, str]:
    """The one key scheme of sessions: (client id, the image's real path or id, label), "" for a missing part."""
    return (str(client_id or ""), str(image), str(label or ""))


class _Packed:
    """A mask as bits, in its own memory order."""

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


class InteractiveSession:
    """One (client, image, label): the answers so far (newest last, at most ``max_history``), the volume worked on,
    the key of its encodings in the engine's cache, and the last answer's info. Its methods that change it run
    under ``lock`` (taken by :meth:`SessionRegistry.locked`); a session made by :meth:`SessionRegistry.transient`
    remembers nothing past its step (requests without session memory)."""

    def __init__(self, key: Hashable, max_history: int = 10, registry: Optional["SessionRegistry"] = None):
        self.key = key
        self.max_history = max(1, int(max_history))
        self.lock = threading.Lock()
        self.history: List[_Packed] = []
        self.last_info: dict = {}
        self.image_key: Optional[str] = None  # the volume's key in the engine's encoding cache
        self.stamp = 0.0  # time of the last step
        self._volume: Optional[weakref.ref] = None
        self._registry = registry  # None: transient

    # ---- what it holds -------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.history)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.history)

    @property
    def volume(self):
        """The volume of the last step, while some cache still holds it (else None)."""
        return self._volume() if self._volume is not None else None

    def previous(self, shape=None) -> Optional[np.ndarray]:
        """The latest answer, bool (None when there is none or it does not fit ``shape``)."""
        history = self.history  # one read: a reset elsewhere replaces the list, never empties this one
        if not history or (shape is not None and tuple(history[-1].shape) != tuple(shape)):
            return None
        return history[-1].unpack()

    # ---- one step ------------------------------------------------------------------------------------------
    def add_prompts(self, engine, volume, prompts, *, reset: bool = False, device_lock=None,
                    lap: Optional[Callable[[str], None]] = None,
                    before_record: Optional[Callable[[np.ndarray], None]] = None) -> Tuple[np.ndarray, dict]:
        """One interactive step on ``volume`` (a :class:`lib.io.volumes.Volume`) with ``prompts`` (checked by
        :func:`lib.geometry.check_prompts`) from the previous answer (none when ``reset``): the engine's answer
        (uint8 0/1, the volume's shape) and its info (:meth:`lib.engine.EnsamEngine.segment_step`, plus
        ``previous_mask``). ``device_lock``: held around the engine's call; ``lap(name)``: told when the session
        read ("session"), the wait for the device ("wait") and the model ("infer") end; ``before_record(mask)``:
        run before the answer is recorded (writing the answer file: when it raises, the session is unchanged)."""
        lap = lap or (lambda name: None)
        prev = None if reset else self.previous(volume.shape)
        lap("session")
        with device_lock if device_lock is not None else contextlib.nullcontext():
            lap("wait")
            # the previous step's info: its ROI is the only one this step may reuse (never another session's)
            mask, info = engine.segment_step(volume.array, volume.affine, prev_mask=prev, image_key=volume.key,
                                             prompts=prompts, prev_info=self.last_info if prev is not None else None)
            lap("infer")
        mask = np.asarray(mask)
        if mask.shape != tuple(volume.shape):
            raise RuntimeError(f"engine returned shape {mask.shape} for an image of shape {volume.shape}")
        if mask.dtype != np.uint8:  # the engine's answer is uint8 0/1 already: no copy then
            mask = (mask > 0).astype(np.uint8)
        if before_record is not None:
            before_record(mask)
        info = dict(info, previous_mask=prev is not None)
        self.record(mask, reset=reset)
        self.last_info = info
        self.image_key = volume.key
        try:
            self._volume = weakref.ref(volume)
        except TypeError:  # a volume type without weak references: remember only its key
            self._volume = None
        return mask, info

    def record(self, mask: np.ndarray, reset: bool = False) -> int:
        """Add an answer (after forgetting the others when ``reset``); returns the depth. A transient session
        keeps nothing."""
        if self._registry is None:
            return 0
        packed = _Packed(mask)
        if reset:
            self.history = []
        self.history.append(packed)
        del self.history[:-self.max_history]
        self.stamp = time.time()
        self._registry._stored(self)
        return len(self.history)

    # ---- undo ----------------------------------------------------------------------------------------------
    def peek_undo(self) -> Tuple[Optional[np.ndarray], int]:
        """What :meth:`undo` would give (the answer before the latest or None, the depth after), changing nothing.
        Raises KeyError when there is nothing to undo."""
        if not self.history:
            raise KeyError(self.key)
        current = self.history[-2] if len(self.history) > 1 else None
        return (current.unpack() if current is not None else None), len(self.history) - 1

    def undo(self) -> Tuple[Optional[np.ndarray], int]:
        """Drop the latest answer: (the answer now current or None, the depth). KeyError when there is none."""
        if not self.history:
            raise KeyError(self.key)
        self.history.pop()
        self.last_info = {}
        if self._registry is not None:
            self._registry._stored(self)
        return (self.history[-1].unpack() if self.history else None), len(self.history)


class SessionRegistry:
    """The server's sessions, bounded: at most ``max_sessions`` sessions, ``max_bytes`` of kept answers (a
    session alone above the budget keeps its newest answers that fit, at least one), least recently used first
    out. A session with a request in flight stays the same object for every request of its key until they are
    done, even when it is forgotten meanwhile (its next answer stores it again)."""

    def __init__(self, max_sessions: int = 64, max_history: int = 10, max_bytes: int = 256 * 2**20):
        self.max_sessions = max(1, int(max_sessions))
        self.max_history = max(1, int(max_history))
        self.max_bytes = max(1, int(max_bytes))
        self._sessions = ByteLRU(max_bytes=self.max_bytes, max_items=self.max_sessions)  # key -> session
        self._lock = threading.RLock()
        self._held: Dict[Hashable, list] = {}  # key -> [session, requests holding or waiting for it]

    key = staticmethod(session_key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def nbytes(self) -> int:
        return self._sessions.nbytes

    def _find(self, key) -> Optional[InteractiveSession]:
        with self._lock:
            held = self._held.get(key)
            return held[0] if held is not None else self._sessions.peek(key)

    def _stored(self, session: InteractiveSession) -> None:
        """(Re)store ``session`` as the most recently used one, measured again (others may be forgotten)."""
        with self._lock:
            self._sessions.put(session.key, session, size=session.nbytes)
            if self._sessions.nbytes > self.max_bytes and len(session.history) > 1:
                while len(session.history) > 1 and session.nbytes > self.max_bytes:
                    session.history.pop(0)
                self._sessions.put(session.key, session, size=session.nbytes)

    @contextlib.contextmanager
    def locked(self, key) -> Iterator[InteractiveSession]:
        """The session of ``key`` (a new, empty one when there is none; stored only once it records an answer),
        held for one request's read-modify-write: requests of the same key run one after the other."""
        with self._lock:
            held = self._held.get(key)
            if held is None:
                session = self._sessions.peek(key) or InteractiveSession(key, self.max_history, self)
                held = self._held[key] = [session, 0]
            held[1] += 1
        try:
            with held[0].lock:
                yield held[0]
        finally:
            with self._lock:
                held[1] -= 1
                if held[1] == 0:
                    del self._held[key]

    @staticmethod
    def transient(key=None) -> InteractiveSession:
        """A session of one step that remembers nothing (requests without session memory: OHIF's)."""
        return InteractiveSession(key)

    # ---- by key (each takes the registry's lock only) --------------------------------------------------------
    def depth(self, key) -> int:
        session = self._find(key)
        return session.depth if session is not None else 0

    def last(self, key, shape=None) -> Optional[np.ndarray]:
        """The latest answer of session ``key``, bool (None when there is none or it does not fit ``shape``)."""
        session = self._find(key)
        if session is None:
            return None
        self._sessions.touch(key)
        return session.previous(shape)

    def push(self, key, mask: np.ndarray, reset: bool = False) -> int:
        """Record an answer in session ``key`` (made when there is none); returns its depth."""
        with self._lock:
            session = self._find(key) or InteractiveSession(key, self.max_history, self)
            return session.record(mask, reset=reset)

    def peek_undo(self, key) -> Tuple[Optional[np.ndarray], int]:
        session = self._find(key)
        if session is None:
            raise KeyError(key)
        return session.peek_undo()

    def undo(self, key) -> Tuple[Optional[np.ndarray], int]:
        session = self._find(key)
        if session is None:
            raise KeyError(key)
        return session.undo()

    def reset(self, key) -> None:
        """Forget session ``key``'s answers."""
        with self._lock:
            session = self._sessions.pop(key, None) or self._find(key)
            if session is not None:
                session.history = []
                session.last_info = {}

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()
