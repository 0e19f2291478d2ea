"""lib/local_server.py: the helpers that start the real server as a child process (tests, benchmarks, experiments),
checked on dummy children (a shell, ``python -m http.server``) so that they run in seconds."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass

import pytest

from lib.local_server import (APP_DIR, Service, copy_app, free_port, launch, server_cmd, server_env, start_server,
                              wait_ready)

PY = sys.executable


def _gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie its new parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_free_port_can_be_bound_on_the_loopback():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen(1)


def test_copy_app_copies_the_code_and_only_the_shipped_model_files(tmp_path):
    src = tmp_path / "src"
    for rel, text in {"main.py": "app", "lib/mod.py": "code", "lib/__pycache__/mod.cpython.pyc": "x",
                      "lib/stale.pyc": "x", "logs/app.log": "x", "bin/tool": "x", "model/pretrained_ensam.pt": "w",
                      "model/pretrained_ensam.json": "{}", "model/ensam.pt": "fine-tuned",
                      "model/ensam_stats.json": "{}", "model/runs/x.txt": "x"}.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    dst = tmp_path / "copy"
    assert copy_app(str(dst), str(src)) == str(dst)

    assert (dst / "main.py").read_text() == "app" and (dst / "lib" / "mod.py").read_text() == "code"
    for skipped in ("lib/__pycache__", "lib/stale.pyc", "logs", "bin", "model/ensam.pt", "model/ensam_stats.json",
                    "model/runs"):
        assert not (dst / skipped).exists(), skipped
    weights = dst / "model" / "pretrained_ensam.pt"
    assert weights.is_symlink() and os.readlink(weights) == str(src / "model" / "pretrained_ensam.pt")
    side = dst / "model" / "pretrained_ensam.json"
    assert side.is_file() and not side.is_symlink()
    side.write_text('{"changed": 1}')  # the copy is the caller's: the source stays as it was
    assert (src / "model" / "pretrained_ensam.json").read_text() == "{}"


def test_copy_app_of_the_real_app_is_importable_code(tmp_path):
    dst = copy_app(str(tmp_path / "app"))
    assert os.path.isfile(os.path.join(dst, "lib", "local_server.py"))
    assert os.path.isdir(os.path.join(dst, "model"))
    assert not any(f.startswith("ensam") for f in os.listdir(os.path.join(dst, "model")))
    assert not os.path.exists(os.path.join(dst, "lib", "__pycache__"))
    assert APP_DIR == os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["lib.local_server"].__file__)))


def test_server_env_and_cmd(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MONAI_LABEL_AUTO_UPDATE_SCORING", raising=False)
    app = str(tmp_path / "app")
    env = server_env(app, 3, MONAI_LABEL_SESSIONS="true")
    assert env["PYTHONPATH"].split(os.pathsep) == [app, "/elsewhere"]
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["MONAI_LABEL_TRACKING_ENABLED"] == env["MONAI_LABEL_AUTO_UPDATE_SCORING"] == "false"
    assert env["MONAI_LABEL_SESSIONS"] == "true"  # the caller's extra wins
    loud = server_env(app, quiet=False)
    assert "MONAI_LABEL_AUTO_UPDATE_SCORING" not in loud and loud["OMP_NUM_THREADS"] == "2"
    assert "MKL_NUM_THREADS" not in loud or loud["MKL_NUM_THREADS"] == os.environ.get("MKL_NUM_THREADS")

    cmd = server_cmd(app, "/studies", 8123, "--conf", "labels", "a,b")
    assert cmd[:4] == [PY, "-m", "monailabel.main", "start_server"]
    assert cmd[cmd.index("--app") + 1] == app and cmd[cmd.index("--studies") + 1] == "/studies"
    assert cmd[cmd.index("--port") + 1] == "8123" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert " ".join(cmd).count("--conf") == 2 and "--conf labels a,b" in " ".join(cmd)
    assert cmd[-2:] == ["--uvicorn_app", "lib.server:app"]


def test_a_child_is_seen_ready_and_stop_ends_its_whole_process_group(tmp_path):
    port = free_port()
    pid_file = tmp_path / "child.pid"
    # a shell that leaves a child of its own behind, then becomes the HTTP server
    script = (f"sleep 300 & echo $! > {pid_file}; "
              f"exec {PY} -m http.server {port} --bind 127.0.0.1 --directory {tmp_path}")
    log = str(tmp_path / "http.log")
    svc = Service(f"http://127.0.0.1:{port}", launch(["sh", "-c", script], log, str(tmp_path)), log)
    try:
        wait_ready(svc, "/", 60, "http.server", every=0.05)
        assert svc.alive()
        assert _wait_for(pid_file.exists) and pid_file.read_text().strip()
        sleeper = int(pid_file.read_text())
        assert os.getpgid(sleeper) == os.getpgid(svc.proc.pid) == svc.proc.pid  # its own group, led by it
        assert os.getpgid(svc.proc.pid) != os.getpgid(0)
    finally:
        svc.stop(grace=10)
    assert not svc.alive() and svc.proc.returncode is not None
    assert _wait_for(lambda: _gone(sleeper)), "the server's own child survived stop()"
    svc.stop()  # stopping a stopped service is a no-op


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(tmp_path):
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
            "time.sleep(300)")
    log = str(tmp_path / "stubborn.log")
    with Service("http://127.0.0.1:1", launch([PY, "-c", code], log, str(tmp_path)), log) as svc:
        assert _wait_for(lambda: "up" in svc.log_tail())
        t0 = time.time()
        svc.stop(grace=0.5)
        assert svc.proc.returncode == -9 and time.time() - t0 < 10


def test_wait_ready_on_a_child_that_exits_fails_with_its_log_tail(tmp_path):
    code = "import sys; print('\\n'.join(f'line {i}' for i in range(100))); print('boom: no app here'); sys.exit(3)"
    log = str(tmp_path / "dying.log")
    svc = Service(f"http://127.0.0.1:{free_port()}", launch([PY, "-c", code], log, str(tmp_path)), log)
    with pytest.raises(RuntimeError) as e:
        wait_ready(svc, "/info/", 60, "the dying server", every=0.05)
    msg = str(e.value)
    assert "the dying server exited with 3" in msg and "boom: no app here" in msg and log in msg
    assert "line 99" in msg and "line 10\n" not in msg  # the tail, not the whole log


def test_wait_ready_times_out_stops_the_child_and_says_so(tmp_path):
    log = str(tmp_path / "mute.log")
    code = "import time; print('listening nowhere', flush=True); time.sleep(300)"
    svc = Service(f"http://127.0.0.1:{free_port()}", launch([PY, "-c", code], log, str(tmp_path)), log)
    with pytest.raises(RuntimeError, match=r"mute did not answer within 1 s[\s\S]*listening nowhere"):
        wait_ready(svc, "/", 1.0, "mute", every=0.1, grace=5)
    assert not svc.alive()


def test_start_server_builds_the_command_and_the_url(tmp_path, monkeypatch):
    """start_server = free port + server_cmd + launch; checked with the launch step replaced (no real server)."""
    import lib.local_server as ls

    seen = {}

    def fake_launch(cmd, log_path, cwd, env=None):
        seen.update(cmd=cmd, log_path=log_path, cwd=cwd, env=env)
        return None

    @dataclass
    class AppServer(Service):  # as tests/conftest.py's EnsamServer: fields named like start_server's arguments
        app_dir: str = ""
        studies: str = ""

    monkeypatch.setattr(ls, "launch", fake_launch)
    srv = start_server("/app", "/studies", "--conf", "labels", "x", log_path=str(tmp_path / "s.log"),
                       cwd=str(tmp_path), port=8999, cls=AppServer, fields={"app_dir": "/app", "studies": "/s"})
    assert isinstance(srv, AppServer) and (srv.app_dir, srv.studies) == ("/app", "/s")
    assert srv.url == "http://127.0.0.1:8999" and srv.log_path == str(tmp_path / "s.log") and not srv.alive()
    assert seen["cmd"] == server_cmd("/app", "/studies", 8999, "--conf", "labels", "x")
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == "/app"
