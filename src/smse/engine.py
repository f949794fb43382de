"""Training: frozen-feature or full fine-tuning, multi-scale sampling, validation by patient, exact resume, DDP."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from smse.checkpoint import build_model, save_checkpoint
from smse.config import Config, save_config, to_dict
from smse.data.dataset import RecordDataset
from smse.data.images import ImageCache
from smse.data.loading import LoadedData, cache_dir_of, load_data
from smse.data.manifest import write_manifest
from smse.data.records import ClassMap, Record
from smse.data.samplers import MagnificationBalancedSampler, OfflineTupleSampler
from smse.errors import ConfigError, TrainingDiverged
from smse.features import cached_features, feature_key
from smse.io import atomic_path, write_json
from smse.losses import Objective, make_classification_loss, make_metric_loss
from smse.metrics import image_accuracy, patient_accuracy
from smse.models import Embedder
from smse.runfolder import check_finite_weights, check_resume_data, guarded, split_fingerprint
from smse.runtime import Dist, resolve_device, seed_everything, versions

StepCallback = Callable[[int, int, dict], None]


@dataclass
class Prepared:
    """Everything a run needs before its first step."""

    cfg: Config
    data: LoadedData
    class_map: ClassMap
    model: Embedder
    weights: str
    dataset: RecordDataset
    device: torch.device
    features: torch.Tensor | None = None  # [N, views, F] in frozen mode
    patient_ids: dict[str, int] = field(default_factory=dict)

    @property
    def records(self) -> list[Record]:
        return self.data.records

    def indices(self, split: str, magnification: int | None = None) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.records)
                         if r.split == split and (magnification is None or r.magnification == magnification)], dtype=int)


def prepare(cfg: Config, dist: Dist = Dist(), progress: bool = True, data: LoadedData | None = None,
            trained: tuple[Embedder, ClassMap, str] | None = None) -> Prepared:
    """Load and split the data, build the model, and (frozen mode) compute or load the cached features.

    Args:
        trained: a loaded model, its class map and backbone weights id, to use instead of a new model.
    """
    device = resolve_device(cfg.train.device, dist.local_rank)
    data = data or load_data(cfg.data)
    seed_everything(cfg.seed, cfg.train.deterministic)
    if trained is not None:
        model, class_map, weights = trained
    else:
        class_map = ClassMap.from_records(data.records, cfg.data.task)
        model, weights = build_model(cfg, len(class_map))
    size = tuple(cfg.data.image_size)
    cache = ImageCache(cache_dir_of(cfg.data), size)
    dataset = RecordDataset(data.records, class_map, size, cache, augment=not cfg.model.freeze_backbone, seed=cfg.seed)
    prepared = Prepared(cfg, data, class_map, model.to(device), weights, dataset, device,
                        patient_ids={p: i for i, p in enumerate(sorted({r.patient for r in data.records}))})
    if cfg.model.freeze_backbone:
        key = feature_key(data.records, f"{cfg.model.backbone}|{weights}", size, cfg.model.views, cfg.seed)
        if not dist.main:
            dist.barrier()  # the main process fills the cache first; the others then read it
        prepared.features = cached_features(model, dataset, cfg.model.views, cache_dir_of(cfg.data), key,
                                            device=device, progress=progress)
        if dist.main:
            dist.barrier()
    return prepared


@torch.no_grad()
def embed(prep: Prepared, indices: Sequence[int], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and class probabilities of the plain view of ``indices`` (from cached features in frozen mode)."""
    model = prep.model
    model.eval()
    embs, probs = [], []
    for start in range(0, len(indices), batch_size):
        idx = list(indices[start:start + batch_size])
        if prep.features is not None:
            emb, logits = model.heads(prep.features[idx, 0].to(prep.device))
        else:
            images = torch.stack([prep.dataset.view(i, 0) for i in idx]).to(prep.device)
            emb, logits = model(images)
        embs.append(emb.float().cpu())
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    if not embs:
        return np.zeros((0, prep.cfg.model.embedding_dim)), np.zeros((0, len(prep.class_map)))
    return torch.cat(embs).numpy(), torch.cat(probs).numpy()


def _gather(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t))


def _amp(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return contextlib.nullcontext(), None


@guarded
def train(cfg: Config, callbacks: Sequence[StepCallback] = (), progress: bool = True,
          data: LoadedData | None = None) -> Path:
    """Train a model as ``cfg`` says; resumes exactly from ``cfg.out/state.pt`` when it exists.

    The run folder is locked while training; Ctrl-C raises ``Interrupted``, saying how to resume.

    Returns:
        The run folder, holding ``best.safetensors``, ``last.safetensors``, ``history.json``,
        ``config.yaml``, ``versions.json``, ``split.csv`` and ``data.json``.
    """
    dist = Dist.from_env()
    run = Path(cfg.out)
    if cfg.sampler.batch_size % dist.world:
        raise ConfigError(f"sampler.batch_size: {cfg.sampler.batch_size} is not divisible by the {dist.world} processes")
    state_path = run / "state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=False) if state_path.exists() else None
    if state is not None and state["config"] != _resume_key(cfg):
        raise ConfigError(f"{state_path}: this run folder holds a run with another config; "
                          "use another out folder or delete it")
    device = resolve_device(cfg.train.device, dist.local_rank)
    dist.init(device)
    data = data or load_data(cfg.data)
    check_resume_data(state, data.records, run)  # before any features are computed for data it would refuse
    prep = prepare(cfg, dist, progress and dist.main, data)
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        write_json(run / "versions.json", versions())
        write_manifest(run / "split.csv", prep.records)
        write_json(run / "data.json", {"summary": prep.data.summary_line(), "skipped": prep.data.skipped,
                                       "duplicates": asdict(prep.data.duplicates), "backbone_weights": prep.weights,
                                       "class_map": prep.class_map.to_dict()})
    single = cfg.sampler.magnification if cfg.sampler.mode == "single" else None
    train_idx, val_idx = prep.indices("train", single), prep.indices("val", single)
    if len(train_idx) == 0:
        raise ConfigError("data: the split left no training images" + (f" at {single}X" if single else ""))
    targets = torch.tensor(prep.dataset.targets)
    mags = torch.tensor([r.magnification for r in prep.records])
    patients = torch.tensor([prep.patient_ids[r.patient] for r in prep.records])
    counts = np.bincount(targets[train_idx].numpy(), minlength=len(prep.class_map))
    if (counts == 0).any():
        missing = [prep.class_map.names[i] for i in np.flatnonzero(counts == 0)]
        raise ConfigError(f"data: no training image of class(es) {missing}; use more patients or another split")
    L = cfg.loss
    objective = Objective(
        make_classification_loss(L.classification, counts.tolist(), L.alpha, L.gamma, L.balance, L.ohem_keep),
        make_metric_loss(L.metric, margin=L.margin, strategy=L.mining,
                         cross_magnification=cfg.sampler.mode == "cross-magnification",
                         same_patient=cfg.sampler.same_patient),
        L.classification_weight, L.metric_weight).to(device)
    paper = cfg.sampler.mode == "pooled" and L.metric != "none"
    if paper:
        sampler = OfflineTupleSampler(targets[train_idx].tolist(), cfg.sampler.batch_size, L.metric, cfg.seed,
                                      cfg.train.batches_per_epoch)
    else:
        sampler = MagnificationBalancedSampler(targets[train_idx].tolist(), mags[train_idx].tolist(),
                                               cfg.sampler.batch_size, cfg.seed, cfg.train.batches_per_epoch)
    arity = 3 if L.metric == "triplet" else 2
    if paper and (cfg.sampler.batch_size // arity * arity) % dist.world:
        raise ConfigError("sampler.batch_size: paper-mode tuples do not split evenly over the processes")

    model = prep.model
    trainable: nn.Module = model.heads if cfg.model.freeze_backbone else model
    if cfg.model.freeze_backbone:
        model.backbone.requires_grad_(False)
    optimizer = torch.optim.Adam(trainable.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.train.step_size, cfg.train.lr_gamma)
    amp_ctx, amp_dtype = _amp(device, cfg.train.amp and not cfg.model.freeze_backbone)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_epoch, history, best = 0, [], -math.inf
    if state is not None:
        trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        if dist.main and progress:
            print(f"resuming {run} after epoch {start_epoch}")
    net: nn.Module = trainable
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(start_epoch, cfg.train.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        view_of = np.random.default_rng([cfg.seed, epoch, 5]).integers(0, cfg.model.views, len(prep.records))
        prep.dataset.epoch = epoch
        trainable.train()
        sums: dict[str, float] = {}
        steps = 0
        started = time.perf_counter()
        batches = [train_idx[b] for b in sampler.epoch(epoch)]
        per = len(batches[0]) // dist.world
        mine_of = [b[dist.rank * per:(dist.rank + 1) * per] for b in batches]  # this process's share
        images = None if cfg.model.freeze_backbone else iter(DataLoader(
            prep.dataset, batch_sampler=mine_of, num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda"))
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=None if progress and dist.main else True, leave=False)
        for step, batch in enumerate(bar):
            mine = mine_of[step]
            if images is None:
                inputs = prep.features[mine, view_of[mine]].to(device)
            else:
                inputs = next(images)[0].to(device, non_blocking=True)
            with amp_ctx:
                emb, logits = net(inputs)
            emb, logits = _gather(emb.float(), dist), _gather(logits.float(), dist)
            b_t, b_m, b_p = targets[batch].to(device), mags[batch].to(device), patients[batch].to(device)
            tuples = classify = None
            if paper:
                T = len(batch) // arity
                ar = torch.arange(T, device=device)
                tuples = (ar, ar + T, ar + 2 * T) if L.metric == "triplet" else (ar, ar + T, (b_t[:T] == b_t[T:2 * T]).long())
                classify = ar
            parts = objective(emb, logits, b_t, b_m, b_p, tuples, classify)
            if not torch.isfinite(parts["total"]):
                raise TrainingDiverged(f"loss became {parts['total'].item()} at epoch {epoch + 1}, step {step + 1} "
                                       f"({', '.join(f'{k}={v.item():.4g}' for k, v in parts.items())}); "
                                       f"the last good checkpoint is {run / 'last.safetensors'}; lower train.lr?")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(parts["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
            steps += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            if not bar.disable:
                bar.set_postfix({k: f"{v / steps:.4f}" for k, v in sums.items() if k != "tuples"})
            for cb in callbacks:
                cb(epoch, step, parts)
        scheduler.step()
        check_finite_weights(trainable, epoch + 1, run)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
               **{f"loss_{k}" if k != "tuples" else "tuples_per_step": v / max(steps, 1) for k, v in sums.items()}}
        if len(val_idx) and dist.main:  # validation and checkpoints are the main process's job
            _, probs = embed(prep, val_idx)
            pred = probs.argmax(1)
            t_val = targets[val_idx].numpy()
            p_val = [prep.records[i].patient for i in val_idx]
            row["val_image_accuracy"] = image_accuracy(t_val, pred)
            row["val_patient_accuracy"] = patient_accuracy(t_val, pred, p_val)
        history.append(row)
        score = row.get("val_patient_accuracy", epoch)
        improved = score > best
        best = max(best, score)
        if dist.main:
            save_checkpoint(run / "last.safetensors", model, cfg, prep.class_map, epoch + 1, row, prep.weights)
            if improved:
                save_checkpoint(run / "best.safetensors", model, cfg, prep.class_map, epoch + 1, row, prep.weights)
            write_json(run / "history.json", history)
            state = {"epoch": epoch + 1, "trainable": trainable.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": history,
                     "best": best, "config": _resume_key(cfg), "data": split_fingerprint(prep.records)}
            with atomic_path(state_path) as tmp:
                torch.save(state, tmp)
            if progress:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "lr", "seconds"))
                print(f"epoch {epoch + 1}/{cfg.train.epochs} ({row['seconds']:.1f} s): {shown}")
        dist.barrier()
    if dist.main:
        write_json(run / "run.json", {"finished": True, "epochs": cfg.train.epochs, "best_val": best,
                                      "backbone_weights": prep.weights, "data": prep.data.summary_line()})
    return run


def _resume_key(cfg: Config) -> dict:
    """The config a resumed run must share (more epochs, another device or worker count are fine)."""
    d = to_dict(cfg)
    for k in ("epochs", "device", "num_workers"):
        d["train"].pop(k)
    return d

