from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig


@dataclasses.dataclass(frozen=True)
class PeftSpec:
    name: str
    rank: int
    alpha: int
    targets: tuple[str, ...]
    rslora: bool = False


PEFT_SPECS = [
    PeftSpec("r4_qv", 4, 8, ("q_proj", "v_proj")),
    PeftSpec("r8_attn", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    PeftSpec("r16_all", 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    PeftSpec("r8_mlp_rslora", 8, 16, ("gate_proj", "up_proj", "down_proj"), rslora=True),
]


def make_peft_adapter(checkpoint: Path, out: Path, spec: PeftSpec, seed: int) -> Path:
    """A real PEFT LoRA adapter with random non-zero B (PEFT initialises B to zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=list(spec.targets),
                     use_rslora=spec.rslora, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peft_dirs(checkpoint: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    return {s.name: make_peft_adapter(checkpoint, root / s.name, s, 100 + i) for i, s in enumerate(PEFT_SPECS)}


@pytest.fixture(scope="session")
def fp32_engine(checkpoint: Path):
    """The real model in float32, where outputs must match the reference exactly."""
    engine = Engine(EngineConfig(model=str(checkpoint), dtype="float32", device="cpu", max_num_seqs=8,
                                 max_model_len=512, max_loras=8, max_lora_rank=16, max_queue=8))
    engine.start()
    yield engine
    engine.shutdown()
