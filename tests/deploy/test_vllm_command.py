"""The vLLM pod's command chain, run for real outside Kubernetes: the init container's script
(as rendered, with the environment the kubelet would give it) runs ``tensafe vllm-command`` on
the ConfigMap's TENSAFE_VLLM_* settings and writes the serve script; the vLLM container's
command sources it. A stand-in ``vllm`` on the PATH records what it was started with, which
must be exactly what those settings make (``gateway.backends.vllm_server.vllm_command``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gateway.backends.vllm_server import vllm_command
from gateway.settings import Settings

from .render import container, environment, one
from .test_manifests import make_secrets

FAKE_VLLM = """#!/bin/sh
printf '%s\\n' "$@" > "$RECORD/argv"
env > "$RECORD/env"
echo $$ > "$RECORD/pid"
"""


def test_the_vllm_container_runs_what_the_vllm_settings_make(tmp_path: Path):
    secrets = {(n, k): v for n, keys in make_secrets.fresh().items() for k, v in keys.items()}
    deployment = one("vllm", "Deployment", "tensafe-vllm")
    init, vllm = container(deployment, "vllm-command"), container(deployment, "vllm")
    assert init["command"] == ["sh", "-c"] and vllm["command"][:2] == ["/bin/sh", "-c"]
    init_env = environment("vllm", init, secrets)
    # the script the vLLM container sources is the one the init container writes, on a volume
    # both mount at the same place
    script = Path(init_env["SERVE_SCRIPT"])
    assert vllm["command"][2] == f". {script}"
    shared = {m["name"] for m in init["volumeMounts"] if Path(m["mountPath"]) == script.parent}
    assert shared and shared == {m["name"] for m in vllm["volumeMounts"] if Path(m["mountPath"]) == script.parent}
    models = Path(init_env["TENSAFE_MODEL_CACHE"])
    assert {m["mountPath"] for m in vllm["volumeMounts"]} >= {str(models), str(script.parent)}

    # this machine's stand-ins for the pod's paths: the image's converted model, the volumes
    image_models = tmp_path / "image-models" / "smollm2-135m-instruct"
    image_models.mkdir(parents=True)
    (image_models / "model.safetensors").write_bytes(b"")  # the converted checkpoint's marker
    (image_models / "config.json").write_text("{}")
    here = {"IMAGE_MODELS": str(image_models.parent), "TENSAFE_MODEL_CACHE": str(tmp_path / "models"),
            "SERVE_SCRIPT": str(tmp_path / "run" / "serve.sh")}
    for d in ("models", "run", "bin", "record"):
        (tmp_path / d).mkdir()
    (tmp_path / "bin" / "vllm").write_text(FAKE_VLLM)
    (tmp_path / "bin" / "vllm").chmod(0o755)
    path = f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin"
    env = {**init_env, **here, "PATH": path, "HOME": str(tmp_path)}
    done = subprocess.run(["sh", "-c", init["args"][0]], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()  # copied from the image

    vllm_env = {**environment("vllm", vllm, secrets), "PATH": path, "RECORD": str(tmp_path / "record")}
    proc = subprocess.Popen(["/bin/sh", "-c", f". {here['SERVE_SCRIPT']}"], env=vllm_env)
    assert proc.wait(60) == 0
    # exec'd: vLLM is the container's first process, so it gets the SIGTERM itself
    assert int((tmp_path / "record" / "pid").read_text()) == proc.pid

    expected = vllm_command(Settings.load(env=env))
    argv = (tmp_path / "record" / "argv").read_text().splitlines()
    assert ["vllm", *argv] == list(expected.argv)
    assert argv[1] == str(tmp_path / "models" / "smollm2-135m-instruct")
    settings = Settings.load(env=init_env)
    for flag, value in (("--max-loras", settings.vllm.max_loras), ("--port", settings.vllm.port),
                        ("--host", "0.0.0.0"), ("--gpu-memory-utilization", settings.vllm.gpu_memory_utilization)):
        assert argv[argv.index(flag) + 1] == str(value)
    recorded = dict(line.split("=", 1) for line in (tmp_path / "record" / "env").read_text().splitlines() if "=" in line)
    for k, v in expected.env.items():
        assert recorded[k] == v
    assert recorded["VLLM_API_KEY"] == secrets[("tensafe-vllm-api-key", "api-key")]
    assert "VLLM_TARGET_DEVICE" not in recorded  # a GPU server, not the CPU build
    # nothing secret went through the init container (its log prints the script)
    assert secrets[("tensafe-vllm-api-key", "api-key")] not in Path(here["SERVE_SCRIPT"]).read_text()
    assert "TENSAFE_VLLM_API_KEY" not in init_env and not os.environ.get("RECORD")
