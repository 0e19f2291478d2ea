"""Background task processes (scoring, batch inference, training) lower their CPU priority; the server does not."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_TASK = ("import sys, types; sys.modules['__main__'].__spec__ = types.SimpleNamespace(name="
             "'monailabel.interfaces.utils.app'); ")


def _niceness(code: str, **env) -> int:
    out = subprocess.run([sys.executable, "-c", code + "from lib.background import yield_to_interactive; "
                          "print(yield_to_interactive())"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "apps", "ensam"), **env}, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_background_tasks_yield_the_cpu_and_the_server_does_not():
    base = os.nice(0)
    assert _niceness(FAKE_TASK) == max(base, 10)
    assert _niceness(FAKE_TASK, ENSAM_BACKGROUND_NICE="15") == max(base, 15)
    assert _niceness(FAKE_TASK, ENSAM_BACKGROUND_NICE="0") == base  # 0: unchanged
    assert _niceness("") == base  # not a background task: the server keeps its priority
