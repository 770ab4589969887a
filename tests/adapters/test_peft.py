from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.base_model import BaseModelSpec
from adapters.errors import BaseModelConfigError, InvalidAdapter
from adapters.limits import Limits
from adapters.lora import LoraConfig
from adapters.peft import read_peft_dir, validate_adapter
from adapters.validate import lora_tensor_name

from .builders import SMOLLM2, SMOLLM2_2L, lora_tensors, peft_config, write_peft_dir

QV = ("q_proj", "v_proj")


def _read(tmp_path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    return read_peft_dir(write_peft_dir(tmp_path / "a", config, tensors))


def test_reads_and_validates_output_of_peft_save_pretrained(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            vocab_size=128)
    torch.manual_seed(0)
    model = peft.get_peft_model(LlamaForCausalLM(hf_config), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
        init_lora_weights=False))
    model.save_pretrained(tmp_path / "out")
    config, tensors = read_peft_dir(tmp_path / "out")
    base = BaseModelSpec.from_hf_config("tiny-llama", hf_config.to_dict())
    validate_adapter(config, tensors, base, Limits())
    assert (config.rank, config.alpha, config.target_modules) == (4, 8, ("down_proj", "q_proj", "v_proj"))
    assert len(tensors) == 2 * 3 * 2
    expected = model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    assert torch.equal(tensors[lora_tensor_name(1, "v_proj", "B")], expected.detach())


def test_base_model_spec_from_real_checkpoint_config(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    spec = BaseModelSpec.from_hf_config(SMOLLM2.model_id, config)
    assert spec == SMOLLM2
    assert spec.projection_shape("k_proj") == (576, 192)
    assert spec.projection_shape("down_proj") == (1536, 576)


def test_base_model_config_without_a_needed_field_is_refused() -> None:
    with pytest.raises(BaseModelConfigError, match="intermediate_size"):
        BaseModelSpec.from_hf_config("m", {"hidden_size": 64, "num_attention_heads": 4,
                                           "num_hidden_layers": 2})


def test_full_smollm2_adapter_on_all_projections_validates(tmp_path: Path) -> None:
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    config, tensors = _read(tmp_path, peft_config(8, modules), lora_tensors(SMOLLM2, 8, modules))
    validate_adapter(config, tensors, SMOLLM2, Limits())


@pytest.mark.parametrize(("setting", "message"), [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias 'lora_only'"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"target_modules": "all-linear"}, "pattern"),
    ({"init_lora_weights": "pissa"}, "changes the base weights"),
    ({"future_feature": {"on": True}}, "unknown PEFT setting 'future_feature'"),
])
def test_unsupported_peft_features_are_refused_by_name(tmp_path: Path, setting: dict[str, Any],
                                                      message: str) -> None:
    with pytest.raises(InvalidAdapter, match=message):
        _read(tmp_path, peft_config(4, QV, **setting), lora_tensors(SMOLLM2_2L, 4, QV))


def _validate(config: LoraConfig, tensors: dict[str, torch.Tensor],
              base: BaseModelSpec | None = SMOLLM2_2L, limits: Limits = Limits()) -> None:
    validate_adapter(config, tensors, base, limits)


def test_wrong_lora_b_shape_is_refused_with_expected_shape() -> None:
    tensors = lora_tensors(SMOLLM2_2L, 4, QV)
    tensors[lora_tensor_name(1, "v_proj", "B")] = torch.zeros(576, 4, dtype=torch.bfloat16)
    with pytest.raises(InvalidAdapter, match=r"layers\.1\.self_attn\.v_proj\.lora_B.*\[576, 4\], expected \[192, 4\]"):
        _validate(LoraConfig(4, 8, QV), tensors)


def test_lora_a_with_another_rank_is_refused() -> None:
    tensors = lora_tensors(SMOLLM2_2L, 4, QV)
    tensors[lora_tensor_name(0, "q_proj", "A")] = torch.zeros(8, 576, dtype=torch.bfloat16)
    with pytest.raises(InvalidAdapter, match=r"lora_A must be r x in_features, r=4"):
        _validate(LoraConfig(4, 8, QV), tensors, base=None)


def test_unknown_target_module_is_refused() -> None:
    with pytest.raises(InvalidAdapter, match="target module 'lm_head' is not supported"):
        _validate(LoraConfig(4, 8, ("lm_head", "q_proj")), lora_tensors(SMOLLM2_2L, 4, ("q_proj",)))


def test_rank_above_the_limit_is_refused_with_both_numbers() -> None:
    with pytest.raises(InvalidAdapter, match="rank 16 exceeds max_rank 8"):
        _validate(LoraConfig(16, 8, QV), lora_tensors(SMOLLM2_2L, 16, QV), limits=Limits(max_rank=8))


def test_disallowed_dtype_is_refused() -> None:
    tensors = lora_tensors(SMOLLM2_2L, 4, QV)
    name = lora_tensor_name(0, "q_proj", "A")
    tensors[name] = tensors[name].to(torch.float64)
    with pytest.raises(InvalidAdapter, match="dtype torch.float64"):
        _validate(LoraConfig(4, 8, QV), tensors)


def test_extra_tensor_is_refused_by_name() -> None:
    tensors = lora_tensors(SMOLLM2_2L, 4, QV)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    with pytest.raises(InvalidAdapter, match="unexpected tensor 'base_model.model.lm_head.weight'"):
        _validate(LoraConfig(4, 8, QV), tensors)


def test_tensor_of_module_outside_target_modules_is_refused() -> None:
    tensors = lora_tensors(SMOLLM2_2L, 4, ("q_proj", "v_proj", "k_proj"))
    with pytest.raises(InvalidAdapter, match="module 'k_proj' is not in target_modules"):
        _validate(LoraConfig(4, 8, QV), tensors)


def test_missing_layer_is_refused() -> None:
    tensors = lora_tensors(SMOLLM2_2L, 4, QV)
    del tensors[lora_tensor_name(1, "q_proj", "B")]
    with pytest.raises(InvalidAdapter, match=r"missing tensor .*layers\.1\.self_attn\.q_proj\.lora_B"):
        _validate(LoraConfig(4, 8, QV), tensors)


def test_adapter_for_a_deeper_model_is_refused() -> None:
    tensors = lora_tensors(SMOLLM2, 4, QV)
    with pytest.raises(InvalidAdapter, match="layer 2 does not exist"):
        _validate(LoraConfig(4, 8, QV), tensors)


def test_pickle_only_directory_is_refused_without_loading(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps(peft_config(4, QV)))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(InvalidAdapter, match="pickle"):
        read_peft_dir(tmp_path)


def test_corrupt_safetensors_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps(peft_config(4, QV)))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"not json")
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file"):
        read_peft_dir(tmp_path)
