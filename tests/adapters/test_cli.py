"""The CLI verbs, run in-process through a fresh argparse parser."""
from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import pytest

from adapters.cli import register
from adapters.keys import load_recipient_public, load_signing_public, recipient_key_entry
from adapters.package import inspect

from .builders import SMOLLM2_2L, small_adapter_dir


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tensafe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out = {"tenant": tmp_path / "tenant-key", "other": tmp_path / "other-key",
           "gateway": tmp_path / "gateway-key", "gateway2": tmp_path / "gateway-key-2"}
    for name in ("tenant", "other"):
        assert run("keys", "signing", "--out", out[name]) == 0
    for name in ("gateway", "gateway2"):
        assert run("keys", "recipient", "--out", out[name]) == 0
    return out


@pytest.fixture
def package(tmp_path: Path, keys: dict[str, Path]) -> Path:
    adapter = small_adapter_dir(tmp_path / "peft")
    out = tmp_path / "a.tssp"
    assert run("adapter", "pack", adapter, "--tenant", "tenant-a", "--name", "bot", "--version",
               "3", "--base-model", SMOLLM2_2L.model_id, "--sign", keys["tenant"],
               "--recipient", keys["gateway"], "-o", out) == 0
    return out


def test_keys_commands_write_key_directories_and_print_the_id(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("keys", "signing", "--out", tmp_path / "s") == 0
    key_id = capsys.readouterr().out.strip()
    assert key_id == (tmp_path / "s" / "key_id").read_text().strip() and len(key_id) == 64
    assert stat.S_IMODE((tmp_path / "s" / "mldsa65_private.pem").stat().st_mode) == 0o600


def test_keys_command_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("keys", "recipient", "--out", tmp_path / "r") == 0
    before = (tmp_path / "r" / "x25519_private.pem").read_bytes()
    assert run("keys", "recipient", "--out", tmp_path / "r") == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "r" / "x25519_private.pem").read_bytes() == before


def test_pack_then_verify_with_recipient_key_decrypts_and_validates(
        tmp_path: Path, keys: dict[str, Path], package: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536,
                                  "num_hidden_layers": 2, "num_attention_heads": 9,
                                  "num_key_value_heads": 3, "head_dim": 64}))
    capsys.readouterr()
    assert run("adapter", "verify", package, "--signer", keys["tenant"], "--recipient-key",
               keys["gateway2"], "--recipient-key", keys["gateway"], "--base-config", config) == 0
    out = capsys.readouterr().out
    assert "decrypted 8 tensors" in out and "SHA-256 matches" in out


def test_verify_without_recipient_key_checks_signatures_only(
        keys: dict[str, Path], package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("adapter", "verify", package, "--signer", keys["tenant"]) == 0
    assert "not decrypted" in capsys.readouterr().out


def test_verify_with_wrong_signer_or_recipient_fails_with_exit_1(
        keys: dict[str, Path], package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("adapter", "verify", package, "--signer", keys["other"]) == 1
    assert "invalid package" in capsys.readouterr().err
    assert run("adapter", "verify", package, "--signer", keys["tenant"], "--recipient-key",
               keys["gateway2"]) == 1
    assert run("adapter", "verify", package, "-v", "--signer", keys["tenant"], "--recipient-key",
               keys["gateway2"]) == 1
    assert "no recipient key" in capsys.readouterr().err


def test_inspect_without_signer_says_signatures_were_not_verified(
        package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("adapter", "inspect", package) == 0
    captured = capsys.readouterr()
    manifest = json.loads(captured.out)
    assert manifest["tenant"] == "tenant-a" and manifest["version"] == "3"
    assert "NOT verified" in captured.err


def test_inspect_with_signer_verifies(keys: dict[str, Path], package: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert run("adapter", "inspect", package, "--signer", keys["tenant"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["name"] == "bot" and "signatures verified" in captured.err
    assert run("adapter", "inspect", package, "--signer", keys["other"]) == 1


def test_tampered_package_fails_verification(keys: dict[str, Path], package: Path) -> None:
    data = bytearray(package.read_bytes())
    data[200] ^= 1
    package.write_bytes(bytes(data))
    assert run("adapter", "verify", package, "--signer", keys["tenant"]) == 1


def test_pack_accepts_the_gateways_recipient_key_document(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    old, new = load_recipient_public(keys["gateway"]), load_recipient_public(keys["gateway2"])
    doc = tmp_path / "recipient.json"
    doc.write_text(json.dumps({"data": [recipient_key_entry(old, created=1, current=False),
                                        recipient_key_entry(new, created=2, current=True)]}))
    out = tmp_path / "b.tssp"
    assert run("adapter", "pack", small_adapter_dir(tmp_path / "peft"), "--tenant", "t",
               "--name", "n", "--base-model", "m", "--sign", keys["tenant"],
               "--recipient", doc, "-o", out) == 0
    manifest = inspect(out.read_bytes(), trusted_signers=[load_signing_public(keys["tenant"])])
    assert manifest.recipient_key_id == new.key_id and manifest.version == "1"


def test_pack_of_invalid_adapter_names_the_problem(
        tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    adapter = small_adapter_dir(tmp_path / "peft")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert run("adapter", "pack", adapter, "--tenant", "t", "--name", "n", "--base-model", "m",
               "--sign", keys["tenant"], "--recipient", keys["gateway"], "-o", tmp_path / "x") == 1
    assert "DoRA" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_files_are_usage_errors(tmp_path: Path, keys: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run("adapter", "inspect", tmp_path / "nope.tssp") == 2
    assert "cannot read package" in capsys.readouterr().err
    assert run("adapter", "verify", tmp_path / "nope.tssp", "--signer", tmp_path / "no-key") == 2
    bad_doc = tmp_path / "r.json"
    bad_doc.write_text("{not json")
    assert run("adapter", "pack", small_adapter_dir(tmp_path / "peft"), "--tenant", "t",
               "--name", "n", "--base-model", "m", "--sign", keys["tenant"],
               "--recipient", bad_doc, "-o", tmp_path / "x") == 2
    assert "not valid JSON" in capsys.readouterr().err
