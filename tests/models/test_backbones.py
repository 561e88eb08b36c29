"""Backbones: widths, stems, parameter counts and normalisation choices."""

import numpy as np
import pytest

from models.backbones import build_backbone, resnet, small_cnn


def _trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_resnet18_cifar_matches_reference_parameter_count():
    # torchvision's resnet18 with a 3x3 stem and no fc layer has 11,168,832 parameters.
    model = resnet(18, input_shape=(32, 32, 3), stem="cifar")
    assert model.feature_dim == 512 and model.output_shape == (None, 512)
    assert _trainable_count(model) == 11_168_832


def test_resnet50_imagenet_matches_reference_parameter_count():
    # torchvision's resnet50 (25,557,032) minus its 2048x1000 fc layer.
    model = resnet(50, input_shape=(64, 64, 3), stem="imagenet")
    assert model.feature_dim == 2048
    assert _trainable_count(model) == 25_557_032 - 2_049_000


def test_resnet20_is_he_et_al_cifar_network():
    # Convolutions 3*3*(3*16 + 6*16*16 + 16*32 + 5*32*32 + 32*64 + 5*64*64) = 267,696; BN
    # scale and offset 2*(16 + 6*16 + 6*32 + 6*64) = 1,376; the two 1x1 projection
    # shortcuts 16*32 + 32*64 plus their BN 2*(32 + 64) = 2,752.  The paper's 0.27 M.
    model = build_backbone("resnet20", input_shape=(32, 32, 3))
    assert model.feature_dim == 64
    assert _trainable_count(model) == 267_696 + 1_376 + 2_752
    assert model.get_layer("stage3_block3_out").output.shape[1:] == (8, 8, 64)
    assert "stage4_block1_out" not in [layer.name for layer in model.layers]


def test_resnet34_width_and_stems():
    cifar = resnet(34, input_shape=(32, 32, 3), stem="cifar")
    imagenet = resnet(34, input_shape=(32, 32, 3), stem="imagenet")
    assert cifar.feature_dim == imagenet.feature_dim == 512
    # CIFAR stem keeps full resolution into stage 1; ImageNet stem divides it by 4.
    assert cifar.get_layer("stage1_block1_out").output.shape[1:3] == (32, 32)
    assert imagenet.get_layer("stage1_block1_out").output.shape[1:3] == (8, 8)
    assert "stem_pool" not in [layer.name for layer in cifar.layers]


@pytest.mark.parametrize("norm, layer_class", [
    ("batch", "BatchNormalization"), ("split", "SplitBatchNormalization"),
    ("sync", "BatchNormalization"), ("none", "Identity")])
def test_normalisation_choice_is_used_throughout(norm, layer_class):
    model = small_cnn(input_shape=(16, 16, 3), norm=norm, bn_splits=2)
    norms = [layer for layer in model.layers if layer.name.startswith("norm")]
    assert len(norms) == 3 and all(type(layer).__name__ == layer_class for layer in norms)
    if norm == "sync":
        assert all(layer.synchronized for layer in norms)
    out = model(np.random.rand(4, 16, 16, 3).astype("float32"), training=True)
    assert out.shape == (4, 128)


def test_build_backbone_by_name_and_errors():
    assert build_backbone("small_cnn", input_shape=(8, 8, 3)).feature_dim == 128
    assert build_backbone("resnet18", input_shape=(32, 32, 3)).feature_dim == 512
    with pytest.raises(ValueError, match="backbone='resnet19'"):
        build_backbone("resnet19")
    with pytest.raises(ValueError, match="stem='tiny'"):
        resnet(18, stem="tiny")
    with pytest.raises(ValueError, match="norm='group'"):
        small_cnn(norm="group")
