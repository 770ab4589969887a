"""``tensafe he encrypt`` and ``tensafe he generate`` as real processes: a PEFT directory
encrypted for chosen modules and layers, then generated with through the key holder, printing
what the plaintext adapter generates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from adapters.peft import peft_config
from engine import ChatMessage
from gateway.cli.he import parse_layers, plaintext_hook

from .conftest import TOKEN, lora

pytestmark = pytest.mark.slow

PROMPT = "What is the capital of France?"


def tensafe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, env=environ,
                          timeout=300)


def test_parse_layers() -> None:
    assert parse_layers("0,1") == [0, 1]
    assert parse_layers("0-2, 5") == [0, 1, 2, 5]
    for bad in ("", "3-1", "-1", "a"):
        with pytest.raises(ValueError):
            parse_layers(bad)


def test_encrypt_then_generate_prints_the_plaintext_adapters_text(tmp_path: Path, he_keys: Path, key_holder: str,
                                                                 generator) -> None:
    config, tensors = lora(8, ("q_proj",), [0, 1], seed=5, std=0.1)
    peft = tmp_path / "peft"
    peft.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(peft / "adapter_model.safetensors"))
    (peft / "adapter_config.json").write_text(json.dumps(peft_config(config, "smollm2-135m-instruct")))

    enc = tensafe("he", "encrypt", str(peft), "--keys", str(he_keys), "--modules", "q_proj", "--layers", "0-1",
                  "-o", str(tmp_path / "a.he"))
    assert enc.returncode == 0, enc.stderr
    assert json.loads(enc.stdout)["modules"] == {"q_proj": [0, 1]}

    args = ("he", "generate", "--adapter", str(tmp_path / "a.he"), "--server-context", str(he_keys / "server.ctx"),
            "--key-holder", key_holder, "--prompt", PROMPT, "--max-tokens", "6")
    missing = tensafe(*args)
    assert missing.returncode == 2 and "TENSAFE_HE_TOKEN" in missing.stderr
    wrong = tensafe(*args, env={"TENSAFE_HE_TOKEN": "hetok-wrong"})
    assert wrong.returncode == 1 and "401" in wrong.stderr
    run = tensafe(*args, env={"TENSAFE_HE_TOKEN": TOKEN})
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stderr.strip().splitlines()[-1])
    assert stats["completion_tokens"] == 6 and stats["round_trips"] > 0

    ids = generator.tokenizer.tokenize(messages=[ChatMessage("user", PROMPT)])
    plain = generator.greedy(ids, 6, plaintext_hook(config, tensors), {"q_proj": [0, 1]})
    base = generator.greedy(ids, 6)
    assert run.stdout.rstrip("\n") == generator.tokenizer.decode(plain)
    assert generator.tokenizer.decode(plain) != generator.tokenizer.decode(base)
