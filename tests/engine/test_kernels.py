"""Kernels compiled in the background (engine.kernels): the compiled decode attention gives the
decode step SDPA's results, and once it is ready a step never compiles anything itself."""
from __future__ import annotations

import logging
import threading

import pytest
import torch
from torch._dynamo.callback import callback_handler

from engine import Engine, EngineConfig
from engine.kernels import BackgroundKernels


@pytest.fixture(scope="module")
def fp32_model(checkpoint):
    engine = Engine(EngineConfig(model=str(checkpoint), dtype="float32", max_num_seqs=8, max_model_len=1024,
                                 prefix_cache_tokens=0, max_loras=1))
    gen = torch.Generator().manual_seed(0)
    for k, v in zip(engine.model.cache.k, engine.model.cache.v, strict=True):
        k.copy_(torch.randn(k.shape, generator=gen))  # cached keys and values to attend over
        v.copy_(torch.randn(v.shape, generator=gen))
    return engine.model


def test_compiled_decode_attention_gives_sdpas_results_and_steps_never_compile(fp32_model):
    model, kernels = fp32_model, fp32_model.kernels
    assert kernels is not None and kernels.enabled
    assert model._attention_kernel(8, 300) is None  # asked for: compiling in the background
    # SDPA's cases: one row, a small batch, the whole cache
    assert model._attention_kernel(1, 1000) is None and model._attention_kernel(4, 100) is None
    assert kernels.wait(600) and kernels.ready == [("decode_attention", torch.float32, "cpu")]

    compiles: list[str] = []
    callback = callback_handler.register_start_callback(lambda _: compiles.append(threading.current_thread().name))
    gen = torch.Generator().manual_seed(1)
    try:
        assert model._attention_kernel(8, 1024) is None
        for n, ctx in ((3, 1023), (8, 300), (5, 700), (4, 600), (8, 257)):
            assert model._attention_kernel(n, ctx) is not None
            tokens = torch.randint(0, 1000, (n,), generator=gen)
            positions = torch.randint(ctx // 2, ctx, (n,), generator=gen)
            positions[0] = ctx - 1
            compiled = model.decode(tokens, positions, ctx, None)
            model.kernels = None
            try:
                reference = model.decode(tokens, positions, ctx, None)
            finally:
                model.kernels = kernels
            torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    finally:
        callback_handler.remove_start_callback(callback)
    assert compiles == []  # every size above ran on the one kernel compiled in the background


def test_a_kernel_that_cannot_compile_leaves_eager_in_place(caplog):
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("cannot be traced")

    kernels = BackgroundKernels()
    if not kernels.enabled:
        pytest.fail("no C++ compiler: the compiled kernels are off on this machine")
    with caplog.at_level(logging.WARNING, logger="tensafe.engine"):
        assert kernels.get(("broken",), broken, lambda: [torch.zeros(3, 2)], ((0, 0),)) is None
        assert kernels.wait(120)
    assert kernels.get(("broken",), broken, lambda: [torch.zeros(3, 2)], ((0, 0),)) is None
    assert kernels.ready == []
    assert "eager kernels used instead" in caplog.text


def test_kernels_switched_off_are_never_asked_for():
    kernels = BackgroundKernels(enabled=False)
    assert kernels.get(("any",), torch.sin, lambda: [torch.zeros(3)], ((0, 0),)) is None
    assert kernels.wait(0) and kernels.ready == []
