"""Acceptance 1: every overlay renders with `kubectl kustomize`, and every object validates offline
against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors).

The ServiceMonitor is a custom resource, for which kubernetes-validate has no schema: it is
validated against servicemonitor.schema.json, written here for the fields deploy/k8s uses.
"""

from __future__ import annotations

import copy
import json
import pathlib

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.manifests import Obj, find

# Native gRPC probes are GA since 1.27 and the Pod Security labels since 1.25: 1.28 is the oldest
# version the manifests promise to work on; the newest is the newest kubernetes-validate knows.
VERSIONS = ("1.28.0", kubernetes_validate.latest_version() + ".0")
CUSTOM = {"ServiceMonitor": pathlib.Path(__file__).with_name("servicemonitor.schema.json")}


def validate(obj: Obj, version: str) -> None:
    if obj["kind"] in CUSTOM:
        jsonschema.validate(obj, json.loads(CUSTOM[obj["kind"]].read_text()))
    else:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("variant", ["cpu-dev", "gpu-prod", "gpu-prod+external-redis"])
def test_every_object_validates_against_the_kubernetes_schemas(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    kinds = {o["kind"] for o in objs}
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceMonitor",
    } <= kinds
    assert ("StatefulSet" in kinds) == (variant != "gpu-prod+external-redis")
    errors = []
    for obj in objs:
        for version in VERSIONS:
            try:
                validate(obj, version)
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc}")
    assert not errors, "\n".join(errors)


def test_validation_is_strict_enough_to_catch_a_typo(rendered: dict[str, list[Obj]]) -> None:
    """The check above would be worthless if unknown or mistyped fields passed."""
    deployment = copy.deepcopy(find(rendered["gpu-prod"], "Deployment", "fovea-worker")[0])
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpcc"] = probe.pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, VERSIONS[-1])
    deployment = copy.deepcopy(find(rendered["gpu-prod"], "Deployment", "fovea-worker")[0])
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, VERSIONS[0])
    monitor = copy.deepcopy(find(rendered["gpu-prod"], "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, VERSIONS[-1])
