"""infra/k8s/experiment-rayjob.yaml: the KubeRay RayJob that runs `pneumo experiment
--executor ray`, checked offline against KubeRay's own schema (vendored next to this file,
see kuberay-rayjob-v1.schema.SOURCE.md) and its pod templates against Kubernetes'."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
import string
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import sample_data
import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "infra" / "k8s" / "experiment-rayjob.yaml"
SCHEMA = Path(__file__).with_name("kuberay-rayjob-v1.schema.json.gz")
K8S_VERSION = "1.30.0"  # as tests/infra/test_deploy.py

try:
    import kubernetes_validate  # a dev dependency: pip install -e '.[dev]'
except ImportError:
    if sample_data.in_ci():
        raise
    pytest.skip(
        "kubernetes-validate is not installed: pip install -e '.[dev]'", allow_module_level=True
    )

VALUES = {
    "NAME": "ptx-report",
    "IMAGE": "registry.example/pneumo:1.2",
    "RAY_VERSION": "2.60.0",
    "DATASET": "s3://pneumo/datasets/siim-nih",
    "EXP": "s3://pneumo/experiments/report-1",
    "RECIPE": "report",
    "S3_SECRET": "pneumo-s3",
    "WORKERS": "2",
    "GPUS": "4",
    "CPUS": "36",
    "MEMORY": "128Gi",
    "SHM": "16Gi",
}


def rendered(**values: str) -> dict[str, Any]:
    text = string.Template(TEMPLATE.read_text()).substitute({**VALUES, **values})
    return yaml.safe_load(text)


def strict(schema: Any) -> Any:
    """The schema as the API server applies it with strict field validation (kubectl's
    default): an object that lists its properties takes no others."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = strict(json.loads(gzip.decompress(SCHEMA.read_bytes())))
    # CRD schemas are OpenAPI v3.0 (JSON Schema draft 4 with extensions, ignored here)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"] for group in groups]


def test_the_rayjob_passes_kuberays_schema_and_a_wrong_type_does_not(validator) -> None:
    job = rendered()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    validator.validate(job)
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        validator.validate(wrong_type)
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validator.validate(typo)


def test_its_pod_templates_pass_the_kubernetes_schema() -> None:
    templates = pod_templates(rendered())
    assert len(templates) == 2
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        kubernetes_validate.validate({**pod, "template": template}, K8S_VERSION, strict=True)
    broken = copy.deepcopy(templates[1])
    broken["spec"]["containers"][0]["resources"]["limits"] = ["cpu"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**pod, "template": broken}, K8S_VERSION, strict=True)


def test_it_runs_the_experiment_on_ray_with_s3_and_credentials_from_the_secret() -> None:
    from typer.main import get_command

    from pneumo.cli import app

    job = rendered()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["pneumo", "experiment"]
    command = get_command(app).commands["experiment"]  # type: ignore[attr-defined]
    params = command.make_context("experiment", argv[2:]).params  # parsed as the CLI would
    assert params["executor"] == "ray" and params["out"] == VALUES["EXP"]
    assert params["dataset"] == VALUES["DATASET"] and params["recipe"] == "report"
    for template in pod_templates(job):
        (container,) = template["spec"]["containers"]
        assert container["image"] == VALUES["IMAGE"]
        assert container["envFrom"] == [{"secretRef": {"name": VALUES["S3_SECRET"]}}]
        assert "env" not in container  # nothing inline: no key can leak from this file
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 2
    (container,) = worker["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"] == container["resources"]["limits"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # stages run on the workers only


def test_the_template_has_no_stray_placeholder_and_no_inline_secret() -> None:
    text = TEMPLATE.read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    assert used == set(VALUES)
    assert text.count("$") == len(re.findall(r"\$\{[A-Z0-9_]+\}", text))  # no stray $
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret" not in text.lower()
