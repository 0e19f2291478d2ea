"""Interactive requests first: background work (start-up scoring, scoring runs) pauses while an inference is in
flight, across processes (issue 30, item 4).

monailabel runs scoring in task processes of its own (``python -m monailabel.interfaces.utils.app -m scoring``);
niceness alone (:mod:`lib.background`) still let such a process share the cores with the first click. Here the
server and the task processes it starts share one gate, a lock file named by ``ENSAM_INTERACTIVE_GATE`` (set by the
server when the app is created, inherited by its task processes):

* the server, around every inference (:meth:`InteractiveGate.interactive`): marks the gate busy (``<gate>.busy``),
  then takes the ``flock`` of the gate exclusively, waiting at most ``ENSAM_GATE_WAIT_S`` seconds (default 2) for
  the background work to reach its next pause point, runs the inference and lets go; the last inference in flight
  removes the mark and stamps the time it ended (``<gate>.idle``);
* background work (:meth:`InteractiveGate.background`) holds the lock shared while it works and passes pause points
  (:meth:`BackgroundWork.checkpoint`): between images, and in a task process before every layer of the networks it
  runs (:meth:`InteractiveGate.watch` puts a forward pre-hook on each module; the engine provider does it there, never
  in the server, where a pause inside the model would hold the device lock an inference waits for). At a pause point
  with the gate busy it lets go of the lock, waits until no inference has been in flight for
  ``ENSAM_BACKGROUND_RESUME_S`` seconds (default 0.5), takes the lock again and goes on where it stopped: paused,
  never cancelled.

So while a click runs no background work runs (unless the bounded wait ran out: counted and logged). ``flock`` locks
go with their process: a killed server or task never leaves the gate shut. Counters: :meth:`InteractiveGate.stats`
(the server's are in ``/info`` under ``interactive_gate``); with ``ENSAM_GATE_LOG`` set to a file, every inference
and every stretch of background work is appended to it as one JSON line (``interactive``: t0, t1, waited_s,
timed_out; ``work_start``: t0, what; ``work``: t0, t1, what, why = yield | done), times from ``time.time()``.

Without ``ENSAM_INTERACTIVE_GATE`` (plain Python, tests of the scoring alone) the gate does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from typing import Dict, Iterator, Optional

logger = logging.getLogger(__name__)

__all__ = ["GATE_ENV", "LOG_ENV", "InteractiveGate", "BackgroundWork", "gate", "server_gate_path"]

GATE_ENV = "ENSAM_INTERACTIVE_GATE"
LOG_ENV = "ENSAM_GATE_LOG"
WAIT_ENV = "ENSAM_GATE_WAIT_S"
RESUME_ENV = "ENSAM_BACKGROUND_RESUME_S"
POLL_S = 0.02  # how often a paused background work looks at the gate again


def _env_float(name: str, default: float) -> float:
    try:
        v = float(os.environ.get(name, default))
    except ValueError:
        logger.warning(f"{name}={os.environ.get(name)!r} is not a number; using {default}")
        return default
    return v if v >= 0 else default


def server_gate_path() -> str:
    """The gate of this server process: ``$ENSAM_INTERACTIVE_GATE`` when set, else a new file in the temporary
    folder, removed when the server exits (one gate per server: replicas never wait for each other's clicks)."""
    if os.environ.get(GATE_ENV):
        return os.environ[GATE_ENV]
    path = os.path.join(tempfile.gettempdir(), f"ensam-gate-{os.getpid()}.lock")

    def remove():
        for p in (path, path + ".busy", path + ".idle"):
            with contextlib.suppress(OSError):
                os.remove(p)

    atexit.register(remove)
    return path


class InteractiveGate:
    def __init__(self, path: str):
        self.path = path
        self.busy_path = path + ".busy"
        self.idle_path = path + ".idle"
        self.wait_s = _env_float(WAIT_ENV, 2.0)
        self.resume_s = _env_float(RESUME_ENV, 0.5)
        self.log_path = os.environ.get(LOG_ENV) or None
        self._mu = threading.Lock()
        self._fd: Optional[int] = None  # the server side's descriptor (its exclusive lock)
        self._holding = False
        self._inflight = 0
        self._local = threading.local()  # this thread's background work, if any
        self._started = time.monotonic()
        self._last_end = time.monotonic()
        self.counters: Dict[str, float] = {"interactive": 0, "background_yielded": 0, "wait_timeouts": 0,
                                           "max_wait_s": 0.0, "background_pauses": 0, "background_paused_s": 0.0}

    # ---- files -------------------------------------------------------------------------------------------------
    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def busy(self) -> bool:
        """Whether an inference is in flight (or waiting for the background work to pause)."""
        return os.path.exists(self.busy_path)

    def _idle_for(self) -> float:
        """Seconds since the last inference ended (large when none ever ran)."""
        try:
            return max(0.0, time.time() - os.stat(self.idle_path).st_mtime)
        except OSError:
            return float("inf")

    def log(self, **event) -> None:
        if not self.log_path:
            return
        line = json.dumps(dict(event, pid=os.getpid())) + "\n"
        try:  # one write of a short line with O_APPEND: lines of several processes never interleave
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as e:  # pragma: no cover - a log must never fail a request
            logger.debug(f"interactive gate log: {e}")

    # ---- the server: inferences ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        """Around one inference: background work pauses at its next pause point (waited for at most ``wait_s``)
        and stays paused until no inference has been in flight for ``resume_s``."""
        waited_s, timed_out = 0.0, False
        with self._mu:
            self._inflight += 1
            self.counters["interactive"] += 1
            if self._inflight == 1:
                waited_s, timed_out = self._shut()
        t0 = time.time()
        try:
            yield
        finally:
            t1 = time.time()
            with self._mu:
                self._inflight -= 1
                self._last_end = time.monotonic()
                if self._inflight == 0:
                    self._open_again()
            self.log(ev="interactive", t0=t0, t1=t1, waited_s=waited_s, timed_out=timed_out)

    def _shut(self) -> tuple:
        """Mark busy, then hold the lock exclusively (bounded wait for the background work's pause point)."""
        with open(self.busy_path, "a"):
            pass
        if self._fd is None:
            self._fd = self._open()
        start = time.monotonic()
        waited, timed_out = False, False
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = True
                if time.monotonic() - start >= self.wait_s:
                    timed_out = True
                    break
                time.sleep(0.002)
        waited_s = round(time.monotonic() - start, 4)
        self._holding = not timed_out
        if waited:
            self.counters["background_yielded"] += 1
            self.counters["max_wait_s"] = max(self.counters["max_wait_s"], waited_s)
        if timed_out:
            self.counters["wait_timeouts"] += 1
            logger.warning(f"interactive gate: background work did not pause within {self.wait_s:.1f}s; the "
                           f"inference goes ahead beside it")
        return (waited_s if waited else 0.0), timed_out

    def _open_again(self) -> None:
        try:
            with open(self.idle_path, "a"):
                pass
            os.utime(self.idle_path)  # its mtime: when the last inference ended
        except OSError:
            pass
        if getattr(self, "_holding", False) and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._holding = False
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.busy_path)

    def wait_idle(self, idle_s: float, stop: Optional[threading.Event] = None) -> bool:
        """Block until no inference of this process has been in flight for ``idle_s`` seconds (counted from the
        gate's creation too). False when ``stop`` was set first."""
        while True:
            with self._mu:
                quiet = self._inflight == 0 and time.monotonic() - max(self._last_end, self._started) >= idle_s
            if quiet:
                return True
            if stop is not None and stop.wait(0.1):
                return False
            if stop is None:
                time.sleep(0.1)

    def in_flight(self) -> int:
        with self._mu:
            return self._inflight

    # ---- background work ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def background(self, what: str) -> Iterator["BackgroundWork"]:
        """Background work of this thread: starts when no inference is in flight, holds the gate shared, pauses at
        its pause points (``work.checkpoint()``, and every layer of the networks given to :meth:`watch`)."""
        outer = getattr(self._local, "work", None)
        if outer is not None:  # nested: the same stretch of work
            yield outer
            return
        work = BackgroundWork(self, what)
        self._local.work = work
        try:
            work.start()
            yield work
        finally:
            self._local.work = None
            work.finish()

    def checkpoint(self) -> None:
        """A pause point of this thread's background work (nothing when this thread does none)."""
        work = getattr(self._local, "work", None)
        if work is not None:
            work.checkpoint()

    def watch(self, *modules) -> None:
        """Pause points before every layer of these ``torch.nn.Module`` s (for this process's background work
        only: other threads pass through at the cost of one attribute read)."""
        for module in modules:
            if module is None or getattr(module, "_ensam_gate_watched", None) is self:
                continue
            for m in module.modules():
                m.register_forward_pre_hook(lambda *_: self.checkpoint())
            module._ensam_gate_watched = self

    def stats(self) -> dict:
        with self._mu:
            return dict({k: (round(v, 4) if isinstance(v, float) else int(v)) for k, v in self.counters.items()},
                        in_flight=self._inflight, gate=self.path)


class BackgroundWork:
    """One thread's stretch of background work under the gate (see :meth:`InteractiveGate.background`)."""

    def __init__(self, gate: InteractiveGate, what: str):
        self.gate = gate
        self.what = what
        self.fd: Optional[int] = None
        self.t0 = 0.0
        self.pauses = 0
        self.paused_s = 0.0

    def start(self) -> None:
        self.fd = self.gate._open()
        self._acquire()

    def _acquire(self) -> None:
        """Wait until no inference is in flight (and none for ``resume_s``), then hold the gate shared."""
        while True:
            while self.gate.busy() or self.gate._idle_for() < self.gate.resume_s:
                time.sleep(POLL_S)
            fcntl.flock(self.fd, fcntl.LOCK_SH)  # an inference between the look and here holds it: wait for it
            if not self.gate.busy():
                break
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # marked busy meanwhile: let it go first
        self.t0 = time.time()
        self.gate.log(ev="work_start", what=self.what, t0=self.t0)

    def _release(self, why: str) -> None:
        t1 = time.time()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.gate.log(ev="work", what=self.what, t0=self.t0, t1=t1, why=why)

    def checkpoint(self) -> None:
        if self.fd is None or not self.gate.busy():
            return
        start = time.monotonic()
        self._release("yield")
        self._acquire()
        self.pauses += 1
        self.paused_s += time.monotonic() - start
        with self.gate._mu:
            self.gate.counters["background_pauses"] += 1
            self.gate.counters["background_paused_s"] += time.monotonic() - start

    def finish(self) -> None:
        if self.fd is None:
            return
        self._release("done")
        os.close(self.fd)
        self.fd = None
        if self.pauses:
            logger.info(f"{self.what}: paused {self.pauses} time(s), {self.paused_s:.1f}s in all, for interactive "
                        f"requests")


class _NoGate(InteractiveGate):
    """No gate configured: every call passes straight through."""

    def __init__(self):
        super().__init__(os.devnull)
        self.log_path = None

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def background(self, what: str) -> Iterator["BackgroundWork"]:
        yield BackgroundWork(self, what)  # fd None: its checkpoints do nothing

    def watch(self, *modules) -> None:
        return None


_gates: Dict[str, InteractiveGate] = {}
_gates_lock = threading.Lock()


def gate() -> InteractiveGate:
    """This process's gate (``$ENSAM_INTERACTIVE_GATE``), or one that does nothing when none is set."""
    path = os.environ.get(GATE_ENV, "")
    with _gates_lock:
        g = _gates.get(path)
        if g is None:
            g = _gates[path] = InteractiveGate(path) if path else _NoGate()
        return g
