from __future__ import annotations

import base64
import stat

import pytest

from adapters.keys import generate_recipient_key
from gateway.tenancy.keyprovider import DirectoryKeyProvider, EnvKeyProvider, KeyProviderError


def test_directory_provider_creates_private_files_once_and_rotates(tmp_path):
    p = DirectoryKeyProvider(tmp_path / "keys", clock=lambda: 1000.0)
    hashing = tmp_path / "keys" / "hashing.key"
    assert stat.S_IMODE(hashing.stat().st_mode) == 0o600 and len(p.hashing_key()) == 32
    first = p.recipient_keys()
    assert len(first) == 1
    again = DirectoryKeyProvider(tmp_path / "keys", clock=lambda: 1000.0)
    assert again.hashing_key() == p.hashing_key() and again.recipient_keys()[0].key_id == first[0].key_id
    new = again.rotate_recipient()
    assert new.created > first[0].created
    reloaded = DirectoryKeyProvider(tmp_path / "keys")
    assert [k.key_id for k in reloaded.recipient_keys()] == [first[0].key_id, new.key_id]
    for private in (tmp_path / "keys" / "recipients").glob("*/*_private.pem"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_env_provider(tmp_path):
    keys = [generate_recipient_key(), generate_recipient_key()]
    env = {"TENSAFE_HASHING_KEY": "ab" * 32,
           "TENSAFE_RECIPIENT_KEYS": ",".join(f"{i}:{base64.b64encode(k.to_bytes()).decode()}"
                                              for i, k in enumerate(keys))}
    p = EnvKeyProvider(env)
    assert [k.key_id for k in p.recipient_keys()] == [k.key_id for k in keys]
    assert p.hashing_key() == bytes.fromhex("ab" * 32)
    with pytest.raises(KeyProviderError, match="rotated where"):
        p.rotate_recipient()
    with pytest.raises(KeyProviderError, match="TENSAFE_RECIPIENT_KEYS"):
        EnvKeyProvider({"TENSAFE_HASHING_KEY": "ab" * 32})
    with pytest.raises(KeyProviderError, match="malformed"):
        EnvKeyProvider({**env, "TENSAFE_RECIPIENT_KEYS": "1:not-base64!"})
    with pytest.raises(KeyProviderError):
        EnvKeyProvider({**env, "TENSAFE_HASHING_KEY": "ab"})
