"""Issue 26: in CI every test runs or the run fails. A skip becomes a failure naming its reason (tests/conftest.py),
and `make services` stops the run when Orthanc or the browser cannot be installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SKIPPING = '''
import pytest
pytest.importorskip("a_package_that_is_not_installed")  # a skipped module

def test_runs():
    assert True
'''
SKIPPING_TEST = '''
import pytest

def test_skips():
    pytest.skip("Orthanc is not installed")

def test_runs():
    assert True
'''


def _run_suite(tmp_path, ci: bool, *files: str) -> subprocess.CompletedProcess:
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_module_skip.py").write_text(SKIPPING)
    (tmp_path / "test_one_skip.py").write_text(SKIPPING_TEST)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_skip_fails_the_run_in_ci_only(tmp_path):
    local = _run_suite(tmp_path, False, "test_module_skip.py", "test_one_skip.py")
    assert local.returncode == 0, local.stdout[-2000:]
    assert "ensam suite: 1 tests ran (1 passed, 0 failed, 0 errors), 2 skipped" in local.stdout, local.stdout[-2000:]
    ci = _run_suite(tmp_path, True, "test_one_skip.py")
    assert ci.returncode != 0, ci.stdout[-2000:]
    assert "skipped in CI, where every test must run (CI=true): Skipped: Orthanc is not installed" in ci.stdout, ci.stdout
    assert "ensam suite: 2 tests ran (1 passed, 1 failed, 0 errors), 0 skipped (CI: skips are failures)" in ci.stdout
    ci = _run_suite(tmp_path, True, "test_module_skip.py")  # a skipped module stops the run
    assert ci.returncode != 0 and "a_package_that_is_not_installed" in ci.stdout, ci.stdout[-2000:]
    assert "skipped in CI, where every test must run" in ci.stdout


def test_make_services_fails_in_ci_when_it_cannot_install():
    """As a user who cannot install packages (apt-get needs root), `make services` warns locally and stops CI."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run make as another user")
    import pwd

    nobody = pwd.getpwnam("nobody")
    work = tempfile.mkdtemp(prefix="ensam_make_")  # the Makefile where the unprivileged user can read it
    os.chmod(work, 0o755)
    shutil.copy(os.path.join(ROOT, "Makefile"), os.path.join(work, "Makefile"))
    os.chmod(os.path.join(work, "Makefile"), 0o644)
    base = ["make", "-s", "-C", work, "services", "SERVICES_DEB=ensam-no-such-package"]
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    local = subprocess.run(base, env=env, capture_output=True, text=True, user=nobody.pw_uid, group=nobody.pw_gid,
                           extra_groups=[], timeout=120)
    assert local.returncode == 0 and "WARNING" in local.stdout + local.stderr, (local.stdout, local.stderr)
    ci = subprocess.run(base + ["CI=true"], env=env, capture_output=True, text=True, user=nobody.pw_uid,
                        group=nobody.pw_gid, extra_groups=[], timeout=120)
    assert ci.returncode != 0 and "every test must run" in ci.stderr, (ci.stdout, ci.stderr)
