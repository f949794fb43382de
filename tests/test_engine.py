import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from smse.checkpoint import load_checkpoint
from smse.config import load_config
from smse.engine import train
from smse.errors import CheckpointError, ConfigError, TrainingDiverged
from tests.conftest import subprocess_env, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def weights(path: Path) -> dict:
    return load_file(str(path))


def same_weights(a: Path, b: Path, atol: float = 0.0) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=atol, rtol=0) for k in wa)


@pytest.mark.slow
def test_train_writes_a_complete_run(synth_data, tmp_path):
    cfg = tiny_config(synth_data, tmp_path / "run")
    run = train(cfg, progress=False)
    for name in (
        "best.safetensors",
        "last.safetensors",
        "history.json",
        "config.yaml",
        "versions.json",
        "split.csv",
        "data.json",
        "state.pt",
        "run.json",
    ):
        assert (run / name).exists(), name
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert {"loss_classification", "loss_metric", "loss_total", "val_patient_accuracy"} <= set(history[0])
    model, cfg2, class_map, meta = load_checkpoint(run / "last.safetensors")
    assert class_map.names == ("benign", "malignant") and cfg2.model.backbone == "paper-cnn"
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*tmp"))
    # same seed, same result: the run is reproducible
    again = train(tiny_config(synth_data, tmp_path / "again"), progress=False)
    assert same_weights(run / "last.safetensors", again / "last.safetensors")


def test_validation_never_uses_test_patients(synth_data, tmp_path):
    run = train(tiny_config(synth_data, tmp_path / "run", "train.epochs=1"), progress=False)
    rows = (run / "split.csv").read_text().splitlines()[1:]
    sides = {}
    for row in rows:
        parts = row.split(",")
        sides.setdefault(parts[3], set()).add(parts[5])
    assert all(len(s) == 1 for s in sides.values())
    assert {"train", "val", "test"} == set().union(*sides.values())


@pytest.mark.parametrize(
    "mode, metric",
    [
        ("pooled", "triplet"),
        ("pooled", "pair"),
        ("single", "triplet"),
        ("cross-magnification", "pair"),
        ("cross-magnification", "none"),
    ],
)
def test_sampling_modes_train(synth_data, tmp_path, monkeypatch, mode, metric):
    """Every sampling mode trains: the loss falls, the heads move, and ``single`` sees one magnification only.

    Catches: a training step that does not update the weights (no optimizer step, zero learning rate, gradients
    detached) or that climbs the loss (gradient ascent: planted and verified, as were a skipped optimizer step
    and ``single`` mode on every magnification); a history without its loss parts or with a total that is not
    their weighted sum; ``single`` mode training or validating on every magnification (``training_indices``
    ignoring ``sampler.magnification``), or batches of other magnifications reaching the loss; a metric loss
    that is silently off (no tuples mined) in the modes that use one.
    """
    import smse.engine as engine

    seen_mags: set[int] = set()
    used: dict[str, np.ndarray] = {}
    real_objective, real_indices = engine.build_objective, engine.training_indices

    def spy_objective(prep, train_idx):
        objective = real_objective(prep, train_idx)
        # objective(emb, logits, targets, mags, patients, ...): the magnifications of every training batch
        objective.register_forward_pre_hook(lambda module, args: seen_mags.update(args[3].tolist()))
        return objective

    def spy_indices(prep):
        train_idx, val_idx = real_indices(prep)
        used["train"] = np.array([prep.records[i].magnification for i in train_idx])
        used["val"] = np.array([prep.records[i].magnification for i in val_idx])
        return train_idx, val_idx

    monkeypatch.setattr(engine, "build_objective", spy_objective)
    monkeypatch.setattr(engine, "training_indices", spy_indices)
    cfg = tiny_config(
        synth_data,
        tmp_path / "run",
        f"sampler.mode={mode}",
        f"loss.metric={metric}",
        "train.epochs=3",
        "sampler.batch_size=15" if mode == "pooled" else "sampler.batch_size=16",
    )
    run = train(cfg, progress=False)
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    parts = {"loss_classification", "loss_total", "val_patient_accuracy", "val_image_accuracy", "lr"}
    assert parts | ({"loss_metric", "tuples_per_step"} if metric != "none" else set()) <= set(history[0])
    for h in history:
        assert np.isfinite(h["loss_total"])
        weighted = cfg.loss.classification_weight * h["loss_classification"] + cfg.loss.metric_weight * h.get(
            "loss_metric", 0
        )
        assert h["loss_total"] == pytest.approx(weighted, rel=1e-5)
        if metric != "none":
            assert h["tuples_per_step"] > 0
    # the classification loss falls epoch after epoch (the metric loss of random offline pairs is too noisy)
    falling = [h["loss_classification"] for h in history]
    assert falling == sorted(falling, reverse=True) and falling[-1] < 0.97 * falling[0], history
    trained, init = load_checkpoint(run / "last.safetensors")[0], initial_model(cfg)
    assert not torch.equal(trained.heads.embed.weight, init.heads.embed.weight)
    assert not torch.equal(trained.heads.classify[1].weight, init.heads.classify[1].weight)
    split_mags = {int(line.split(",")[4]) for line in (run / "split.csv").read_text().splitlines()[1:]}
    assert split_mags == {40, 100, 200, 400}  # the split keeps every image; only training picks
    if mode == "single":
        only = cfg.sampler.magnification
        assert seen_mags == {only} and set(used["train"]) == {only} and set(used["val"]) == {only}
    else:
        assert seen_mags == {40, 100, 200, 400} and set(used["train"]) == {40, 100, 200, 400}


def initial_model(cfg):
    from smse.checkpoint import build_model
    from smse.runtime import seed_everything

    seed_everything(cfg.seed)  # the trainer seeds the same way before it builds the model
    return build_model(cfg, 2)[0]


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_mode_keeps_backbone_fine_tuning_changes_it(synth_data, tmp_path, freeze):
    cfg = tiny_config(
        synth_data,
        tmp_path / "run",
        f"model.freeze_backbone={str(freeze).lower()}",
        "train.epochs=1",
        "train.batches_per_epoch=2",
    )
    run = train(cfg, progress=False)
    trained = load_checkpoint(run / "last.safetensors")[0]
    init = initial_model(cfg)
    same_backbone = all(
        torch.equal(a, b) for a, b in zip(trained.backbone.state_dict().values(), init.backbone.state_dict().values())
    )
    assert same_backbone == freeze
    assert not torch.equal(trained.heads.embed.weight, init.heads.embed.weight)


def test_nan_stops_with_clear_message_and_keeps_last_good(synth_data, tmp_path, monkeypatch):
    cfg = tiny_config(synth_data, tmp_path / "run", "train.epochs=3")
    good = train(cfg, progress=False)
    last = (good / "last.safetensors").read_bytes()
    cfg = tiny_config(synth_data, tmp_path / "run", "train.epochs=5")

    def poison(epoch, step, parts):
        if epoch == 3 and step == 1:
            with torch.no_grad():
                for p in poison.model.parameters():
                    p.fill_(float("nan"))

    import smse.engine as engine

    real_prepare = engine.prepare

    def spy(*args, **kwargs):
        prep = real_prepare(*args, **kwargs)
        poison.model = prep.model.heads
        return prep

    with monkeypatch.context() as patched:  # engine.prepare is itself again before the checks below
        patched.setattr(engine, "prepare", spy)
        with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 4, step 3.*last.safetensors"):
            train(cfg, callbacks=[poison], progress=False)
    assert engine.prepare is real_prepare
    assert (good / "last.safetensors").read_bytes() == last  # the diverged epoch 4 wrote nothing
    model, _, _, meta = load_checkpoint(good / "last.safetensors")
    assert meta["epoch"] == "3"  # the last good checkpoint is kept and loads
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_refuses_another_config(synth_data, tmp_path):
    train(tiny_config(synth_data, tmp_path / "run", "train.epochs=1"), progress=False)
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="another config"):
        train(tiny_config(synth_data, tmp_path / "run", "loss.gamma=2.0"), progress=False)
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # nothing of the refused run was written


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.conftest import subprocess_env, tiny_config
    from smse.engine import train
    def die(epoch, step, parts):
        if epoch == 2 and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    train(tiny_config({data!r}, {out!r}, "train.epochs=4"), callbacks=[die], progress=False)
""")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_reaches_same_weights(synth_data, tmp_path):
    out = tmp_path / "killed"
    script = KILL_SCRIPT.format(root=str(ROOT), data=str(synth_data), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert json.loads((out / "history.json").read_text())[-1]["epoch"] == 2
    resumed = train(tiny_config(synth_data, out, "train.epochs=4"), progress=False)
    straight = train(tiny_config(synth_data, tmp_path / "straight", "train.epochs=4"), progress=False)
    assert same_weights(resumed / "last.safetensors", straight / "last.safetensors")
    assert same_weights(resumed / "best.safetensors", straight / "best.safetensors")


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(synth_data, tmp_path):
    common = [
        "-c",
        "none",
        f"data.root={synth_data}",
        "data.image_size=[32, 48]",
        "model.backbone=paper-cnn",
        "model.pretrained=false",
        "model.embedding_dim=16",
        "model.views=2",
        "train.epochs=2",
        "sampler.batch_size=16",
        "train.device=cpu",
        "data.split.val_fraction=0.25",
        "loss.mining=all",
        # the k-NN references are buffers DDP keeps equal across processes; the neighbourhood term
        # sees the features gathered from every process
        "model.classifier=knn",
        "loss.structure_weight=1",
    ]
    env = subprocess_env(OMP_NUM_THREADS="1", SMSE_CACHE_DIR=str(tmp_path / "cache"))
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "1",
            "-m",
            "smse.cli",
            "train",
            "--no-evaluate",
            *common[2:],
            f"out={tmp_path / 'one'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "smse.cli",
            "train",
            "--no-evaluate",
            *common[2:],
            f"out={tmp_path / 'two'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert same_weights(tmp_path / "one" / "last.safetensors", tmp_path / "two" / "last.safetensors", atol=1e-5)
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [round(h["loss_total"], 4) for h in h1] == [round(h["loss_total"], 4) for h in h2]


def test_bad_config_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="loss.gama: unknown field"):
        load_config(None, ["loss.gama=1.5"])
    with pytest.raises(ConfigError, match="loss.metric: 'quadruplet' is not one of"):
        load_config(None, ["loss.metric=quadruplet"])
    with pytest.raises(ConfigError, match=r"train.lr: must be in \(0, 10\]"):
        load_config(None, ["train.lr=0"])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="model.backbone: unknown backbone 'no_such_net'"):
        from smse.models import create_backbone

        create_backbone("no_such_net")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(junk)


@pytest.mark.slow
def test_checkpoint_from_another_version_is_refused(synth_data, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = train(tiny_config(synth_data, tmp_path / "run", "train.epochs=1"), progress=False)
    with safe_open(str(run / "last.safetensors"), "pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["format"] = "smse-checkpoint-0"
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata=meta)
    with pytest.raises(CheckpointError, match="format 'smse-checkpoint-0' is not 'smse-checkpoint-2'"):
        load_checkpoint(old)


def test_every_shipped_config_parses_and_round_trips(tmp_path):
    from smse.config import from_dict, packaged_configs, save_config, to_dict
    from smse.models import BACKBONES

    names = packaged_configs()
    assert {"demo", "breakhis", "breakhis-paper"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert from_dict(to_dict(cfg)) == cfg, name
        save_config(cfg, tmp_path / f"{name}.yaml")
        assert load_config(tmp_path / f"{name}.yaml") == cfg, name
        assert cfg.model.backbone in BACKBONES, name


@pytest.mark.slow
def test_fine_tuning_is_the_same_with_loader_workers(synth_data, tmp_path):
    """Augmentations are seeded per (seed, epoch, image), so worker processes change nothing."""
    common = ("model.freeze_backbone=false", "train.epochs=2", "train.batches_per_epoch=2")
    a = train(tiny_config(synth_data, tmp_path / "w0", *common, "train.num_workers=0"), progress=False)
    b = train(tiny_config(synth_data, tmp_path / "w2", *common, "train.num_workers=2"), progress=False)
    assert same_weights(a / "last.safetensors", b / "last.safetensors")


RUN_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tests.conftest import subprocess_env, tiny_config
    from smse.engine import train
    train(tiny_config({data!r}, {out!r}, "train.epochs=3", "sampler.batch_size=32", "loss.mining=all", {extra!r}),
          progress=False)
""")


@pytest.mark.slow
def test_two_processes_reproduce_a_run_bit_for_bit(synth_data, tmp_path):
    """Separate processes (not just two runs in one) must give the same weights."""

    def run(name):
        script = RUN_SCRIPT.format(
            root=str(ROOT), data=str(synth_data), out=str(tmp_path / name), extra="train.deterministic=true"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=subprocess_env(SMSE_CACHE_DIR=str(tmp_path / "cache")),
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return tmp_path / name / "last.safetensors"

    assert same_weights(run("a"), run("b"))


def colour_manifest(root: Path, aligned: bool) -> Path:
    """40 patients whose images a linear model separates by colour; ``aligned=False`` shuffles the labels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    labels = ["benign"] * 16 + ["malignant"] * 24
    colours = labels if aligned else list(rng.permutation(labels))
    lines = ["path,label,patient,magnification"]
    for p, (label, colour) in enumerate(zip(labels, colours)):
        for k, mag in enumerate((40, 100, 200, 400)):
            base = np.array([200, 90, 150] if colour == "benign" else [90, 80, 200], dtype=float)
            pixels = np.clip(base + rng.normal(0, 25, (32, 48, 3)), 0, 255).astype(np.uint8)
            name = f"p{p:02d}_{k}.png"
            Image.fromarray(pixels).save(root / name)
            lines.append(f"{name},{label},P{p:02d},{mag}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


@pytest.mark.slow
@pytest.mark.parametrize("classifier", ["head", "knn"])
@pytest.mark.parametrize("aligned", [True, False])
def test_training_learns_what_a_linear_model_can(tmp_path, aligned, classifier):
    """Separable data: high validation accuracy after a few epochs; labels shuffled against images: not."""
    (tmp_path / "data").mkdir()
    manifest = colour_manifest(tmp_path / "data", aligned)
    cfg = tiny_config(
        manifest,
        tmp_path / "run",
        "train.epochs=8",
        "data.split.val_fraction=0.5",
        "data.split.test_fraction=0.2",
        "train.lr=0.01",
        f"model.classifier={classifier}",
        "model.knn_k=5",
    )
    history = json.loads((train(cfg, progress=False) / "history.json").read_text())
    final = history[-1]["val_patient_accuracy"]
    if aligned:
        assert final >= 0.95, history
    else:
        assert final <= 0.8, history


@pytest.mark.slow
def test_frozen_heads_standardise_by_the_training_images_only(synth_data, tmp_path):
    from smse.data.loading import LoadedData
    from smse.data.manifest import read_manifest
    from smse.prepare import prepare

    run = train(tiny_config(synth_data, tmp_path / "run", "train.epochs=1"), progress=False)
    model, cfg, class_map, _ = load_checkpoint(run / "last.safetensors")
    records = read_manifest(run / "split.csv")[0]
    prep = prepare(cfg, progress=False, data=LoadedData(records, {}), trained=(model, class_map, ""))
    train_idx = prep.indices("train")
    expected = prep.features[train_idx].reshape(-1, prep.features.shape[-1]).double().mean(0).float()
    assert torch.allclose(model.heads.feature_mean, expected, atol=1e-5)
    everything = prep.features.reshape(-1, prep.features.shape[-1]).mean(0)
    assert not torch.allclose(model.heads.feature_mean, everything, atol=1e-5)  # no validation or test image in it
    off = train(tiny_config(synth_data, tmp_path / "off", "train.epochs=1", "model.standardize=false"), progress=False)
    assert torch.equal(load_checkpoint(off / "last.safetensors")[0].heads.feature_mean, torch.zeros_like(expected))


@pytest.mark.slow
def test_knn_runs_vote_with_training_and_validation_images_and_resume_exactly(synth_data, tmp_path):
    from smse.data.loading import LoadedData
    from smse.data.manifest import read_manifest
    from smse.prepare import embed, prepare

    knn = ["model.classifier=knn", "model.knn_k=5", "loss.structure_weight=2"]
    run = train(tiny_config(synth_data, tmp_path / "run", *knn), progress=False)
    history = json.loads((run / "history.json").read_text())
    assert all(h["loss_structure"] > 0 for h in history) and "val_patient_accuracy" in history[-1]
    model, cfg, class_map, _ = load_checkpoint(run / "best.safetensors")
    records = read_manifest(run / "split.csv")[0]
    reference = [i for i, r in enumerate(records) if r.split in ("train", "val")]
    assert len(model.heads.ref_targets) == len(reference) < len(records)
    prep = prepare(cfg, progress=False, data=LoadedData(records, {}), trained=(model, class_map, ""))
    emb, probs = embed(prep, np.arange(len(records)))
    assert torch.allclose(model.heads.ref_embeddings, torch.from_numpy(emb[reference]), atol=1e-5)
    # a test image's probabilities are the smoothed votes of its 5 nearest references, at the temperature
    # fitted on the validation patients
    from smse.calibration import rescale

    test = [i for i, r in enumerate(records) if r.split == "test"]
    targets = np.array(class_map.targets(records))
    t = float(model.heads.temperature)
    assert t != 1.0 and json.loads((run / "run.json").read_text())["calibration"]["temperature"] == pytest.approx(t)
    for i in test[:5]:
        d = ((emb[reference] - emb[i]) ** 2).sum(1)
        votes = np.bincount(targets[reference][np.argsort(d, kind="stable")[:5]], minlength=len(class_map))
        np.testing.assert_allclose(
            probs[i], rescale(((votes + 0.5) / (5 + 0.5 * len(class_map)))[None], t)[0], atol=1e-5
        )
    # stopped after 2 of 3 epochs and resumed: the same weights and references as a straight run
    train(tiny_config(synth_data, tmp_path / "resumed", *knn, "train.epochs=2"), progress=False)
    resumed = train(tiny_config(synth_data, tmp_path / "resumed", *knn), progress=False)
    assert same_weights(resumed / "best.safetensors", run / "best.safetensors")
    assert same_weights(resumed / "last.safetensors", run / "last.safetensors")
