"""Acceptance 4: the commands in deploy/README.md match the manifests and the CLI.

Every shell line in its code blocks is read: kubectl paths, namespaces, resources, Secret keys
and label selectors must exist in the rendered overlays; every `fovea` command must parse with
the real CLI parser; every repository path must exist.
"""

from __future__ import annotations

import re
import shlex

import pytest

from fovea.cli import build_parser
from fovea.cluster import ROOT
from tests.deploy.manifests import Obj, find, labels_match, secret_data, workloads

README = ROOT / "deploy" / "README.md"
KINDS = {
    "deployment": "Deployment",
    "deployments": "Deployment",
    "deploy": "Deployment",
    "svc": "Service",
    "service": "Service",
    "secret": "Secret",
    "statefulset": "StatefulSet",
    "sts": "StatefulSet",
    "hpa": "HorizontalPodAutoscaler",
    "pvc": "PersistentVolumeClaim",
    "pdb": "PodDisruptionBudget",
    "configmap": "ConfigMap",
    "cm": "ConfigMap",
    "networkpolicy": "NetworkPolicy",
}


def commands() -> list[list[str]]:
    """Each simple command of every bash code block, as tokens ($(...) substitutions included)."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", README.read_text(), re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # Command substitutions are commands too: $(kubectl ... | base64 -d)
            pieces = [line, *re.findall(r"\$\(([^()]*)\)", line)]
            for piece in pieces:
                lexer = shlex.shlex(piece, posix=True, punctuation_chars="|&;")
                lexer.whitespace_split = True
                current: list[str] = []
                for token in lexer:
                    if set(token) <= set("|&;"):
                        out.append(current)
                        current = []
                    else:
                        current.append(token)
                out.append(current)
    return [c for c in out if c]


def test_the_guide_has_the_required_sections() -> None:
    text = README.read_text()
    for heading in (
        "## Install on a GPU cluster",
        "## Scale workers",
        "## Redis high availability",
        "## Rotate keys",
        "## Roll out a new model version as a canary",
    ):
        assert heading in text
    tools = {c[0] for c in commands()}
    assert {"kubectl", "fovea", "docker", "helm"} <= tools


def test_fovea_commands_parse_with_the_real_cli() -> None:
    parser = build_parser()
    seen = []
    for cmd in commands():
        if cmd[0] != "fovea":
            continue
        try:
            args = parser.parse_args(cmd[1:])
        except SystemExit:
            pytest.fail(f"`{' '.join(cmd)}` does not parse with the fovea CLI")
        seen.append((args.command, getattr(args, "action", None)))
        if cmd[1:3] == ["model", "promote"] and "--canary" in cmd:
            assert args.canary > 0 and 0 < args.canary_weight < 100
    assert {("keys", "create"), ("keys", "revoke"), ("model", "promote"), ("model", "register")} <= set(seen)


def test_kubectl_commands_name_real_paths_namespaces_and_objects(rendered: dict[str, list[Obj]]) -> None:
    objs = [o for variant in rendered.values() for o in variant]
    namespaces = {o["metadata"]["name"] for o in find(objs, "Namespace")}
    checked = 0
    for cmd in commands():
        if cmd[0] != "kubectl":
            continue
        ns = next((cmd[i + 1] for i, t in enumerate(cmd) if t in ("-n", "--namespace")), None)
        if ns is not None:
            assert ns in namespaces, cmd
        for i, token in enumerate(cmd):
            if token == "-k":
                assert (ROOT / cmd[i + 1] / "kustomization.yaml").exists(), cmd
                checked += 1
            if token == "-l":
                selector = dict(kv.split("=", 1) for kv in cmd[i + 1].split(","))
                assert any(
                    labels_match(selector, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(objs)
                ), cmd
        refs = []
        values = {i + 1 for i, t in enumerate(cmd) if t in ("-k", "-f", "-p", "-o", "-l", "-n", "--namespace")}
        for i, token in enumerate(cmd[1:], 1):
            if i in values:
                continue
            kind, _, name = token.partition("/")
            if kind in KINDS and name:
                refs.append((KINDS[kind], name))
            elif token in KINDS and i + 1 < len(cmd) and not cmd[i + 1].startswith("-"):
                refs.append((KINDS[token], cmd[i + 1]))
        for kind, name in refs:
            found = [o for o in find(objs, kind, name) if ns is None or o["metadata"].get("namespace") == ns]
            assert found, f"{kind}/{name} in `{' '.join(cmd)}` is not in the rendered manifests"
            checked += 1
            for m in re.finditer(r"\{\.data\.([\w.-]+)\}", " ".join(cmd)):
                assert m.group(1) in secret_data(found[0]), cmd
    assert checked >= 10


def test_repository_paths_in_commands_exist() -> None:
    for cmd in commands():
        for token in cmd:
            if token.startswith("deploy/"):
                path = ROOT / token
                # Secret files are made by make-secrets.sh; their folder is git-ignored.
                if "/secrets" in token:
                    assert (ROOT / "deploy/k8s/overlays/gpu-prod/.gitignore").read_text().strip() == "secrets/"
                    continue
                assert path.exists(), token
