"""deploy/make_secrets.py, run as an operator runs it: one env file per Secret, private, with
values the gateway, the workers and the agents accept; and a recipient key added for rotation."""
from __future__ import annotations

import stat
import subprocess
import sys

from gateway.bearer import parse_tokens
from gateway.tenancy.keyprovider import EnvKeyProvider

from .render import DEPLOY, ROOT
from .test_manifests import OPERATOR_SECRETS, make_secrets


def run(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, str(DEPLOY / "make_secrets.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_new_secrets_are_private_and_usable(tmp_path):
    out = tmp_path / "secrets"
    files = run("new", str(out))
    assert sorted(files) == sorted(str(out / f"{n}.env") for n in OPERATOR_SECRETS if n != "tensafe-metrics-key")
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    values = {}
    for f in map(type(out), files):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        values[f.stem] = make_secrets.read_env(f)
        assert set(values[f.stem]) == OPERATOR_SECRETS[f.stem]
    keys = values["tensafe-gateway-keys"]
    provider = EnvKeyProvider({"TENSAFE_HASHING_KEY": keys["hashing-key"], "TENSAFE_RECIPIENT_KEYS": keys["recipient-keys"]})
    assert len(provider.recipient_keys()) == 1 and keys["admin-key"].startswith("tsk-")
    for name in ("tensafe-worker-tokens", "tensafe-agent-tokens"):
        assert values[name]["current"] in parse_tokens(values[name]["accepted"])
    assert values["tensafe-redis"]["password"].isalnum()  # it sits in the store URL as it is

    # rotation: a new current recipient key, the old one kept (it opens the packages wrapped to it)
    first = provider.recipient_keys()[0]
    run("add-recipient", str(out / "tensafe-gateway-keys.env"))
    rotated = make_secrets.read_env(out / "tensafe-gateway-keys.env")
    provider = EnvKeyProvider({"TENSAFE_HASHING_KEY": rotated["hashing-key"],
                               "TENSAFE_RECIPIENT_KEYS": rotated["recipient-keys"]})
    old, new = provider.recipient_keys()
    assert old.key_id == first.key_id and new.created > old.created and new.key_id != old.key_id
    assert rotated["hashing-key"] == keys["hashing-key"] and rotated["admin-key"] == keys["admin-key"]
