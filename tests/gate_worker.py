"""A background task process for tests/test_interactive_gate.py: ``steps`` units of work under the interactive gate,
a pause point before each; prints how often it paused. Loads the gate module by its path (no package imports: the
process starts in well under a second).

    python tests/gate_worker.py GATE_FILE LOG_FILE STEPS STEP_SECONDS
"""

import importlib.util
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(os.path.dirname(HERE), "apps", "ensam", "lib", "activelearning", "interactive_gate.py")


def main(path, log, steps, step_s):
    spec = importlib.util.spec_from_file_location("interactive_gate", MODULE)
    G = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(G)
    os.environ[G.GATE_ENV] = path
    os.environ[G.LOG_ENV] = log
    os.environ[G.RESUME_ENV] = "0.05"
    with G.gate().background("test work") as work:
        for _ in range(int(steps)):
            work.checkpoint()
            time.sleep(float(step_s))  # "work": the process holds the gate shared meanwhile
    print(f"pauses={work.pauses}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
