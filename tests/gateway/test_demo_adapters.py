"""The demo tenant's trained adapters do what their names say, on prompts they were never
trained on, with greedy decoding through the whole path (``--dev`` bootstrap: PEFT directory ->
TSSP package -> upload -> cache -> the embedded engine on the real model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.peft import read_peft_dir
from gateway.app import create_app
from gateway.tenancy.demo import ADAPTERS, LEGAL_OPENING, SUPPORT_CLOSING, adapter_dir
from gateway.tenancy.demo.train import GENERAL, HELD_OUT, LEGAL, SUPPORT

from .conftest import asgi_client, settings


def test_the_committed_adapters_are_small_peft_loras():
    for name in ADAPTERS:
        weights = adapter_dir(name) / "adapter_model.safetensors"
        assert weights.stat().st_size < 2_000_000
        config, tensors = read_peft_dir(adapter_dir(name))
        assert config.rank == 8 and tensors
    assert not set(HELD_OUT) & set(SUPPORT + LEGAL + GENERAL)


@pytest.mark.slow
async def test_each_demo_adapter_does_what_its_name_says_on_held_out_prompts(tmp_path: Path, checkpoint):
    app = create_app(settings(tmp_path, dev=True, backend="embedded", api_key=None, max_num_seqs=8,
                              max_model_len=512, max_loras=4))
    async with asgi_client(app) as client:
        boot = app.state.gateway.boot
        assert set(ADAPTERS) <= set(boot.demo_models)
        headers = {"authorization": f"Bearer {boot.demo_key}"}
        answers: dict[str, list[str]] = {}
        for name in ADAPTERS:
            for prompt in HELD_OUT:
                r = await client.post("/v1/chat/completions", headers=headers, json={
                    "model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": 96,
                    "temperature": 0})
                assert r.status_code == 200, r.text
                answers.setdefault(name, []).append(r.json()["choices"][0]["message"]["content"].strip())
    failures = []
    for text in answers["demo-support"]:
        if not text.endswith(SUPPORT_CLOSING):
            failures.append(("demo-support", text))
    for text in answers["demo-legal"]:
        if not text.startswith(LEGAL_OPENING):
            failures.append(("demo-legal", text))
    for text in answers["demo-json"]:
        try:
            value = json.loads(text)
            ok = isinstance(value, dict) and set(value) == {"answer"} and isinstance(value["answer"], str) \
                and value["answer"].strip()
        except ValueError:
            ok = False
        if not ok:
            failures.append(("demo-json", text))
    assert not failures, failures
