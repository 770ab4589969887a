from __future__ import annotations

import stat

import pytest

from gateway.tenancy.auth import write_secret_file
from gateway.settings import Settings, SettingsError


def test_precedence_defaults_file_env_flags(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('port = 9000\nmax_num_seqs = 4\nhost = "0.0.0.0"\n[ignored]\n')
    with pytest.raises(SettingsError, match="ignored"):
        Settings.load(file=f, env={})
    f.write_text('[tensafe]\nport = 9000\nmax_num_seqs = 4\nhost = "0.0.0.0"\n')
    s = Settings.load({"port": "9100"}, env={"TENSAFE_MAX_NUM_SEQS": "8", "TENSAFE_DEV": "yes"}, file=f)
    assert (s.port, s.max_num_seqs, s.host, s.dev) == (9100, 8, "0.0.0.0", True)
    assert Settings.load(env={"TENSAFE_CONFIG": str(f)}).port == 9000
    assert Settings.load(env={}).port == 8000


def test_bad_values_name_the_setting():
    with pytest.raises(SettingsError, match="port"):
        Settings.load({"port": "eighty"}, env={})
    with pytest.raises(SettingsError, match="dev"):
        Settings.load(env={"TENSAFE_DEV": "maybe"})
    with pytest.raises(SettingsError, match="unknown setting"):
        Settings.load({"prot": 1}, env={})


def test_settings_are_frozen_and_hide_the_key():
    s = Settings.load({"api_key": "secret-value"}, env={})
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]
    assert "secret-value" not in repr(s)


def test_engine_options_reach_the_engine_and_the_settings_import_no_engine(tmp_path):
    import subprocess
    import sys

    from gateway.backends.embedded import engine_config

    s = Settings.load({"max_num_seqs": "3", "model_cache": str(tmp_path)}, env={})
    config = engine_config(s)
    assert (config.max_num_seqs, config.cache_dir, config.model) == (3, tmp_path, "smollm2-135m-instruct")
    assert engine_config(Settings.load(env={})).cache_dir.name == "models"  # the engine's default
    code = "import sys, gateway.settings; sys.exit('engine' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_secret_files_are_private(tmp_path):
    path = tmp_path / "d" / "secret"
    write_secret_file(path, "tsk-abc")
    assert path.read_text() == "tsk-abc\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    write_secret_file(path, "tsk-new")
    assert path.read_text() == "tsk-new\n" and stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_usage_rows_the_store_refuses_wait_for_the_next_flush(tmp_path):
    from gateway.store import Tenant, open_store
    from gateway.tenancy.usage import UsageRecorder, today

    store = open_store(f"sqlite:///{tmp_path / 'u.db'}")
    await store.init()
    await store.create_tenant(Tenant("t", "T", 0, incarnation="i1"))
    recorder = UsageRecorder(store)
    recorder.add("t", "m", 10, 5, "i1")
    recorder.add("t", "m", 1, 2, "i1")
    await store.close()  # the store is unavailable: the flush fails ...
    with pytest.raises(RuntimeError):
        await recorder.flush()
    recorder.add("t", "m", 100, 0, "i1")
    await store.init()
    await recorder.flush()  # ... and nothing counted is lost
    rows = await store.usage("t")
    assert [(r.day, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [(today(), 3, 111, 7)]
    await store.close()


def test_usage_day_is_the_utc_date_on_both_sides_of_midnight():
    import datetime

    from gateway.tenancy.usage import today

    midnight = datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC).timestamp()
    assert today(midnight - 0.001) == "2026-02-28"
    assert today(midnight) == "2026-03-01"
    assert today(midnight - 1) == "2026-02-28"  # a clock set back is followed too
    assert today(midnight + 86399.9) == "2026-03-01"
    assert today(midnight + 86400) == "2026-03-02"
    assert today() == datetime.datetime.now(datetime.UTC).date().isoformat()
