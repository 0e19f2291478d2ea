"""THE least-recently-used cache of the app, bounded in bytes and/or in entries. Its users: the engine's encoder
features (``engine_parts.EncodingCache``, bytes), the decoded volumes (``io.imageio.VolumeCache``, entries), the
interactive sessions (``session.SessionRegistry``, bytes and entries) and the atlas registrations of
``atlas.segment.SegmentByExample`` (entries).

Ours rather than ``cachetools.LRUCache``: that one measures a value once when it is stored (a session's history
grows and shrinks in place: ``put`` again re-measures it here), refuses a value larger than the whole budget (here
the newest entry always stays, as every user needs) and is not thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator, List, Optional, Tuple


class ByteLRU:
    """A thread-safe map that forgets its least recently used entries when it holds more than ``max_bytes`` (sizes
    from ``sizeof(value)`` or given to ``put``) or more than ``max_items`` entries; ``None`` = no bound. The entry
    just stored is never evicted by its own ``put``. ``get`` marks an entry used; ``peek`` does not."""

    def __init__(self, max_bytes: Optional[int] = None, max_items: Optional[int] = None,
                 sizeof: Optional[Callable[[Any], int]] = None) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.sizeof = sizeof
        self._d: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            entry = self._d.get(key)
            if entry is None:
                return default
            self._d.move_to_end(key)
            return entry[0]

    def peek(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            entry = self._d.get(key)
            return default if entry is None else entry[0]

    def touch(self, key: Hashable) -> None:
        """Mark ``key`` as the most recently used (nothing happens when it is not held)."""
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)

    def put(self, key: Hashable, value: Any, size: Optional[int] = None, replace: bool = True) -> List[Hashable]:
        """Store ``value`` as the most recently used entry (``replace=False``: keep an entry already held, as it is)
        and evict the least recently used others while a bound is exceeded. Returns the evicted keys."""
        if size is None:
            size = int(self.sizeof(value)) if self.sizeof is not None else 0
        with self._lock:
            if key in self._d and not replace:
                return []
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._d[key] = (value, int(size))
            self._bytes += int(size)
            return self._evict()

    def pop(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            entry = self._d.pop(key, None)
            if entry is None:
                return default
            self._bytes -= entry[1]
            return entry[0]

    def _over(self) -> bool:
        return ((self.max_items is not None and len(self._d) > self.max_items)
                or (self.max_bytes is not None and self._bytes > self.max_bytes))

    def _evict(self) -> List[Hashable]:
        gone = []
        while self._over() and len(self._d) > 1:  # the newest entry (the one just stored) stays
            oldest, (_, size) = self._d.popitem(last=False)
            self._bytes -= size
            gone.append(oldest)
        return gone

    def keys(self, newest_first: bool = False) -> List[Hashable]:
        with self._lock:
            return list(reversed(self._d)) if newest_first else list(self._d)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.keys())

    @property
    def nbytes(self) -> int:
        return self._bytes
