"""Encoder transfer from our own checkpoints, and state dicts that do not fit the encoder.

``pneumo.training.model.load_encoder_state`` says: every encoder tensor must come from the
source (a missing key or another shape is one error naming the keys: a half-loaded
encoder trains silently worse); only ``num_batches_tracked`` may be absent; source keys
the encoder has no use for are reported and ignored, a classification head (``fc.``) is
dropped without a word. Here the sources are real resnet34 models (a classifier, a U-Net)
whose every tensor, buffers included, is set to a random value, so that "loaded" and
"left as it was" can be told apart with ``torch.equal``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pneumo.training.autoencoders import Autoencoder
from pneumo.training.checkpoint import FORMAT, weights_sha256
from pneumo.training.model import EncoderWeightsError, build_classifier, build_unet
from pneumo.training.transfer import load_encoder_weights

NBT = "num_batches_tracked"


def _randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every tensor drawn afresh (running stats positive)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(NBT):
            state[key] = torch.randint(1, 1000, (), generator=g, dtype=value.dtype)
        else:
            state[key] = torch.rand(value.shape, generator=g, dtype=value.dtype) + 0.5
    return state


@pytest.fixture(scope="module")
def classifier_state() -> dict[str, torch.Tensor]:
    return _randomised(build_classifier("resnet34", in_channels=1, num_classes=2), seed=1)


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(in_channels=1)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


def _save(obj: object, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


def _checkpoint(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """A pneumo checkpoint of a classify run, as the loop writes it (the fields read here)."""
    return {
        "format": FORMAT,
        "task": "classify",
        "step": 12,
        "model_args": {"arch": "classifier", "backbone": "resnet34", "in_channels": 1},
        "model": state,
        "init": [{"source": "random"}],
    }


def test_a_classifier_checkpoint_gives_the_encoder_every_trunk_tensor(
    classifier_state, tmp_path: Path
) -> None:
    model = _unet()
    before = _snapshot(model)
    source = _save(_checkpoint(classifier_state), tmp_path / "best.pt")
    init = load_encoder_weights(model, source)
    enc = model.encoder.state_dict()
    trunk = sorted(k for k in classifier_state if not k.startswith("fc."))
    assert sorted(enc) == trunk  # the premise: the layouts are the same
    for key in trunk:
        assert torch.equal(enc[key], classifier_state[key]), key
        if not key.endswith(NBT):
            assert not torch.equal(enc[key], before[key]), key  # it did change
    report = init.report
    assert sorted(report.loaded) == trunk and len(report.loaded) == len(trunk)
    assert report.unexpected == [] and report.adapted == []
    assert init.chain == [
        {
            "source": str(tmp_path / "best.pt"),
            "sha256": weights_sha256(classifier_state),
            "task": "classify",
            "step": 12,
            "model_args": {"arch": "classifier", "backbone": "resnet34", "in_channels": 1},
        },
        {"source": "random"},
    ]


@pytest.mark.parametrize(
    "drop",
    [
        pytest.param(lambda k: k == "layer4.2.bn2.running_var", id="one-buffer"),
        pytest.param(lambda k: k == "layer2.3.conv2.weight", id="one-weight"),
        pytest.param(lambda k: k.startswith("layer4.") and not k.endswith(NBT), id="layer4"),
    ],
)
def test_missing_encoder_tensors_are_refused_by_name_and_nothing_is_loaded(
    classifier_state, tmp_path: Path, drop
) -> None:
    partial = {k: v for k, v in classifier_state.items() if not drop(k)}
    missing = sorted(k for k in classifier_state if drop(k))
    assert missing
    model = _unet()
    before = _snapshot(model)
    source = _save(_checkpoint(partial), tmp_path / "partial.pt")
    with pytest.raises(EncoderWeightsError) as raised:
        load_encoder_weights(model, source)
    message = str(raised.value)
    assert f"{len(missing)} encoder key(s) are not in it" in message
    assert str(missing[:5]) in message  # the first five, in name order
    assert source in message
    after = model.encoder.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), "a refused load changed it"


def test_only_num_batches_tracked_may_be_missing(classifier_state, tmp_path: Path) -> None:
    """Other code's ResNets (older torch, timm exports) may lack the BN step counters."""
    lean = {k: v for k, v in classifier_state.items() if not k.endswith(NBT)}
    model = _unet()
    before = _snapshot(model)
    report = load_encoder_weights(model, _save(lean, tmp_path / "lean.pt")).report
    enc = model.encoder.state_dict()
    want = sorted(k for k in lean if not k.startswith("fc."))
    assert sorted(report.loaded) == want and len(report.loaded) == len(want)
    for key, value in enc.items():
        if key.endswith(NBT):
            assert torch.equal(value, before[key]), key  # kept its own
        else:
            assert torch.equal(value, classifier_state[key]), key


def test_one_tensor_of_another_shape_is_refused_naming_both_shapes(
    classifier_state, tmp_path: Path
) -> None:
    bad = dict(classifier_state)
    bad["layer4.2.bn2.weight"] = torch.ones(256)
    model = _unet()
    before = _snapshot(model)
    with pytest.raises(EncoderWeightsError) as raised:
        load_encoder_weights(model, _save(bad, tmp_path / "bad.pt"))
    message = str(raised.value)
    assert "1 tensor(s) have the wrong shape" in message
    assert "layer4.2.bn2.weight (256,) vs (512,)" in message
    after = model.encoder.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_unet_checkpoint_gives_its_encoder_and_reports_the_rest(tmp_path: Path) -> None:
    """A segment run as --encoder-init: ``encoder.`` is stripped, its decoder and
    segmentation head are reported as unused, every encoder tensor is loaded."""
    source_state = _randomised(build_unet(in_channels=1), seed=2)
    model = _unet()
    init = load_encoder_weights(model, _save(_checkpoint(source_state), tmp_path / "seg.pt"))
    enc = model.encoder.state_dict()
    for key, value in enc.items():
        assert torch.equal(value, source_state[f"encoder.{key}"]), key
    others = sorted(k for k in source_state if not k.startswith("encoder."))
    assert others and all(k.startswith(("decoder.", "segmentation_head.")) for k in others)
    assert init.report.unexpected == others
    assert sorted(init.report.loaded) == sorted(enc)


def test_extra_keys_are_reported_and_the_head_is_not(classifier_state, tmp_path: Path) -> None:
    extra = dict(classifier_state)
    extra["projector.weight"] = torch.zeros(4, 512)
    extra["layer5.0.conv1.weight"] = torch.zeros(3)
    report = load_encoder_weights(_unet(), _save(extra, tmp_path / "extra.pt")).report
    assert report.unexpected == ["layer5.0.conv1.weight", "projector.weight"]
    assert "fc.weight" in classifier_state and not any("fc" in k for k in report.loaded)


def test_an_autoencoder_checkpoint_is_refused_as_another_architecture(tmp_path: Path) -> None:
    state = Autoencoder(kind="vae", size=64, latent_dim=4).state_dict()
    model = _unet()
    before = _snapshot(model)
    with pytest.raises(EncoderWeightsError, match=f"none of its {len(state)} tensor key"):
        load_encoder_weights(model, _save(_checkpoint(state), tmp_path / "ae.pt"))
    after = model.encoder.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
