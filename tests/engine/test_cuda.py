"""The same engine code path on CUDA; skipped cleanly where no GPU is present."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig, GenerationRequest, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


async def test_cuda_greedy_matches_cpu_in_float32(checkpoint: Path) -> None:
    async def run(device: str) -> list[int]:
        engine = Engine(EngineConfig(model=str(checkpoint), device=device, dtype="float32", max_num_seqs=2,
                                     max_model_len=256, max_loras=1, max_lora_rank=4))
        engine.start()
        try:
            req = GenerationRequest(request_id="g", prompt="The capital of France is",
                                    sampling=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
            return [t async for c in engine.generate(req) for t in c.token_ids]
        finally:
            engine.shutdown()

    assert await run("cuda") == await run("cpu")
