"""The U-Net and the classifier, encoder transfer from other code's ResNet-34 weights, the loss."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import timm
import torch
import torchvision

from pneumo.training.checkpoint import weights_sha256
from pneumo.training.losses import FocalDiceLoss
from pneumo.training.model import EncoderWeightsError, build_classifier, build_unet, predict_proba
from pneumo.training.transfer import load_encoder_weights


@pytest.fixture(scope="module")
def torchvision_resnet34() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet34(weights=None).state_dict()


def save(state: object, path: Path) -> str:
    torch.save(state, path)
    return str(path)


def test_unet_maps_a_grey_image_to_one_logit_channel() -> None:
    model = build_unet(in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    assert model.encoder.conv1.weight.shape == (64, 1, 7, 7)


def test_a_3_channel_torchvision_state_dict_loads_with_conv1_summed(
    torchvision_resnet34: dict[str, torch.Tensor], tmp_path: Path, caplog
) -> None:
    model = build_unet()
    before = model.encoder.layer3[0].conv1.weight.clone()
    init = load_encoder_weights(model, save(torchvision_resnet34, tmp_path / "tv.pt"))
    report = init.report
    enc = model.encoder.state_dict()
    assert torch.equal(enc["layer3.0.conv1.weight"], torchvision_resnet34["layer3.0.conv1.weight"])
    assert not torch.equal(enc["layer3.0.conv1.weight"], before)
    # RGB kernels summed over their input channels, as smp does for a grey encoder.
    expected = torchvision_resnet34["conv1.weight"].sum(1, keepdim=True)
    assert torch.allclose(enc["conv1.weight"], expected)
    assert report.adapted == ["conv1.weight"]
    assert "summed over channels" in caplog.text  # warned, not silent
    assert report.unexpected == []  # fc.* dropped, not unexpected
    assert len(report.loaded) == len(enc)
    # The init chain names the file and the hash of its weights; the chain ends there.
    assert init.chain == [
        {"source": str(tmp_path / "tv.pt"), "sha256": weights_sha256(torchvision_resnet34)}
    ]


def test_timm_state_dict_loads_into_the_encoder(tmp_path: Path) -> None:
    state = timm.create_model("resnet34", pretrained=False).state_dict()
    model = build_unet()
    load_encoder_weights(model, save(state, tmp_path / "timm.pt"))
    enc = model.encoder.state_dict()
    assert torch.equal(enc["layer4.2.bn2.running_var"], state["layer4.2.bn2.running_var"])
    assert torch.equal(enc["layer1.0.conv2.weight"], state["layer1.0.conv2.weight"])


def test_classifier_checkpoint_with_prefixes_and_extra_keys(
    torchvision_resnet34: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Our classifier checkpoints: a dict with "model", keys under DDP's and a wrapper's prefix."""
    wrapped = {f"module.encoder.{k}": v for k, v in torchvision_resnet34.items()}
    wrapped["module.head.weight"] = torch.zeros(2, 512)
    wrapped["module.projector.weight"] = torch.zeros(3)
    ckpt = {"model": wrapped, "step": 7, "config": {"task": "classify"}}
    model = build_unet(in_channels=3)
    report = load_encoder_weights(model, save(ckpt, tmp_path / "cls.pt")).report
    enc = model.encoder.state_dict()
    assert torch.equal(enc["conv1.weight"], torchvision_resnet34["conv1.weight"])  # 3 channels
    assert report.adapted == []
    assert report.unexpected == ["projector.weight"]  # reported; the head is simply dropped


def test_weights_from_an_s3_object(
    torchvision_resnet34: dict[str, torch.Tensor], tmp_path: Path, s3_bucket: str
) -> None:
    path = save(torchvision_resnet34, tmp_path / "tv.pt")
    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3").upload_file(path, bucket, "weights/resnet34.pt")
    model = build_unet()
    load_encoder_weights(model, f"{s3_bucket}/weights/resnet34.pt")
    assert torch.equal(
        model.encoder.state_dict()["layer2.1.bn1.weight"],
        torchvision_resnet34["layer2.1.bn1.weight"],
    )


def test_a_state_dict_of_something_else_is_refused(tmp_path: Path) -> None:
    garbage = {"linear.weight": torch.zeros(3, 3), "embedding.weight": torch.zeros(10, 4)}
    with pytest.raises(EncoderWeightsError, match="none of its 2 tensor key"):
        load_encoder_weights(build_unet(), save(garbage, tmp_path / "garbage.pt"))


def test_another_resnet_is_refused_by_shape(tmp_path: Path) -> None:
    resnet50 = torchvision.models.resnet50(weights=None).state_dict()
    with pytest.raises(EncoderWeightsError, match="wrong shape.*layer1.0.conv1.weight"):
        load_encoder_weights(build_unet(), save(resnet50, tmp_path / "r50.pt"))


def test_a_partial_state_dict_is_refused_naming_the_missing_keys(
    torchvision_resnet34: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    partial = {k: v for k, v in torchvision_resnet34.items() if not k.startswith("layer4.")}
    with pytest.raises(EncoderWeightsError, match=r"not in it.*'layer4\.0\.bn1\.bias'"):
        load_encoder_weights(build_unet(), save(partial, tmp_path / "partial.pt"))


def test_the_classifier_has_the_unet_encoders_layout() -> None:
    classifier = build_classifier("resnet34", in_channels=1, num_classes=2)
    trunk = {k for k in classifier.state_dict() if not k.startswith("fc.")}
    assert trunk == set(build_unet().encoder.state_dict())
    assert classifier.conv1.weight.shape == (64, 1, 7, 7)
    assert classifier(torch.rand(2, 1, 64, 64)).shape == (2, 2)


def test_unreadable_or_missing_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="notes.txt"):
        load_encoder_weights(build_unet(), str(tmp_path / "notes.txt"))
    with pytest.raises(Exception, match="missing.pt"):
        load_encoder_weights(build_unet(), str(tmp_path / "missing.pt"))


def test_hflip_tta_is_flip_equivariant() -> None:
    torch.manual_seed(0)
    model = build_unet().eval()
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        a = predict_proba(model, image, tta=True)
        b = predict_proba(model, torch.flip(image, dims=[-1]), tta=True)
        plain = predict_proba(model, image)
    assert torch.allclose(a, torch.flip(b, dims=[-1]), atol=1e-6)
    assert not torch.allclose(a, plain)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_loss_is_the_weighted_sum_and_rewards_the_right_mask() -> None:
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:16, 8:16] = 1
    good = (target * 2 - 1) * 6  # logits +6 inside, -6 outside
    bad = -good
    loss = FocalDiceLoss()
    assert float(loss(good, target)) < 0.05 < float(loss(bad, target))
    focal_only = FocalDiceLoss(focal_weight=1, dice_weight=0)
    dice_only = FocalDiceLoss(focal_weight=0, dice_weight=1)
    combined = FocalDiceLoss(focal_weight=10, dice_weight=1)
    expected = 10 * focal_only(bad, target) + dice_only(bad, target)
    assert torch.allclose(combined(bad, target), expected)
    with pytest.raises(ValueError):
        FocalDiceLoss(focal_weight=0, dice_weight=0)
