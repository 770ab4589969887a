"""The LoRA slot kernel (engine.lora.native): built once per machine into its cache, each row
reading its own slot's rank only, and the gathered forms left in place when it cannot be built."""
from __future__ import annotations

import logging

import pytest
import torch

from engine.lora import native


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(scope="module")
def kernel(kernel_dir):
    k = native.load(kernel_dir)
    assert k is not None, "no C compiler: the slot kernel cannot be built here"
    return k


def test_built_once_into_the_cache_with_nothing_half_written(kernel, kernel_dir):
    built = sorted(p.name for p in kernel_dir.iterdir())
    assert len(built) == 1 and built[0].startswith("slot_lora-") and built[0].endswith(".so")
    mtime = (kernel_dir / built[0]).stat().st_mtime_ns
    native.load.cache_clear()  # a new process: found on disk, not rebuilt
    assert native.load(kernel_dir) is not None
    assert [p.name for p in kernel_dir.iterdir()] == built
    assert (kernel_dir / built[0]).stat().st_mtime_ns == mtime


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_reads_only_its_own_slot_s_rank(kernel, dtype):
    gen = torch.Generator().manual_seed(7)
    slots, R, fan_in, outs = 5, 8, 64, (48, 16)
    a = torch.randn((slots, len(outs) * R, fan_in), generator=gen).to(dtype)  # past a rank: not zero
    b = [torch.randn((slots, R, o), generator=gen).to(dtype) for o in outs]
    ranks = torch.tensor([8, 2, 5, 1, 4], dtype=torch.int32)
    p = native.plan([a[:, j * R : (j + 1) * R] for j in range(2)], b, [0, 48])
    rows = torch.tensor([3, 1, -1, 4, 0, 2, 1])
    x = torch.randn((len(rows), fan_in), generator=gen).to(dtype)
    base = torch.randn((len(rows), sum(outs)), generator=gen).to(dtype)
    out = base.clone()
    native.delta(kernel, x, rows, ranks, p, out)
    for i, s in enumerate(rows.tolist()):
        want = base[i].float().clone()
        if s >= 0:
            r = int(ranks[s])
            for j, col in enumerate((0, 48)):
                xa = a[s, j * R : j * R + r].float() @ x[i].float()
                want[col : col + outs[j]] += xa @ b[j][s, :r].float()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out[i].float(), want.to(dtype).float(), rtol=tol, atol=tol)
    assert torch.equal(out[2], base[2])  # the base model's row is left as it was


def test_a_non_contiguous_input_is_read_as_its_values(kernel):
    gen = torch.Generator().manual_seed(8)
    a = torch.randn((2, 4, 16), generator=gen)
    b = [torch.randn((2, 4, 8), generator=gen)]
    p = native.plan([a], b, [0])
    ranks = torch.tensor([4, 4], dtype=torch.int32)
    wide = torch.randn((3, 32), generator=gen)
    x = wide[:, ::2]  # every other column
    out, ref = torch.zeros(3, 8), torch.zeros(3, 8)
    rows = torch.tensor([1, 0, 1])
    native.delta(kernel, x, rows, ranks, p, out)
    native.delta(kernel, x.contiguous(), rows, ranks, p, ref)
    assert torch.equal(out, ref) and out.abs().sum() > 0


def test_tables_the_kernel_cannot_walk_are_refused():
    a = torch.zeros((2, 4, 16))
    with pytest.raises(ValueError, match="slot-major"):
        native.plan([a.transpose(1, 2)], [torch.zeros((2, 16, 8))], [0])
    with pytest.raises(ValueError, match="1 to 4 modules"):
        native.plan([a] * 5, [torch.zeros((2, 4, 8))] * 5, [0] * 5)
    with pytest.raises(ValueError, match="1 to 4 modules"):
        native.plan([a, a], [torch.zeros((2, 4, 8))], [0, 8])


def test_no_compiler_leaves_the_gathered_forms(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level(logging.INFO, logger="tensafe.engine"):
        assert native.load(tmp_path / "none") is None
    assert "no C compiler" in caplog.text and not (tmp_path / "none").exists()


def test_a_compiler_that_fails_leaves_no_library_behind(tmp_path, monkeypatch, caplog):
    cc = tmp_path / "bin" / "cc"
    cc.parent.mkdir()
    cc.write_text("#!/bin/sh\necho 'fake cc 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'cc: broken' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    with caplog.at_level(logging.WARNING, logger="tensafe.engine"):
        assert native.load(tmp_path / "cache") is None
    assert "gathered forms used instead" in caplog.text and "broken" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library, no temporary
