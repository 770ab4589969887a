"""``vllm bench serve``, vLLM's own benchmark client, against the gateway on the real model: it
must run as it runs against ``vllm serve`` (every request successful, the full token count, as
its random dataset sets ``ignore_eos``). vLLM comes from its own venv (``make vllm``)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gateway.app import create_app
from loadtests.vllm_procs import ROOT, VLLM_PYTHON

from .conftest import API_KEY, BASE, Server, settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"vLLM's venv is missing ({VLLM_PYTHON}): run `make vllm` (make test does)")
    return VLLM_PYTHON


def test_vllm_bench_serve_runs_against_the_gateway(tmp_path, checkpoint, vllm_python):
    s = settings(tmp_path, backend="embedded", max_model_len=2048, max_num_seqs=8, max_loras=1)
    prompts = 4
    with Server(create_app(s)) as server:
        env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONPATH": str(ROOT)}
        run = subprocess.run(
            [str(vllm_python), "-m", "loadtests.vllm_cli", "bench", "serve", "--backend", "openai-chat",
             "--base-url", server.url, "--endpoint", "/v1/chat/completions", "--model", BASE,
             "--tokenizer", str(checkpoint), "--dataset-name", "random", "--num-prompts", str(prompts),
             "--save-result", "--result-dir", str(tmp_path), "--result-filename", "result.json"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["completed"] == prompts and result["failed"] == 0
    # the random dataset's defaults: 1024 input and 128 output tokens, ignore_eos set
    assert result["total_output_tokens"] == prompts * 128
    assert result["total_input_tokens"] >= prompts * 1000
