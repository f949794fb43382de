"""Training: frozen-feature or full fine-tuning, multi-scale sampling, validation by patient, exact resume, DDP.

``train`` reads as its steps: check a resumable state, prepare the data and model, write the run
files, build the objective and sampler, build the optimiser, then per epoch: train steps,
validation on validation patients, saving.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from smse.checkpoint import save_checkpoint
from smse.config import Config, resolve_zooms, to_dict, zooms_of
from smse.data.loading import LoadedData, load_data
from smse.data.records import ClassMap
from smse.data.samplers import Batch, MagnificationBalancedSampler, OfflineTupleSampler, SpotSampler
from smse.errors import ConfigError, TrainingDiverged
from smse.losses import NeighbourhoodLoss, Objective, make_classification_loss, make_metric_loss
from smse.metrics import image_accuracy, patient_accuracy
from smse.prepare import Prepared, embed, prepare
from smse.runfiles import RunFiles
from smse.runfolder import check_finite_weights, check_resume_data, guarded, split_fingerprint
from smse.runtime import Dist, resolve_device, seed_everything, torch_threads, versions
from smse.spots import check_positives
from smse.tracking import tracked

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int, dict], None]

#: best/last checkpoints are written at the end, and during training at most this often (state.pt,
#: the resume point, is written every epoch): in frozen mode an epoch takes milliseconds.
CHECKPOINT_EVERY_S = 30.0


@dataclass
class Progress:
    """What survives an epoch: history, the best validation score and weights, and what is on disk."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: float = -math.inf
    best_epoch: int = 0
    best_row: dict = field(default_factory=dict)
    best_state: dict | None = None  # the trainable module's weights at the best epoch
    last_state: dict | None = None  # ... and at the last completed epoch
    written_epoch: int = 0  # epoch of the last.safetensors on disk
    written_at: float = field(default_factory=time.monotonic)
    calibration: dict | None = None  # the temperature fitted on the validation patients, with its effect


@guarded
def train(
    cfg: Config, callbacks: Sequence[StepCallback] = (), progress: bool = True, data: LoadedData | None = None
) -> Path:
    """Train a model as ``cfg`` says; resumes exactly from ``cfg.out/state.pt`` when it exists.

    Seeds the random generators and sets torch's deterministic-kernel switch (``train.deterministic``).
    The run folder is locked while training; Ctrl-C raises ``Interrupted``, saying how to resume.

    Returns:
        The run folder, holding ``best.safetensors``, ``last.safetensors``, ``history.json``,
        ``config.yaml``, ``versions.json``, ``split.csv`` and ``data.json``.
    """
    dist = Dist.from_env()
    run = Path(cfg.out)
    state = _load_resume_state(cfg, run, dist)
    dist.init(resolve_device(cfg.train.device, dist.local_rank))
    data = data or load_data(cfg.data)
    check_resume_data(state, data.records, run)  # before any features are computed for data it would refuse
    labelled = ClassMap.from_records(data.records, cfg.data.task).labelled
    check_positives(data.records, cfg.sampler.positives, labelled, cfg.loss.metric)  # before features and files
    seed_everything(cfg.seed, cfg.train.deterministic)
    prep = prepare(cfg, dist, progress and dist.main, data)
    if dist.main:
        _write_run_files(run, prep)
    train_idx, val_idx = training_indices(prep)
    objective, sampler = build_objective(prep, train_idx), _build_sampler(cfg, prep, train_idx, dist)
    trainable = _trainable_module(prep, train_idx)
    optimizer, scheduler, scaler = _build_optimizer(cfg, trainable, prep.device)
    done = _restore(state, trainable, optimizer, scheduler, scaler, run)
    if state is not None and dist.main:
        log.info("resuming %s after epoch %d", run, done.epoch)
    net: nn.Module = trainable
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(
            trainable, device_ids=[prep.device.index] if prep.device.type == "cuda" else None
        )
    # heads on cached features: tiny operations, fastest on one CPU thread
    threads = torch_threads(1) if cfg.model.freeze_backbone and prep.device.type == "cpu" else contextlib.nullcontext()
    with threads, tracked(cfg, run) if dist.main else contextlib.nullcontext() as tracker:
        try:
            for epoch in range(done.epoch, cfg.train.epochs):
                row = _train_epoch(
                    prep,
                    net,
                    objective,
                    sampler,
                    optimizer,
                    scaler,
                    train_idx,
                    epoch,
                    dist,
                    callbacks,
                    progress and dist.main,
                )
                scheduler.step()
                check_finite_weights(trainable, epoch + 1, run)
                if len(val_idx):  # the k-NN classifier validates against this epoch's embeddings
                    _refresh_references(prep, train_idx)
                row["lr"] = optimizer.param_groups[0]["lr"]
                if len(val_idx) and dist.main:  # validation and saving are the main process's job
                    row.update(_validate(prep, val_idx))
                _record_epoch(done, row, trainable)
                if tracker is not None:
                    tracker.epoch(row)
                if dist.main:
                    _save_progress(run, prep, done, trainable, optimizer, scheduler, scaler)
                    log.info(
                        "epoch %d/%d (%.1f s): %s",
                        epoch + 1,
                        cfg.train.epochs,
                        row["seconds"],
                        ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "lr", "seconds")),
                    )
                dist.barrier()
            if dist.main:
                done.calibration = _calibrate(prep, done, trainable, val_idx)
                _final_references(prep, done, trainable, np.sort(np.concatenate([train_idx, val_idx])))
        finally:  # also on divergence, an interrupt or a crash: the last completed epoch reaches the checkpoints
            if dist.main:
                _write_checkpoints(run, prep, done, trainable)
        if tracker is not None:
            tracker.checkpoint(RunFiles(run).checkpoint("best"))
    if dist.main:
        RunFiles(run).write_summary(
            {
                "finished": True,
                "epochs": cfg.train.epochs,
                "best_val": done.best,
                "best_epoch": done.best_epoch,
                "backbone_weights": prep.weights,
                "calibration": done.calibration,
                "data": prep.data.summary_line(),
            }
        )
    return run


def _resume_key(cfg: Config) -> dict:
    """The config a resumed run must share (more epochs, another device or worker count are fine).

    ``out``, the run folder's own path, is not part of it: a moved or renamed run folder resumes.
    """
    d = to_dict(cfg)
    d["model"]["zooms"] = list(zooms_of(cfg))  # what the features are, however they were asked for (auto or a list)
    for k in ("epochs", "device", "num_workers"):
        d["train"].pop(k)
    d.pop("log", None)  # tracking may be switched on or off between sessions
    d.pop("out", None)  # where the run folder is: it may be moved or renamed between sessions
    return d


def _load_resume_state(cfg: Config, run: Path, dist: Dist) -> dict | None:
    """The saved state of an unfinished run in ``run``, after checking that it is the same run."""
    if cfg.sampler.batch_size % dist.world:
        raise ConfigError(
            f"sampler.batch_size: {cfg.sampler.batch_size} is not divisible by the {dist.world} processes"
        )
    path = RunFiles(run).state
    state = RunFiles(run).read_state()
    if state is None:
        return None
    saved, now = dict(state["config"]), _resume_key(cfg)
    saved.pop("out", None)  # states written before the run folder's path left the key
    saved.pop("log", None)
    if isinstance(saved.get("model"), dict):  # states written before zooms existed had plain features: [1]
        model, positives = saved["model"], saved.get("sampler", {}).get("positives", "class")
        saved["model"] = {**model, "zooms": list(resolve_zooms(model.get("zooms", [1]), positives))}
    if saved != now:

        def flat(d: dict, prefix: str = "") -> dict:
            out: dict = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
            return out

        def show(d: dict, k: str) -> str:
            return repr(d[k]) if k in d else "unset"

        before, after = flat(saved), flat(now)
        changed = [
            f"{k} ({show(before, k)} there, {show(after, k)} now)"
            for k in sorted(before.keys() | after.keys())
            if k not in before or k not in after or before[k] != after[k]
        ]
        raise ConfigError(
            f"{path}: this run folder holds a run with another config: {'; '.join(changed[:10])}"
            + (f"; and {len(changed) - 10} more" if len(changed) > 10 else "")
            + "; resume with the same values, or use another out folder or delete it"
        )
    return state


def _write_run_files(run: Path, prep: Prepared) -> None:
    """Config, versions, the split of every image, and what loading found, before the first step."""
    run.mkdir(parents=True, exist_ok=True)
    files = RunFiles(run)
    files.write_config(prep.cfg)
    files.write_tiling(prep.cfg.data.root)
    files.write_versions(versions())
    files.write_split(prep.records)
    files.write_data(
        {
            "summary": prep.data.summary_line(),
            "skipped": prep.data.skipped,
            "duplicates": asdict(prep.data.duplicates),
            "backbone_weights": prep.weights,
            "class_map": prep.class_map.to_dict(),
        }
    )


def _calibrate(prep: Prepared, done: Progress, trainable: nn.Module, val_idx: np.ndarray) -> dict | None:
    """Temperature scaling on the validation patients: fit T on the best epoch's validation logits and store it
    in the kept best and last weights (``Heads.temperature``). None where there are no validation images.

    Runs before ``_final_references``: the validation images are not yet among a k-NN model's references.
    """
    from smse.calibration import fit_temperature, rescale
    from smse.metrics import expected_calibration_error

    if not len(val_idx) or done.best_state is None:
        return None
    with _holding(trainable, done.best_state):  # the epochs' weights hold T = 1
        _, probs = embed(prep, val_idx)
    targets = np.asarray(prep.dataset.targets)[val_idx]
    t = fit_temperature(np.log(np.clip(probs, 1e-12, None)), targets)
    _rewrite_kept(done, trainable, lambda: prep.model.heads.temperature.fill_(t))
    return {
        "temperature": t,
        "val_images": int(len(val_idx)),
        "val_ece_before": expected_calibration_error(targets, probs),
        "val_ece_after": expected_calibration_error(targets, rescale(probs, t)),
    }


def _final_references(prep: Prepared, done: Progress, trainable: nn.Module, indices: np.ndarray) -> None:
    """With ``model.classifier=knn``, a finished run's references are every training *and validation* image.

    Validation patients stay out of the references while they choose the best epoch; once it is chosen,
    they are part of the archive a new image is compared with. Updates the kept best and last weights.
    """
    if prep.cfg.model.classifier == "knn":
        _rewrite_kept(done, trainable, lambda: _refresh_references(prep, indices))


@contextlib.contextmanager
def _holding(trainable: nn.Module, state: dict):
    """``trainable`` holds the weights ``state`` inside the block, its own again after it."""
    live = _copy(trainable)
    trainable.load_state_dict(state)
    try:
        yield
    finally:
        trainable.load_state_dict(live)


def _rewrite_kept(done: Progress, trainable: nn.Module, change: Callable[[], object]) -> None:
    """Apply ``change`` (which edits the live model) to the kept best and last weights, and have them written again."""
    for name in ("best_state", "last_state"):
        if getattr(done, name) is not None:
            with _holding(trainable, getattr(done, name)):
                change()
                setattr(done, name, _copy(trainable))
    done.written_epoch = -1  # the checkpoints on disk hold the weights before the change


def training_indices(prep: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation image indices (one magnification in ``single`` mode); every class must train."""
    cfg = prep.cfg
    single = cfg.sampler.magnification if cfg.sampler.mode == "single" else None
    train_idx, val_idx = prep.indices("train", single), prep.indices("val", single)
    if len(train_idx) == 0:
        raise ConfigError("data: the split left no training images" + (f" at {single}X" if single else ""))
    counts = _class_counts(prep, train_idx)
    if (counts == 0).any():
        missing = [prep.class_map.names[i] for i in np.flatnonzero(counts == 0)]
        raise ConfigError(f"data: no training image of class(es) {missing}; use more patients or another split")
    return train_idx, val_idx


def _class_counts(prep: Prepared, indices: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(prep.dataset.targets)[indices], minlength=len(prep.class_map))


def build_objective(prep: Prepared, train_idx: np.ndarray) -> Objective:
    """Classification loss (class balance from the training images) + metric loss + neighbourhood term, weighted."""
    cfg, L = prep.cfg, prep.cfg.loss
    counts = _class_counts(prep, train_idx).tolist()
    classification_weight = L.classification_weight
    if not prep.class_map.labelled:
        log.info(
            "unlabelled tiles: no classifier; the embedding trains on the same-spot %s loss%s",
            L.metric,
            " and the neighbourhood term" if L.structure_weight > 0 else "",
        )
        classification_weight = 0.0
    return Objective(
        make_classification_loss(L.classification, counts, L.alpha, L.gamma, L.balance, L.ohem_keep),
        make_metric_loss(
            L.metric,
            margin=L.margin,
            strategy=L.mining,
            cross_magnification=cfg.sampler.mode == "cross-magnification",
            same_patient=cfg.sampler.same_patient,
            temperature=L.temperature,
        ),
        classification_weight,
        L.metric_weight,
        NeighbourhoodLoss(L.structure_temperature),
        L.structure_weight,
        L.structure_scope,
        cfg.sampler.positives,
        L.same_spot_weight,
    ).to(prep.device)


@torch.no_grad()
def _refresh_references(prep: Prepared, train_idx: np.ndarray) -> None:
    """With ``model.classifier=knn``: the training images' embeddings under the current weights become the
    classifier's references (every process sets them: DDP keeps buffers equal across processes)."""
    if prep.cfg.model.classifier != "knn":
        return
    emb, _ = embed(prep, train_idx)
    targets = torch.as_tensor(np.asarray(prep.dataset.targets)[train_idx])
    prep.model.heads.set_references(torch.from_numpy(emb), targets)


def _build_sampler(cfg: Config, prep: Prepared, train_idx: np.ndarray, dist: Dist):
    """Paper mode: offline tuples from the pooled set; same-spot positives: whole spots; otherwise
    magnification-balanced batches."""
    targets = np.asarray(prep.dataset.targets)[train_idx].tolist()
    if cfg.sampler.positives != "class":
        assert prep.spots is not None  # prepare() finds them for same-spot positives
        return SpotSampler(
            prep.spots.spot[train_idx],
            cfg.sampler.batch_size,
            cfg.seed,
            cfg.train.batches_per_epoch,
            cfg.train.min_batches_per_epoch,
        )
    if cfg.sampler.mode == "pooled" and cfg.loss.metric != "none":
        sampler = OfflineTupleSampler(
            targets,
            cfg.sampler.batch_size,
            cfg.loss.metric,
            cfg.seed,
            cfg.train.batches_per_epoch,
            cfg.train.min_batches_per_epoch,
        )
        if (sampler.tuples_per_batch * sampler.arity) % dist.world:
            raise ConfigError("sampler.batch_size: paper-mode tuples do not split evenly over the processes")
        return sampler
    mags = [prep.records[i].magnification for i in train_idx]
    patients = [prep.records[i].patient for i in train_idx] if cfg.sampler.balance == "patient" else None
    return MagnificationBalancedSampler(
        targets,
        mags,
        cfg.sampler.batch_size,
        cfg.seed,
        cfg.train.batches_per_epoch,
        patients,
        cfg.train.min_batches_per_epoch,
    )


def _trainable_module(prep: Prepared, train_idx: np.ndarray) -> nn.Module:
    """The heads (frozen backbone) or the whole network (fine-tuning).

    Frozen mode with ``model.standardize``: the heads first standardise features by the mean and
    standard deviation of the training images' cached features (every view), a fixed, seed-free step.
    """
    if prep.cfg.model.freeze_backbone:
        prep.model.backbone.requires_grad_(False)
        if prep.cfg.model.standardize:
            prep.model.heads.standardize_from(_cached_features(prep)[train_idx])
        return prep.model.heads
    return prep.model


def _cached_features(prep: Prepared) -> torch.Tensor:
    """The backbone features of frozen mode, which ``prepare`` computes."""
    if prep.features is None:
        raise RuntimeError("model.freeze_backbone: no cached features; prepare() computes them in frozen mode")
    return prep.features


def _build_optimizer(cfg: Config, trainable: nn.Module, device: torch.device):
    """Adam, a step schedule, and a gradient scaler (active for float16 autocast on CUDA only)."""
    optimizer = torch.optim.Adam(trainable.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.train.step_size, cfg.train.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=_amp(device, _use_amp(cfg))[1] == torch.float16)
    return optimizer, scheduler, scaler


def _use_amp(cfg: Config) -> bool:
    """Mixed precision for fine-tuning on CUDA; frozen-feature heads train in float32."""
    return cfg.train.amp and not cfg.model.freeze_backbone


def _restore(state: dict | None, trainable: nn.Module, optimizer, scheduler, scaler, run: Path) -> Progress:
    """Load a saved state into the training objects; a fresh Progress when there is none."""
    if state is None:
        return Progress()
    trainable.load_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return Progress(
        state["epoch"],
        state["history"],
        state["best"],
        state["best_epoch"],
        state["best_row"],
        state["best_state"],
        _copy(trainable),
        _checkpoint_epoch(RunFiles(run).checkpoint("last")),
    )


def _checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint on disk holds (0 when there is none or it cannot be read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("epoch", 0))
    except Exception:  # noqa: BLE001 - a missing or unreadable file holds no epoch
        return 0


def _copy(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _amp(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return contextlib.nullcontext(), None


def _gather(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t))


def _train_epoch(
    prep: Prepared,
    net: nn.Module,
    objective: Objective,
    sampler,
    optimizer,
    scaler,
    train_idx: np.ndarray,
    epoch: int,
    dist: Dist,
    callbacks: Sequence[StepCallback],
    progress: bool,
) -> dict:
    """One pass of the sampler's batches; returns the epoch's mean loss parts and statistics."""
    cfg, device = prep.cfg, prep.device
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    view_of = np.random.default_rng([cfg.seed, epoch, 5]).integers(0, cfg.model.views, len(prep.records))
    prep.dataset.epoch = epoch
    net.train()
    amp_ctx, _ = _amp(device, _use_amp(cfg))
    batches = [Batch(train_idx[b.indices], b.tuples, b.classify) for b in sampler.epoch(epoch)]
    per = len(batches[0]) // dist.world
    mine_of = [b.indices[dist.rank * per : (dist.rank + 1) * per] for b in batches]  # this process's share
    images = (
        None
        if cfg.model.freeze_backbone
        else iter(
            DataLoader(
                prep.dataset,
                # index arrays work as batches as well as lists do; torch's stubs ask for lists
                batch_sampler=cast("list[list[int]]", mine_of),
                num_workers=cfg.train.num_workers,
                pin_memory=device.type == "cuda",
            )
        )
    )
    targets = torch.as_tensor(prep.dataset.targets)
    spots = None if prep.spots is None else torch.from_numpy(prep.spots.spot)
    mags = torch.tensor([r.magnification for r in prep.records])
    patients = torch.tensor([prep.patient_ids[r.patient] for r in prep.records])
    sums: dict[str, float] = {}
    started = time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=None if progress else True, leave=False)
    for step, batch in enumerate(bar):
        mine = mine_of[step]
        inputs = (
            _cached_features(prep)[mine, view_of[mine]].to(device)
            if images is None
            else next(images)[0].to(device, non_blocking=True)
        )
        with amp_ctx:
            emb, logits, feats = net(inputs, return_inputs=True)
        emb, logits = _gather(emb.float(), dist), _gather(logits.float(), dist)
        feats = _gather(feats.detach().float(), dist) if objective.structure is not None else None
        idx = batch.indices
        tuples = None if batch.tuples is None else tuple(torch.as_tensor(t, device=device) for t in batch.tuples)
        classify = None if batch.classify is None else torch.as_tensor(batch.classify, device=device)
        parts = objective(
            emb,
            logits,
            targets[idx].to(device),
            mags[idx].to(device),
            patients[idx].to(device),
            tuples,
            classify,
            feats,
            None if spots is None else spots[idx].to(device),
            None if prep.spots is None else prep.spots.ignore(idx).to(device),
        )
        if not torch.isfinite(parts["total"]):
            raise TrainingDiverged(
                f"loss became {parts['total'].item()} at epoch {epoch + 1}, step {step + 1} "
                f"({', '.join(f'{k}={v.item():.4g}' for k, v in parts.items())}); the last good "
                f"checkpoint is {Path(cfg.out) / 'last.safetensors'}; lower train.lr?"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        values = {f"loss_{k}": v.item() for k, v in parts.items()}
        values.update({f"{k}_per_step": v for k, v in objective.stats().items()})
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if not bar.disable:
            bar.set_postfix({k: f"{v / (step + 1):.4f}" for k, v in sums.items() if k.startswith("loss_")})
        for cb in callbacks:
            cb(epoch, step, parts)
    return {
        "epoch": epoch + 1,
        "seconds": time.perf_counter() - started,
        **{k: v / len(batches) for k, v in sums.items()},
    }


def _validate(prep: Prepared, val_idx: np.ndarray) -> dict:
    """Image- and patient-level accuracy of the validation patients (never test patients)."""
    _, probs = embed(prep, val_idx)
    pred = probs.argmax(1)
    truth = np.asarray(prep.dataset.targets)[val_idx]
    patients = [prep.records[i].patient for i in val_idx]
    return {
        "val_image_accuracy": image_accuracy(truth, pred),
        "val_patient_accuracy": patient_accuracy(truth, pred, patients),
    }


def _record_epoch(done: Progress, row: dict, trainable: nn.Module) -> None:
    """Append the epoch's row; keep the weights when validation improved (or, without validation, the latest)."""
    done.epoch = row["epoch"]
    done.history.append(row)
    done.last_state = _copy(trainable)
    score = row.get("val_patient_accuracy", row["epoch"])
    if score > done.best:
        done.best, done.best_epoch, done.best_row, done.best_state = score, row["epoch"], row, done.last_state


def _save_progress(
    run: Path, prep: Prepared, done: Progress, trainable: nn.Module, optimizer, scheduler, scaler
) -> None:
    """state.pt (the resume point) and history every epoch; the checkpoints at most every CHECKPOINT_EVERY_S."""
    files = RunFiles(run)
    files.write_history(done.history)
    if time.monotonic() - done.written_at >= CHECKPOINT_EVERY_S:
        _write_checkpoints(run, prep, done, trainable)
    state = {
        "epoch": done.epoch,
        "trainable": done.last_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "history": done.history,
        "best": done.best,
        "best_epoch": done.best_epoch,
        "best_row": done.best_row,
        "best_state": done.best_state,
        "config": _resume_key(prep.cfg),
        "data": split_fingerprint(prep.records),
    }
    files.write_state(state)


def _write_checkpoints(run: Path, prep: Prepared, done: Progress, trainable: nn.Module) -> None:
    """best.safetensors and last.safetensors as of the last completed epoch, unless already on disk.

    They are built from the weights kept at epoch ends, never from the live module, which may be
    mid-epoch (an interrupt) or broken (divergence); last is not overwritten with non-finite weights.
    """
    if done.last_state is None or done.written_epoch == done.epoch:
        return
    model, cfg = prep.model, prep.cfg
    prefix = "heads." if trainable is model.heads else ""
    current = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def full(part: dict) -> dict:
        return {**current, **{prefix + k: v for k, v in part.items()}}

    if all(torch.isfinite(v).all() for v in done.last_state.values() if v.is_floating_point()):
        save_checkpoint(
            RunFiles(run).checkpoint("last"),
            model,
            cfg,
            prep.class_map,
            done.epoch,
            done.history[-1],
            prep.weights,
            state=full(done.last_state),
        )
    if done.best_state is not None:
        save_checkpoint(
            RunFiles(run).checkpoint("best"),
            model,
            cfg,
            prep.class_map,
            done.best_epoch,
            done.best_row,
            prep.weights,
            state=full(done.best_state),
        )
    done.written_epoch, done.written_at = done.epoch, time.monotonic()


__all__ = [
    "train",
    "training_indices",
    "build_objective",
]
