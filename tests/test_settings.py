"""The one declaration of the server's settings (``lib.settings``): strict parsing of ``--conf`` and of the HTTP
layer's environment, errors naming the key at start-up, README and docstring tables rendered from it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from lib.settings import (CONF, ENV, GENERATED, Setting, SettingError, check_environment, env_value, parse_conf,
                          render_table, with_tables)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "apps", "ensam")


# ---------------------------------------------------------------------------------------------------- tables
def test_readme_settings_tables_are_the_rendered_ones():
    """README.md's two settings tables are exactly what ``render_table`` makes of the declarations (so they cannot
    drift: after adding a setting, ``python -m lib.settings README.md``)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    blocks = dict((name, body) for name, body in GENERATED.findall(readme))
    assert set(blocks) == {"CONF", "ENV"}
    assert blocks["CONF"] == render_table(CONF)
    assert blocks["ENV"] == render_table(ENV)
    assert with_tables(readme) == readme
    # and the rendering does react to a declaration
    assert with_tables(readme.replace("| `image_cache` |", "| `image_cachee` |")) == readme


def test_render_table_lists_every_live_setting_once():
    table = render_table(CONF)
    for s in CONF:
        assert (f"| `{s.name}` |" in table) == (s.retired is None), s.name
    assert "infer_concurrency" not in table
    last_row = render_table([Setting("ab", "text", "x", "one | two")]).splitlines()[-1]
    assert last_row == "| `ab` | text | x | one \\| two |"


def test_config_docstring_is_the_rendered_table():
    from lib.configs import ensam

    assert render_table(CONF) in ensam.__doc__


def test_declared_defaults_are_the_consumers_defaults():
    """A default shown in the tables is what the code behind it uses when the key is not given."""
    from lib.engine import EngineConfig
    from lib.infers.seg_by_example import FLOOR
    from lib.session import SessionRegistry as SessionStore
    from lib.io.imageio import VolumeCache

    d = parse_conf({})
    assert d.seg_floor == FLOOR
    store = SessionStore()
    assert (d.sessions, d.session_history, int(d.session_mb * 2**20)) == (store.max_sessions, store.max_history,
                                                                          store.max_bytes)
    assert d.image_cache == VolumeCache().max_items
    shown = {s.name: s.default_text() for s in CONF}
    assert shown["boundary_cut"].startswith("true") == (EngineConfig().boundary_cut is not None)
    assert shown["lone_click_view"].startswith("false") == (EngineConfig().lone_click_view is None)
    assert shown["conservative_corrections"].startswith("guarded") == (EngineConfig().correction_reach[2:3] == ("guard",))


# ---------------------------------------------------------------------------------------------------- parsing
def test_values_of_every_type_are_parsed():
    s = parse_conf({"labels": " liver, , spleen ", "preload": "YES", "boundary_cut": "0", "sessions": "+12",
                    "session_mb": "0.5e3", "seg_floor": "1", "atlas_threads": "4", "network": " net.json ",
                    "image_cache": "3.0"})
    assert s.labels == ["liver", "spleen"] and s.preload is True and s.boundary_cut is False
    assert s.sessions == 12 and s.session_mb == 500.0 and s.seg_floor == 1.0 and s.atlas_threads == 4
    assert s.network == "net.json" and s.image_cache == 3 and isinstance(s.image_cache, int)
    d = parse_conf(None)  # nothing given: the defaults
    assert d.labels == [] and d.preload is True and d.boundary_cut is None and d.atlases is None
    assert d.session_history == 10 and d.models == ["ensam"]
    assert parse_conf({"preload": " ", "labels": ""}).preload is True  # blank = not given: the default
    d.labels.append("x")
    assert parse_conf({}).labels == []  # a list default is never shared


@pytest.mark.parametrize("key, value, expected", [
    ("preload", "on", "true or false"),
    ("preload", "ture", "true or false"),
    ("boundary_cut", "2", "true or false"),
    ("sessions", "many", "an integer >= 1"),
    ("sessions", "0", "an integer >= 1"),
    ("image_cache", "2.5", "an integer >= 0"),
    ("image_cache", "-1", "an integer >= 0"),
    ("session_history", "1e400", "an integer >= 1"),
    ("seg_floor", "nan", "a number from 0 to 1"),
    ("seg_floor", "inf", "a number from 0 to 1"),
    ("seg_floor", "1.5", "a number from 0 to 1"),
    ("session_mb", "0x10", "a number >= 1"),
    ("atlas_threads", "four", "an integer >= 0"),
])
def test_a_bad_value_is_an_error_naming_the_key_and_its_type(key, value, expected):
    with pytest.raises(SettingError) as e:
        parse_conf({key: value})
    message = str(e.value)
    assert message.startswith(f"--conf {key}: expected {expected}") and repr(value) in message, message
    assert e.value.status_code == 400  # a RequestError (400-style), never a traceback from deep inside


def test_an_unknown_key_is_an_error_listing_the_settings():
    with pytest.raises(SettingError) as e:
        parse_conf({"seg_flor": "0.2", "labels": "liver"})
    assert "'seg_flor'" in str(e.value) and "'seg_floor'" in str(e.value), str(e.value)


def test_a_retired_key_is_a_warning_and_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="ensam.settings"):
        s = parse_conf({"infer_concurrency": "4"})
    assert "infer_concurrency is not an option any more" in caplog.text and "ignored" in caplog.text
    assert not hasattr(s, "infer_concurrency")


def test_adding_a_key_is_one_declaration():
    """A new key (a choice and a text, as issue 30's ``batch_backend`` / ``ray_address``) is one declaration each:
    parsed, checked and rendered with nothing else written."""
    table = CONF + (Setting("tile_backend", "choice", "local", "where tiles run", choices=("local", "ray")),
                    Setting("tile_address", "text", "", "the cluster (with tile_backend ray)"))
    s = parse_conf({"tile_backend": "ray", "tile_address": "ray://head:10001"}, table)
    assert s.tile_backend == "ray" and s.tile_address == "ray://head:10001"
    assert parse_conf({}, table).tile_backend == "local"
    with pytest.raises(SettingError, match=r"--conf tile_backend: expected local or ray, got 'dask'"):
        parse_conf({"tile_backend": "dask"}, table)
    assert "| `tile_backend` | local or ray | local | where tiles run |" in render_table(table)
    names = [s.name for s in CONF + ENV]
    assert len(names) == len(set(names))  # each setting declared once
    assert parse_conf({"batch_backend": "ray", "ray_address": "auto"}).batch_backend == "ray"


def test_a_bad_conf_stops_the_config_before_anything_is_built(tmp_path):
    from lib.configs.ensam import EnsamConfig

    model_dir = tmp_path / "model"
    with pytest.raises(SettingError, match="--conf sessions: expected an integer"):
        EnsamConfig().init("ensam", str(model_dir), {"labels": "liver", "sessions": "lots"}, None)
    assert not model_dir.exists()
    with pytest.raises(SettingError, match="boundary_cut"):
        EnsamConfig._engine_kwargs({"boundary_cut": "yes please"})


# ---------------------------------------------------------------------------------------------------- environment
def test_environment_settings_are_parsed_strictly():
    assert env_value("ENSAM_MAX_VOXELS", {}) == 2**30
    assert env_value("ENSAM_MAX_VOXELS", {"ENSAM_MAX_VOXELS": "1e9"}) == 10**9
    assert env_value("ENSAM_MAX_BODY_MB", {"ENSAM_MAX_BODY_MB": "  "}) == 4.0
    assert env_value("ENSAM_AUTH_AUDIENCE", {"ENSAM_AUTH_AUDIENCE": "ensam, other"}) == ["ensam", "other"]
    assert env_value("ENSAM_AUTH_ISSUER", {}) == ""
    assert env_value("ENSAM_STARTUP_IDLE_S", {}) == 5.0
    assert env_value("ENSAM_STARTUP_IDLE_S", {"ENSAM_STARTUP_IDLE_S": "15"}) == 15.0
    # ENSAM_STARTUP_IDLE_S was read with a bare float() by main.py, a typo silently became the default
    for name, value in (("ENSAM_MAX_UPLOAD_MB", "1G"), ("ENSAM_AUTH_KEYS_TTL_S", "-1"),
                        ("ENSAM_AUTH_KEYS_REFRESH_S", "nan"), ("ENSAM_MAX_VOXELS", "2.5"),
                        ("ENSAM_STARTUP_IDLE_S", "5s"), ("ENSAM_STARTUP_IDLE_S", "-1")):
        with pytest.raises(SettingError) as e:
            check_environment({name: value})
        assert str(e.value).startswith(f"environment variable {name}: expected ") and repr(value) in str(e.value)


def test_a_bad_environment_value_stops_the_http_layer_at_import():
    """``lib.http`` (imported by ``lib.server`` when the server starts) refuses a bad value, naming it; it used to
    log a warning and use the default (or, for ENSAM_MAX_VOXELS, fail with a bare ValueError)."""
    code = "import lib.http.limits as L; print(L.MAX_BODY_BYTES, L.MAX_UPLOAD_VOXELS)"
    env = dict(os.environ, PYTHONPATH=APP, ENSAM_MAX_BODY_MB="8", ENSAM_MAX_VOXELS="1000")
    ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.split() == [str(8 * 2**20), "1000"], ok.stderr
    env["ENSAM_AUTH_KEYS_TTL_S"] = "five minutes"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "environment variable ENSAM_AUTH_KEYS_TTL_S: expected a number >= 0" in bad.stderr, bad.stderr
