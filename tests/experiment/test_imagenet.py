"""The imagenet arm: a ResNet-34 state dict the user names (a generated one here, saved as
torchvision saves its weights) is checked, copied into the experiment under a stage named
by its SHA-256, and becomes the encoder of the arm's U-Nets; bad input is one line."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.experiment import adapters
from pneumo.experiment.plan import Plan, build_plan
from pneumo.experiment.recipe import load_recipe
from pneumo.experiment.run import ExperimentConfig
from pneumo.experiment.stages import StageContext, StageRunner
from pneumo.shards.errors import ConfigError
from pneumo.training.checkpoint import weights_sha256
from pneumo.training.segment import SegmentTask

SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.fixture(scope="module")
def resnet34(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """torchvision's ResNet-34 (random weights: the same keys and shapes as ImageNet's)."""
    torch.manual_seed(34)
    state = torchvision.models.resnet34(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet34-test.pth"
    torch.save(state, path)
    return path, state


def _plan(sha: str | None = SHA_A, recipe: str = "demo") -> Plan:
    return build_plan(
        load_recipe(recipe), arms=("none", "imagenet"), seeds=1, dataset_fingerprint="f",
        held_out_patients=["p"], imagenet_sha256=sha,
    )  # fmt: skip


def test_the_check_gives_the_sha256_that_sha256sum_prints(resnet34) -> None:
    path, _ = resnet34
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert adapters.check_imagenet_weights(str(path), in_channels=1) == want


def test_a_file_that_is_no_resnet34_state_dict_is_one_clear_error(resnet34, tmp_path: Path) -> None:
    r18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    with pytest.raises(ConfigError) as e:
        adapters.check_imagenet_weights(str(r18), in_channels=1)
    text = str(e.value)
    assert text.startswith(f"--imagenet-weights {r18}: not a usable ResNet-34 state dict")
    assert "layer1.2.bn1.weight" in text  # a ResNet-34 key the file lacks, named
    junk = tmp_path / "page.html"
    junk.write_text("<html>404</html>")
    with pytest.raises(ConfigError, match="not a usable ResNet-34 state dict .*cannot load"):
        adapters.check_imagenet_weights(str(junk), in_channels=1)
    torn = tmp_path / "resnet34-b627a593.pth"  # torch.hub's name: SHA-256 starts b627a593
    torn.write_bytes(resnet34[0].read_bytes())  # a ResNet-34, but not the file named
    with pytest.raises(ConfigError, match="name says its SHA-256 starts with b627a593, but"):
        adapters.check_imagenet_weights(str(torn), in_channels=3)
    with pytest.raises(ConfigError, match=f"--imagenet-weights {tmp_path}/gone.pth: cannot read"):
        adapters.check_imagenet_weights(str(tmp_path / "gone.pth"), in_channels=1)


def test_the_weights_become_the_encoder_of_the_imagenet_arm(resnet34, tmp_path: Path) -> None:
    """The weights stage copies the file; the arm's segment stage builds its U-Net with the
    copy's tensors in the encoder (the grey first convolution: the RGB one summed)."""
    path, state = resnet34
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    plan = _plan(sha)
    runner = StageRunner(
        exp=str(tmp_path / "exp"), dataset=str(tmp_path),
        functions=adapters.stage_functions(str(path)),
    )  # fmt: skip
    result = runner.run(plan.weights)
    copy = Path(runner.url(plan.weights)) / result["file"]
    assert result["sha256"] == sha and copy.read_bytes() == path.read_bytes()
    segment = plan.segments[("imagenet", 0)]
    assert dict(segment.inputs)["encoder"] is plan.weights
    ctx = StageContext(
        stage=segment, dataset=str(tmp_path), url=str(tmp_path / "seg"),
        inputs={"data": {}, "encoder": result},
        input_urls={"data": "unused", "encoder": runner.url(plan.weights)},
    )  # fmt: skip
    task = SegmentTask(adapters.segment_config(ctx))
    model = task.build_model()
    deep = "layer4.2.conv2.weight"  # in a ResNet-34, not in a ResNet-18
    assert not torch.equal(model.encoder.state_dict()[deep], state[deep])
    chain = task.init_weights(model)
    got = model.encoder.state_dict()
    assert torch.equal(got[deep], state[deep])
    assert torch.equal(got["bn1.running_var"], state["bn1.running_var"])
    assert torch.allclose(got["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    assert chain[0] == {"source": str(copy), "sha256": weights_sha256(state)}


def test_the_files_sha256_names_the_arms_stages_and_nothing_else() -> None:
    a = {s.label: s.name for s in _plan(SHA_A).stages}
    b = {s.label: s.name for s in _plan(SHA_B).stages}
    assert {label for label in a if a[label] != b[label]} == {
        "ImageNet weights",
        "segment imagenet seed 0",
        "evaluate imagenet seed 0",
    }


def test_a_file_changed_after_planning_is_refused(resnet34, tmp_path: Path) -> None:
    path, _ = resnet34
    runner = StageRunner(
        exp=str(tmp_path / "exp"), dataset=str(tmp_path),
        functions=adapters.stage_functions(str(path)),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="changed since this experiment was planned"):
        runner.run(_plan(SHA_A).weights)


def test_the_arm_needs_a_resnet34_u_net_and_its_file() -> None:
    demo = load_recipe("demo")
    resnet18 = replace(demo, segment=replace(demo.segment, encoder="resnet18"))
    with pytest.raises(ConfigError, match=r"\[segment\] encoder = 'resnet18'"):
        build_plan(
            resnet18, arms=("none", "imagenet"), seeds=1, dataset_fingerprint="f",
            held_out_patients=["p"], imagenet_sha256=SHA_A,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="needs --imagenet-weights"):
        _plan(None)
    with pytest.raises(ConfigError, match="needs --imagenet-weights"):
        ExperimentConfig(dataset="d", out="e", recipe=load_recipe("demo"), arms=("imagenet",))


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["experiment", *args])
    return result.exit_code, result.stderr


def test_the_cli_errors_name_the_option(demo_dataset, tmp_path: Path) -> None:
    dataset, _ = demo_dataset
    out = ["--out", str(tmp_path / "e"), "--recipe", "demo"]
    code, err = _cli(dataset, *out, "--arms", "none,imagenet")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: the imagenet arm needs --imagenet-weights FILE")
    code, err = _cli(dataset, *out, "--imagenet-weights", "x.pth")
    assert code == 1 and err == (
        "error: --imagenet-weights x.pth is only read by the imagenet arm: add imagenet to --arms\n"
    )
    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    code, err = _cli(dataset, *out, "--arms", "none,imagenet", "--imagenet-weights", str(r18))
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: --imagenet-weights {r18}: not a usable ResNet-34 state dict")
    assert not (tmp_path / "e" / "stages").exists()  # refused before any stage ran
