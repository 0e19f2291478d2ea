"""Background work yields the CPU to interactive requests.

monailabel runs scoring (start-up and on request), batch inference and training in processes of their own
(``python -m monailabel.interfaces.utils.app -m <task>``), each re-creating the app. On a 2-core machine such a
process took both cores for about 50 s after ``make serve`` (start-up ``uncertainty`` scoring) and a click waited
4-7 s instead of 0.3 s. :func:`yield_to_interactive`, called when the app is created, lowers the CPU priority
(niceness, ``ENSAM_BACKGROUND_NICE``, default 10; 0 = unchanged) of those processes only, so the kernel gives the
server's interactive threads the cores first and the background work the rest. It runs when this module is
imported, which ``main.py`` does first: a task process re-creating the app then spends its imports (18 s on two
busy cores, measured 2026-11-30) at the lower priority too, not only its work; ``EnsamApp.__init__`` calls it again
(a no-op then).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["in_background_task", "yield_to_interactive", "TASK_MODULE"]

logger = logging.getLogger(__name__)
TASK_MODULE = "monailabel.interfaces.utils.app"  # what monailabel's background tasks run as ``python -m``


def in_background_task() -> bool:
    """Whether this process is one of monailabel's background task processes (not the server)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == TASK_MODULE


def yield_to_interactive() -> int:
    """In a background task process, raise the niceness to ``ENSAM_BACKGROUND_NICE`` (default 10); elsewhere do
    nothing. Returns the process's niceness."""
    current = os.nice(0)
    if not in_background_task():
        return current
    try:
        target = int(os.environ.get("ENSAM_BACKGROUND_NICE", "10"))
    except ValueError:
        target = 10
    if target > current:
        current = os.nice(target - current)
    logger.info(f"ensam background task {' '.join(sys.argv[1:3])}: CPU niceness {current} (interactive requests first)")
    return current


yield_to_interactive()  # on import: see the module docstring
