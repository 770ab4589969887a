"""The step thread keeps the process's only OpenMP team (engine.threads).

With GNU OpenMP, one idle team left on another long-lived thread makes every parallel op of
the step thread sleep and wake (decode steps ran 40-50% slower). A team is a set of native
threads, so the tests count the process's native threads; each runs in a fresh interpreter,
since pytest's own thread has long started a team of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from engine import confine, confined
from engine.threads import run_apart

COUNT = textwrap.dedent("""
    import os, threading, torch
    import time
    def native():  # once the threads that are ending have gone
        seen = [len(os.listdir("/proc/self/task"))]
        for _ in range(100):
            time.sleep(0.02)
            seen.append(len(os.listdir("/proc/self/task")))
            if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]:
                break
        return seen[-1]
    def parallel_work():  # large enough for torch to start a team
        x = torch.randn(1024, 1024)
        return float((x @ x).sum() + torch.nn.functional.silu(x).sum())
    def helper_threads(confined):
        # native threads a live helper adds once it ran parallel work: itself, plus its team
        from engine import confine
        done, go = threading.Event(), threading.Event()
        def helper():
            if confined:
                confine()
            parallel_work()
            done.set()
            go.wait()
        before = native()
        t = threading.Thread(target=helper)
        t.start()
        done.wait()
        added = native() - before
        go.set()
        t.join()
        return added
    """)


def run_script(body: str) -> dict:
    out = subprocess.run([sys.executable, "-c", COUNT + textwrap.dedent(body)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_thread_that_ran_parallel_work_keeps_a_team_unless_confined():
    # the premise: an unconfined helper's team outlives its work; a confined helper starts none
    got = run_script("""
        import json
        parallel_work()  # the main thread's team, first
        print(json.dumps({str(confined): helper_threads(confined) for confined in (False, True)}))
        """)
    assert got == {"False": 2, "True": 1}


def test_a_confined_thread_starts_no_team_after_a_process_wide_thread_count():
    # torch.set_num_threads also sets MKL's process-wide count, which MKL then follows instead of
    # the calling thread's OpenMP setting: confining sets MKL's count for the thread too
    got = run_script("""
        import json
        torch.set_num_threads(2)
        print(json.dumps({"extra": helper_threads(True)}))
        """)
    assert got == {"extra": 1}  # the helper alone


def test_an_engine_built_on_a_long_lived_thread_leaves_no_team_there(tmp_path):
    # built on the main thread, run, given a rank-64 adapter from the main thread, shut down:
    # while it runs, the extra native threads are the step thread's team; after, none remain
    got = run_script("""
        import asyncio, json
        from engine import AdapterConfig, ChatMessage, Engine, EngineConfig, GenerationRequest, SamplingParams
        before = native()
        engine = Engine(EngineConfig(max_num_seqs=2, max_model_len=128, max_lora_rank=64, max_loras=1))
        engine.start()
        from engine.threads import run_apart
        targets = ("gate_proj", "up_proj", "down_proj")
        def make():  # on a thread that ends: the tensors' own making starts no lasting team
            tensors = {}
            for layer in range(engine.dims.num_layers):
                for module in targets:
                    fan_in, fan_out = engine.dims.projection_shape(module)
                    prefix = f"base_model.model.model.layers.{layer}.mlp.{module}"
                    tensors[prefix + ".lora_A.weight"] = torch.randn(64, fan_in) * 0.01
                    tensors[prefix + ".lora_B.weight"] = torch.randn(fan_out, 64) * 0.01
            return tensors
        tensors = run_apart(make, "make")
        engine.load_adapter("big", tensors, AdapterConfig(64, 64, targets))
        async def one():
            request = GenerationRequest("r", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                                        messages=[ChatMessage("user", "Hello")], adapter_id="big")
            async for _ in engine.generate(request):
                pass
        asyncio.run(one())
        running = native() - before
        engine.shutdown()
        print(json.dumps({"running": running, "team": torch.get_num_threads(), "after": native() - before}))
        """)
    # step thread + (team size - 1) workers; nothing left on the main thread or after shutdown
    assert got["running"] == got["team"] == 2
    assert got["after"] == 0


def test_confined_runs_single_threaded_and_restores():
    seen = {}

    def body():
        seen["outer"] = torch.get_num_threads()
        with confined():
            seen["inner"] = torch.get_num_threads()
        seen["restored"] = torch.get_num_threads()
        confine()
        seen["confined"] = torch.get_num_threads()

    run_apart(body, "test-confined")
    assert seen["inner"] == 1 and seen["confined"] == 1
    assert seen["restored"] == seen["outer"]
    assert torch.get_num_threads() == seen["outer"]  # other threads are not touched


def test_run_apart_returns_and_raises():
    assert run_apart(lambda: 41 + 1, "test-apart") == 42

    def fails():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_apart(fails, "test-apart")
