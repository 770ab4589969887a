"""README's five-minute tour, run as written: every ``bash`` block of its "Five-minute tour"
section, in order, in one shell, in a directory whose ``.data`` is a fresh ``tensafe serve
--dev``'s data directory, against that server (on the embedded engine). A command that fails
(curl's ``-f``: an HTTP error) fails the test, so the tour cannot rot."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.loadtest import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def tour_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Five-minute tour\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def test_readme_tour_runs_as_written(tmp_path):
    if shutil.which("curl") is None:
        pytest.fail("the tour needs curl on the PATH")
    blocks = tour_blocks()
    assert len(blocks) >= 5
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    server = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--dev", "--port", str(port),
                               "--data-dir", str(tmp_path / ".data"), "--max-num-seqs", "4", "--log-level", "warning"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, server, timeout_s=120)
        script = "set -euo pipefail\n" + "\n".join(blocks)
        run = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "URL": url, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
        out = run.stdout
        assert '"object":"chat.completion"' in out.replace(" ", "")
        assert "data: [DONE]" in out  # the stream
        assert re.search(r"x-tensafe-adapter: demo-support", out, re.I)  # auto chose by the expert table
        assert '"expert":"legal"' in out.replace(" ", "")
        assert '"id":"my-bot"' in out.replace(" ", "")  # the upload's answer
        assert "tensafe_ttft_seconds_count" in out
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
