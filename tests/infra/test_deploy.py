"""The deployment files in infra/: Kubernetes templates checked against the API schema,
the Dockerfile's layering and user, the MinIO compose file's exposure and credentials."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sample_data
import yaml
from project import PACKAGE_DIR

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
# The schema of the oldest Kubernetes release the templates target (Indexed Jobs, pod
# subdomains, ttlSecondsAfterFinished are all older); strict: unknown fields are errors.
K8S_VERSION = "1.30.0"

try:
    import kubernetes_validate  # a dev dependency: pip install -e '.[dev]'
except ImportError:
    if sample_data.in_ci():
        raise
    pytest.skip(
        "kubernetes-validate is not installed: pip install -e '.[dev]'", allow_module_level=True
    )


def _render_module():
    spec = importlib.util.spec_from_file_location("k8s_render", INFRA / "k8s" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


def _docs(template: str, *extra: str) -> list[dict]:
    argv = [template, "--image", "registry.example/pneumo:1.2", "--dataset", "s3://d/siim"]
    argv += ["--run", "s3://r/run1", *extra]
    args = render.parse_args(argv)
    return list(yaml.safe_load_all(render.render(args.template, render.variables(args))))


def _job(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "Job")


def _container(docs: list[dict]) -> dict:
    (container,) = _job(docs)["spec"]["template"]["spec"]["containers"]
    return container


def _after(flag: str, argv: list[str]) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("template", ["single", "multi"])
def test_templates_pass_the_kubernetes_schema(template):
    docs = _docs(template, "--gpus", "4", "--", "--size", "512")
    assert {d["kind"] for d in docs} == ({"Job"} if template == "single" else {"Job", "Service"})
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # ... and the validator does reject what a typo would make.
    broken = _job(docs)
    broken["spec"]["completion"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_gpus_and_nodes_are_set_once_and_land_everywhere():
    docs = _docs("multi", "--gpus", "3", "--nodes", "5", "--loader-workers", "4")
    job, container = _job(docs), _container(docs)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 5
    assert _after("--nnodes", container["command"]) == "5"
    assert _after("--nproc-per-node", container["command"]) == "3"
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    assert resources["limits"]["nvidia.com/gpu"] == 3
    assert resources["limits"]["cpu"] == str(3 * (4 + 1))  # a core per process and per worker
    assert _after("--workers", container["args"]) == "4"
    single = _container(_docs("single", "--gpus", "2"))
    assert _after("--nproc-per-node", single["command"]) == "2"
    assert single["resources"]["limits"]["nvidia.com/gpu"] == 2


@pytest.mark.parametrize("template", ["single", "multi"])
def test_the_image_and_data_are_parameters_and_training_resumes_itself(template):
    container = _container(_docs(template, "--", "--size", "512", "--epochs", "40"))
    assert container["image"] == "registry.example/pneumo:1.2"
    assert container["args"][:5] == ["train", "segment", "s3://d/siim", "--out", "s3://r/run1"]
    assert _after("--resume", container["args"]) == "auto"  # a fresh job starts, a retry resumes
    assert container["args"][-4:] == ["--size", "512", "--epochs", "40"]
    assert container["command"][-1] == "/usr/local/bin/pneumo"  # where the image installs it
    assert "${" not in yaml.safe_dump(container)


def test_multi_node_pods_find_the_rendezvous_host_through_the_headless_service():
    docs = _docs("multi", "--name", "ptx-a", "--nodes", "3")
    service = next(d for d in docs if d["kind"] == "Service")
    job = _job(docs)
    pod = job["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert job["spec"]["completionMode"] == "Indexed"  # pods ptx-a-0, ptx-a-1, ptx-a-2
    assert pod["spec"]["subdomain"] == service["metadata"]["name"] == "ptx-a"
    command = _container(docs)["command"]
    assert _after("--rdzv-backend", command) == "c10d"
    host, port = _after("--rdzv-endpoint", command).split(":")
    assert host == "ptx-a-0.ptx-a"  # pod 0's name in the Service's subdomain
    assert int(port) == service["spec"]["ports"][0]["port"]


def _ingest_docs(*extra: str) -> list[dict]:
    argv = ["ingest", "--image", "registry.example/pneumo:1.2", "--dataset", "s3://d/siim"]
    argv += ["--source", "s3://a/siim/dicom-images-train", "--labels-url", "s3://a/rle.csv"]
    args = render.parse_args([*argv, "--batch", "dec", *extra])
    return list(yaml.safe_load_all(render.render(args.template, render.variables(args))))


def test_the_ingest_job_gives_each_pod_one_part_of_the_archive():
    docs = _ingest_docs("--parts", "6", "--workers", "3", "--", "--nih-xref", "/x.csv")
    (job,) = docs
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"  # each pod gets JOB_COMPLETION_INDEX
    assert spec["completions"] == spec["parallelism"] == 6
    container = _container(docs)
    args = container["args"]
    assert args[:5] == ["ingest", "siim", "s3://a/siim/dicom-images-train", "--out", "s3://d/siim"]
    assert _after("--part", args) == "index/6" and _after("--batch", args) == "dec"
    assert _after("--labels", args) == "/inputs/labels.csv" and args[-2:] == [
        "--nih-xref",
        "/x.csv",
    ]
    (init,) = spec["template"]["spec"]["initContainers"]
    assert init["command"][-2:] == ["s3://a/rle.csv", "/inputs/labels.csv"]
    assert container["resources"]["limits"]["cpu"] == "3"
    assert "${" not in yaml.safe_dump(job)
    base = ["ingest", "--image", "i:1", "--dataset", "s3://d/x", "--source", "s3://a/b"]
    assert render.main([*base, "--labels-url", "s3://a/l", "--batch", "b", "--parts", "0"]) == 1
    assert render.main([*base, "--batch", "b"]) == 1  # no label file


def test_render_refuses_what_cannot_work(capsys):
    with pytest.raises(SystemExit):  # no image
        render.parse_args(["single", "--dataset", "s3://d/x", "--run", "s3://r/y"])
    base = ["--image", "i:1", "--dataset", "s3://d/x", "--run", "s3://r/y"]
    assert render.main(["multi", *base, "--nodes", "1"]) == 1
    assert render.main(["single", *base, "--name", "Bad_Name"]) == 1
    assert render.main(["single", *base, "--image", "i:1\nkind: Pod"]) == 1
    assert "error: " in capsys.readouterr().err


def test_templates_use_only_the_variables_render_fills():
    for template, path in render.TEMPLATES.items():
        argv = [template, "--image", "i", "--dataset", "d", "--run", "r", "--source", "s"]
        args = render.parse_args([*argv, "--labels-url", "l", "--batch", "b"])
        known = set(render.variables(args))
        text = path.read_text()
        used = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
        assert used <= known and text.count("$") == len(re.findall(r"\$\{[A-Z0-9_]+\}", text))


def test_render_runs_as_a_script():
    proc = subprocess.run(
        [sys.executable, str(INFRA / "k8s" / "render.py"), "single", "--image", "i:1"]
        + ["--dataset", "s3://d/x", "--run", "s3://r/y"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert yaml.safe_load(proc.stdout)["kind"] == "Job"


# ------------------------------------------------------------------------------ Dockerfile


def _instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_installs_dependencies_before_the_code_and_runs_unprivileged():
    steps = _instructions()
    packages = sorted(PACKAGE_DIR.values())  # the folders pneumo's parts live in
    copied = [args.split()[0] for op, args in steps if op == "COPY"]
    assert sorted(set(copied) & set(packages)) == packages  # every package is in the image
    first_code = min(
        i for i, (op, args) in enumerate(steps) if op == "COPY" and args.split()[0] in packages
    )
    deps = next(i for i, (op, args) in enumerate(steps) if op == "RUN" and "requirements" in args)
    assert deps < first_code
    assert [args for op, args in steps if op == "COPY"][0] == "pyproject.toml ./"
    user = [(i, args) for i, (op, args) in enumerate(steps) if op == "USER"]
    assert user and user[-1][1].split(":")[0] not in ("0", "root")
    assert user[-1][0] < next(i for i, (op, _) in enumerate(steps) if op == "ENTRYPOINT")
    env = " ".join(args for op, args in steps if op == "ENV")
    assert "PYTHONUNBUFFERED=1" in env


def test_dockerfile_dependency_list_is_the_projects(tmp_path):
    """The RUN step's one-liner, run on our pyproject.toml, lists exactly its dependencies."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, like the image
    run = next(args for op, args in _instructions() if op == "RUN" and "requirements" in args)
    code = re.search(r'python -c "(.*?)"\s*>', run).group(1)  # as the shell passes it
    (tmp_path / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()  # one requirement a line (markers hold spaces)
    wanted = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out == wanted and "torch>=2.3" in out


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        """Docker's rule, enough for these patterns: a path is out if it or a parent matches."""
        parts = path.split("/")
        for prefix in ("/".join(parts[:i]) for i in range(1, len(parts) + 1)):
            for pattern in (p.rstrip("/") for p in patterns):
                if pattern.startswith("**/"):
                    pattern = pattern[3:]
                    if fnmatch.fnmatchcase(prefix, "*/" + pattern):
                        return True
                if fnmatch.fnmatchcase(prefix, pattern):
                    return True
        return False

    for heavy in (".venv", ".git", "demo", "runs", "tests", "infra/minio.env"):
        assert ignored(heavy), heavy
    for needed in ("pyproject.toml", "README.md", "pneumo/cli.py", "shards/store.py"):
        assert not ignored(needed), needed


# ---------------------------------------------------------------------------- compose


def test_minio_listens_on_loopback_and_has_no_default_credentials():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    minio = compose["services"]["minio"]
    for port in minio["ports"]:
        assert port.startswith("${MINIO_BIND:-127.0.0.1}:"), port
    for service in compose["services"].values():
        for name, value in service.get("environment", {}).items():
            if name.startswith("MINIO_ROOT_"):
                assert re.fullmatch(r"\$\{" + name + r":\?[^}]+\}", value), (name, value)
    example = dict(
        line.split("=", 1)
        for line in (INFRA / "minio.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example == {"MINIO_ROOT_USER": "", "MINIO_ROOT_PASSWORD": ""}
    assert "infra/minio.env" in (REPO / ".gitignore").read_text().split()
