"""Static checks of the Dockerfiles, the pinned requirement lists and the compose file.

There is no Docker engine here, so the images are not built by these tests. What is checked is
what can be read: pinned bases, multi-stage layout, a numeric non-root USER, generated code made at
build time, complete pinned requirements with no torch, one ONNX Runtime per image, and that the
manifests and compose run the command each image declares.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field

import pytest
import yaml
from packaging.requirements import Requirement

from fovea.cluster import ROOT
from tests.deploy.manifests import SERVICES, Obj, containers, workloads

DOCKER = ROOT / "deploy" / "docker"
IMAGES = {"gateway": "base", "registry": "cpu", "worker-cpu": "cpu", "worker-gpu": "gpu"}
BANNED = ("torch", "torchvision", "torchaudio", "tensorflow", "jax")


@dataclass
class Stage:
    base: str
    name: str
    lines: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)


def parse(path: str) -> tuple[dict[str, str], list[Stage]]:
    """ARG defaults before the first FROM, and the stages with their instructions."""
    text = (DOCKER / path).read_text()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        op, _, rest = line.strip().partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k] = v
        elif op == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            stages.append(Stage(base, parts[2] if len(parts) > 2 else ""))
        else:
            stages[-1].lines.append((op, rest))
    return args, stages


def requirements(name: str) -> dict[str, str]:
    """name -> pinned version, following -r includes."""
    out: dict[str, str] = {}
    for line in (DOCKER / "requirements" / f"{name}.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            out.update(requirements(line[3:].removesuffix(".txt")))
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", line)
        assert m, f"{name}.txt: {line!r} is not pinned with =="
        out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_is_multi_stage_pinned_and_non_root(image: str) -> None:
    _, stages = parse(f"{image}.Dockerfile")
    assert len(stages) >= 2 and stages[0].name == "build"
    for stage in stages:
        name, _, tag = stage.base.rpartition(":")
        assert name and re.match(r"^\d+\.\d+\.\d+", tag) and "latest" not in tag, stage.base
    final = stages[-1]
    assert any(op == "COPY" and "--from=build" in rest for op, rest in final.lines)
    users = [rest for op, rest in final.lines if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "numeric non-root USER, so runAsNonRoot can check"
    assert [op for op, _ in final.lines].index("USER") > max(i for i, (op, _) in enumerate(final.lines) if op == "RUN")
    build_runs = " ".join(rest for op, rest in stages[0].lines if op == "RUN")
    assert "python -m fovea.codegen" in build_runs, "generated code is made at build time"
    assert "compileall" in build_runs
    final_runs = " ".join(rest for op, rest in final.lines if op == "RUN")
    assert "codegen.is_stale()" in final_runs, "the run stage checks the stubs survived the copy"
    assert not re.search(r"pip install(?!.*--no-deps)", build_runs), "installs must be --no-deps from the lock"
    assert not any(op == "RUN" and "pip install" in rest for op, rest in final.lines), "no installs in the run stage"
    assert f"/tmp/requirements/{IMAGES[image]}.txt" in build_runs
    assert not any(word in (DOCKER / f"{image}.Dockerfile").read_text().lower() for word in ("[train]", ",train"))


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_copies_only_what_its_dockerignore_lets_in(image: str) -> None:
    _, stages = parse(f"{image}.Dockerfile")
    allowed = [
        line[1:].rstrip("/")
        for line in (DOCKER / f"{image}.Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    assert (DOCKER / f"{image}.Dockerfile.dockerignore").read_text().splitlines()[1] == "*"
    for stage in stages:
        for op, rest in stage.lines:
            if op != "COPY" or "--from=" in rest:
                continue
            *sources, _ = shlex.split(rest)
            for src in sources:
                assert (ROOT / src).exists(), src
                assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), src


@pytest.mark.parametrize("image", IMAGES)
def test_requirements_are_complete_pinned_and_torch_free(image: str) -> None:
    pins = requirements(IMAGES[image])
    assert not [p for p in pins if p in BANNED or p.startswith("nvidia-cu")], "no torch, no CUDA wheels"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} (a dependency in pyproject.toml) is not pinned for {image}"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(req.specifier))
    runtimes = {p for p in pins if p in ("onnxruntime", "onnxruntime-gpu")}
    want = {
        "gateway": set(),
        "registry": {"onnxruntime"},
        "worker-cpu": {"onnxruntime"},
        "worker-gpu": {"onnxruntime-gpu"},
    }[image]
    assert runtimes == want, "exactly one ONNX Runtime package: both share one import folder"
    for extra in runtimes:
        spec = next(
            Requirement(r) for r in project["optional-dependencies"]["cpu" if extra == "onnxruntime" else "gpu"]
        )
        assert spec.specifier.contains(pins[extra])


def test_gpu_worker_runs_on_a_cuda_runtime_matching_onnxruntime_gpu() -> None:
    _, stages = parse("worker-gpu.Dockerfile")
    version = requirements("gpu")["onnxruntime-gpu"]
    for stage in stages:
        name, _, tag = stage.base.rpartition(":")
        assert name == "nvidia/cuda" and "cudnn" in tag and "runtime" in tag, stage.base
        # onnxruntime-gpu 1.31 links CUDA 13 (libcublasLt.so.13) and cuDNN 9 (FACTS.md section 2).
        if version.startswith("1.31."):
            assert tag.startswith("13."), tag


def test_manifests_run_the_command_their_image_declares(rendered: dict[str, list[Obj]]) -> None:
    cmds = {}
    for image in IMAGES:
        _, stages = parse(f"{image}.Dockerfile")
        cmd = [rest for op, rest in stages[-1].lines if op == "CMD"][-1]
        cmds[f"fovea-{image}"] = yaml.safe_load(cmd)
        exposed = {int(p) for op, rest in stages[-1].lines if op == "EXPOSE" for p in rest.split()}
        cmds[f"fovea-{image}-ports"] = sorted(exposed)
    for variant in ("cpu-dev", "gpu-prod"):
        for w in workloads(rendered[variant]):
            for c in containers(w):
                if c["name"] not in SERVICES:
                    continue
                image = c["image"].rsplit("/", 1)[-1].rsplit(":", 1)[0]
                assert c["command"] == cmds[image], (variant, image)
                assert sorted(p["containerPort"] for p in c["ports"]) == cmds[f"{image}-ports"]


def test_compose_file_matches_the_images_and_settings() -> None:
    from fovea.config import BaseConfig
    from gateway.config import GatewayConfig
    from registry.config import RegistryConfig
    from worker.config import WorkerConfig

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    classes: dict[str, type[BaseConfig]] = {
        "registry": RegistryConfig,
        "worker": WorkerConfig,
        "gateway": GatewayConfig,
    }
    for name, config in classes.items():
        svc = compose["services"][name]
        dockerfile = ROOT / "deploy" / svc["build"]["context"] / svc["build"]["dockerfile"]
        assert dockerfile.resolve().exists(), dockerfile
        _, stages = parse(dockerfile.name)
        assert svc["command"] == yaml.safe_load([r for op, r in stages[-1].lines if op == "CMD"][-1])
        assert svc["read_only"] is True and svc["user"] != "0" and svc["cap_drop"] == ["ALL"]
        prefix = SERVICES[name]
        for var, value in svc["environment"].items():
            assert var.startswith(prefix) and var[len(prefix) :].lower() in config.model_fields, var
            if var.endswith(("_TOKEN", "_TOKENS")):  # no default: compose refuses to start without one
                assert value.startswith("${FOVEA_TOKEN_") and ":?" in value, var
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), "published on loopback only"
