"""The real monailabel server of this app as a child process, for tests, benchmarks and experiments.

One place for what tests/conftest.py, scripts/bench_first_click.py, scripts/loadtest.py, ``lib.benchmark`` and the
labelling-loop experiment each did on their own:

* :func:`free_port`: a free TCP port on 127.0.0.1;
* :func:`copy_app`: a throw-away copy of apps/ensam (code, shipped model files; never this checkout's fine-tuned
  ``ensam*`` weights), so that a server's training never writes into the repository;
* :func:`server_env` / :func:`server_cmd`: the environment and the ``monailabel start_server`` command line of such a
  server (ensam's uvicorn app, 127.0.0.1);
* :class:`Service` / :func:`launch`: a child process in its own session (process group) with its output in a log
  file: ``alive()``, ``log_tail(n)``, ``stop(grace)`` (SIGTERM to the whole group, SIGKILL after ``grace`` s);
* :func:`wait_ready`: poll ``GET url + path`` until 200; when the process exits or the time is up, fail with the
  tail of its log;
* :func:`start_server`: the four above together.

No pytest here: scripts and the app's experiments import it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

APP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # apps/ensam
HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the kernel's pick; free until someone else binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def copy_app(dst: str, src: str = APP_DIR) -> str:
    """``src`` (apps/ensam) as a server runs it, in ``dst``: the code (no caches, logs, bin/), and of ``model/`` only
    the shipped files: ``*.pt`` weights linked (large, only read), other plain files copied (a caller may rewrite
    its copy, never the repository's file). Skipped: ``ensam*`` (this checkout's fine-tuned weights, which the app's
    train task writes) and sub-folders. Returns ``dst``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "logs", "bin", "model", "*.pyc"))
    model = os.path.join(dst, "model")
    os.makedirs(model, exist_ok=True)
    src_model = os.path.join(src, "model")
    for name in sorted(os.listdir(src_model)) if os.path.isdir(src_model) else []:
        path = os.path.join(src_model, name)
        if name.startswith("ensam") or not os.path.isfile(path):
            continue
        if name.endswith(".pt"):
            os.symlink(path, os.path.join(model, name))
        else:
            shutil.copyfile(path, os.path.join(model, name))
    return dst


def server_env(app_dir: str, threads: Optional[int] = None, quiet: bool = True, **extra: str) -> dict:
    """This process's environment for a server of ``app_dir``: ``app_dir`` first on PYTHONPATH, usage tracking off;
    ``quiet``: start-up / auto scoring and monailabel sessions off too. ``threads``: OMP_NUM_THREADS and
    MKL_NUM_THREADS; without it OMP_NUM_THREADS stays as inherited, 2 when unset. ``extra`` last (wins)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([app_dir, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MONAI_LABEL_TRACKING_ENABLED"] = "false"
    if quiet:
        env.update({"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false"})
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    else:
        env.setdefault("OMP_NUM_THREADS", "2")
    env.update(extra)
    return env


def server_cmd(app_dir: str, studies: str, port: int, *conf: str, host: str = HOST) -> list:
    """``monailabel start_server`` of ``app_dir`` over ``studies`` with the model ``ensam`` and the ``--conf`` pairs
    ``conf``, through ensam's uvicorn app; run as ``python -m monailabel.main`` with this interpreter (the
    ``monailabel`` wrapper script runs whatever ``python`` is first on PATH)."""
    return [sys.executable, "-m", "monailabel.main", "start_server", "--app", app_dir, "--studies", studies,
            "--conf", "models", "ensam", *conf, "--host", host, "--port", str(port), "--uvicorn_app", "lib.server:app"]


def launch(cmd: list, log_path: str, cwd: str, env: Optional[dict] = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so its own process group: :meth:`Service.stop` ends its children too), its
    stdout and stderr into ``log_path`` (truncated)."""
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: Optional[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL after ``grace`` s; nothing when it already exited."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Service:
    """A child process (a server, a proxy, a PACS): where it answers, its log, how to stop it."""

    url: str
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)
    log_path: str = ""

    @classmethod
    def start(cls, url: str, cmd: list, log_path: str, cwd: str, env: Optional[dict] = None,
              fields: Optional[dict] = None):
        """:func:`launch` ``cmd`` and wrap it; ``fields``: a subclass's own (by name)."""
        return cls(url, launch(cmd, log_path, cwd, env), log_path, **(fields or {}))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        """The last ``n`` lines of its log ("" when unreadable)."""
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> None:
        stop_group(self.proc, grace)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


def wait_ready(svc: Service, path: str = "/info/", timeout: float = 180.0, what: str = "server", every: float = 0.5,
               request_timeout: float = 5.0, grace: float = 20.0) -> None:
    """Poll ``GET svc.url + path`` every ``every`` s until it answers 200. Raises RuntimeError with the log's tail
    when the process exits first, or (after stopping it, ``grace``) when ``timeout`` s pass."""
    import requests

    deadline = time.time() + timeout
    while True:
        if not svc.alive():
            code = svc.proc.returncode if svc.proc is not None else None
            raise RuntimeError(f"{what} exited with {code} (log {svc.log_path}):\n{svc.log_tail()}")
        try:
            if requests.get(f"{svc.url}{path}", timeout=request_timeout).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.time() > deadline:
            svc.stop(grace)
            raise RuntimeError(f"{what} did not answer within {timeout:.0f} s (log {svc.log_path}):\n"
                               f"{svc.log_tail()}")
        time.sleep(every)


def start_server(app_dir: str, studies: str, *conf: str, log_path: str, cwd: str, env: Optional[dict] = None,
                 port: Optional[int] = None, cls=Service, fields: Optional[dict] = None) -> Service:
    """A server of ``app_dir`` over ``studies`` (``conf``: ``--conf`` pairs) on ``port`` (a free one by default),
    started as ``cls`` (``fields``: its own, by name) and not waited for (:func:`wait_ready`). ``env``:
    :func:`server_env` of ``app_dir`` by default."""
    port = port or free_port()
    env = server_env(app_dir) if env is None else env
    return cls.start(f"http://{HOST}:{port}", server_cmd(app_dir, studies, port, *conf), log_path, cwd, env, fields)
