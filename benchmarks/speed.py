"""Speed, as ratios measured side by side in one run on one machine.

(a) SMSE training step (online triplet mining + RFL) vs a plain cross-entropy step, same backbone and batch.
(b) frozen-feature mode vs full fine-tuning, time per epoch of the demo set's training split.
(c) the paper's offline triplets (three forward passes per triplet) vs in-batch mining: useful triplets / s.
(d) `smse predict` (decode, resize, forward, k-NN, CSV) vs a bare decode + forward loop on the same images.
(e) k-NN search, torch top-k vs faiss, 10^3 .. 10^6 reference embeddings, with index memory.

Run: python benchmarks/speed.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, machine, synthetic_set  # noqa: E402

from smse.checkpoint import build_model  # noqa: E402
from smse.config import load_config  # noqa: E402
from smse.data.breakhis import iter_image_files  # noqa: E402
from smse.data.images import load_resized  # noqa: E402
from smse.data.transforms import to_tensor  # noqa: E402
from smse.losses import Objective, TripletLoss, make_classification_loss  # noqa: E402
from smse.retrieval import faiss_available, search  # noqa: E402
from smse.runtime import seed_everything  # noqa: E402


def batch_of(files, size, n):
    return torch.stack([to_tensor(load_resized(f, size)) for f in files[:n]])


def paired_rates(step_a, step_b, steps: int, rounds: int = 3) -> tuple[float, float]:
    """Steps per second of two step functions, interleaved over rounds (best round each) after a warm-up of both."""
    step_a()
    step_b()
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for k, step in enumerate((step_a, step_b)):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[k] = min(best[k], (time.perf_counter() - start) / steps)
    return 1.0 / best[0], 1.0 / best[1]


def bench_training(files, cfg, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model, _ = build_model(cfg, 2)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = batch_of(files, tuple(cfg.data.image_size), batch)
    y = torch.arange(batch) % 2
    mags = torch.tensor([40, 100, 200, 400])[torch.arange(batch) % 4]
    smse = Objective(make_classification_loss("rfl", [1, 1]), TripletLoss(0.5, "semihard"))

    def ce_step():
        _, logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def smse_step():
        emb, logits = model(x)
        loss = smse(emb, logits, y, mags)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    ce, sm = (r * batch for r in paired_rates(ce_step, smse_step, steps))
    return {"ce_images_per_s": ce, "smse_images_per_s": sm, "ratio": sm / ce}


def bench_mining(files, cfg, images: int, steps: int) -> dict:
    """Useful (non-zero loss) triplets per second: offline triplets vs in-batch mining, same images per step.

    Both do a forward and backward pass on the same 48 images of the pretrained backbone with fresh
    heads (no optimiser step, so the count does not drift as the model fits the batch).
    """
    from smse.losses import mine_triplets

    torch.manual_seed(0)
    model, _ = build_model(cfg, 2)
    model.train()
    x = batch_of(files, tuple(cfg.data.image_size), images)
    y = torch.arange(images) % 2
    mags = torch.tensor([40, 100, 200, 400])[torch.arange(images) % 4]
    T = images // 3
    g = np.random.default_rng(0)
    yl = y.tolist()
    anchors = list(range(T))
    positives = [int(g.choice([j for j in range(T, images) if yl[j] == yl[i]])) for i in anchors]
    negatives = [int(g.choice([j for j in range(T, images) if yl[j] != yl[i]])) for i in anchors]
    order = torch.tensor(anchors + positives + negatives)  # three forward passes' worth of images per triplet
    a, p, n = torch.arange(T), torch.arange(T, 2 * T), torch.arange(2 * T, 3 * T)
    counts = {}

    def offline():
        emb, _ = model(x[order])
        d = torch.relu((emb[a] - emb[p]).pow(2).sum(1) - (emb[a] - emb[n]).pow(2).sum(1) + 0.5)
        counts["offline"] = int((d > 0).sum())
        model.zero_grad()
        d.mean().backward()

    def in_batch():
        emb, _ = model(x)
        ta, tp, tn = mine_triplets(emb, y, mags, strategy="all")
        d = torch.relu((emb[ta] - emb[tp]).pow(2).sum(1) - (emb[ta] - emb[tn]).pow(2).sum(1) + 0.5)
        counts["in_batch"] = int((d > 0).sum())
        model.zero_grad()
        d.mean().backward()

    off_rate, inb_rate = paired_rates(offline, in_batch, steps)
    off = off_rate * counts["offline"]
    inb = inb_rate * counts["in_batch"]
    return {
        "offline_useful_per_s": off,
        "in_batch_useful_per_s": inb,
        "ratio": inb / max(off, 1e-9),
        "offline_useful_per_step": counts["offline"],
        "in_batch_useful_per_step": counts["in_batch"],
    }


def bench_epochs(data_root: Path, cfg_overrides: list[str], steps: int) -> dict:
    """Frozen-feature epoch (heads on cached features) vs fine-tuning epoch (measured steps x batches)."""
    from smse.engine import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"data.root={data_root}", f"out={tmp}/frozen", "train.epochs=2", *cfg_overrides])
        train(cfg, progress=False)  # features cached on the first call (not timed)
        cfg.out = f"{tmp}/frozen2"
        start = time.perf_counter()
        train(cfg, progress=False)
        frozen = (time.perf_counter() - start) / 2
        ft = load_config(
            None,
            [
                f"data.root={data_root}",
                f"out={tmp}/ft",
                "model.freeze_backbone=false",
                "train.epochs=1",
                f"train.batches_per_epoch={steps}",
                *cfg_overrides,
            ],
        )
        start = time.perf_counter()
        train(ft, progress=False)
        per_step = (time.perf_counter() - start) / steps
        from smse.data.loading import load_data

        n_train = sum(1 for r in load_data(ft.data).records if r.split == "train")
    batches = int(np.ceil(n_train / ft.sampler.batch_size))
    fine = per_step * batches
    return {
        "frozen_epoch_s": frozen,
        "finetune_epoch_s": fine,
        "ratio": fine / frozen,
        "train_images": n_train,
        "note": f"fine-tuning epoch = {steps} measured steps x {batches} batches (includes one validation pass)",
    }


def bench_predict(run: Path, files: list[Path], cfg) -> dict:
    from smse.checkpoint import find_checkpoint, load_checkpoint
    from smse.predict import predict

    model, _, _, _ = load_checkpoint(find_checkpoint(run))
    size = tuple(cfg.data.image_size)

    @torch.no_grad()
    def bare():
        for s in range(0, len(files), 32):
            model(torch.stack([to_tensor(load_resized(f, size)) for f in files[s : s + 32]]))

    with tempfile.TemporaryDirectory() as tmp:
        t_bare, t_pred = float("inf"), float("inf")
        bare()
        predict(run, files[:8], Path(tmp) / "warm.csv", device="cpu")
        for _ in range(3):  # interleaved rounds, best of each, as in paired_rates
            t0 = time.perf_counter()
            bare()
            t_bare = min(t_bare, time.perf_counter() - t0)
            t0 = time.perf_counter()
            predict(run, files, Path(tmp) / "p.csv", device="cpu")
            t_pred = min(t_pred, time.perf_counter() - t0)
    return {
        "bare_images_per_s": len(files) / t_bare,
        "predict_images_per_s": len(files) / t_pred,
        "ratio": t_bare / t_pred,
    }


def bench_knn(sizes, dim: int = 64, queries: int = 256) -> list[dict]:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(queries, dim)).astype(np.float32)
    rows = []
    for n in sizes:
        refs = rng.normal(size=(n, dim)).astype(np.float32)
        row = {"references": n, "index_mb": refs.nbytes / 2**20}
        t0 = time.perf_counter()
        _, i_t = search(q, refs, 10, "torch")
        row["torch_s"] = time.perf_counter() - t0
        if faiss_available():
            t0 = time.perf_counter()
            _, i_f = search(q, refs, 10, "faiss")
            row["faiss_s"] = time.perf_counter() - t0
            row["same_answers"] = float((i_t == i_f).mean())
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps and sizes (a smoke run)")
    args = parser.parse_args()
    seed_everything(0)  # deterministic kernels, as the trainer runs by default (train.deterministic)
    steps = 2 if args.quick else 5
    data = synthetic_set()
    files = list(iter_image_files(data))
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.permutation(len(files))]
    base = ["model.backbone=efficientnet_lite0", "data.image_size=[128, 192]", "model.embedding_dim=64"]
    cfg = load_config(None, base)
    print(f"# speed benchmarks; {date.today()}; {machine()}")
    a = bench_training(files, cfg, batch=32, steps=steps)
    print(
        "(a) training step, EfficientNet-Lite0 fine-tuning, batch 32, 128x192: "
        f"plain CE {a['ce_images_per_s']:.1f} img/s, "
        f"SMSE (semi-hard triplets + RFL) {a['smse_images_per_s']:.1f} img/s; ratio {a['ratio']:.2f} (target >= 0.9)"
    )
    b = bench_epochs(data, base + ["model.views=2", "sampler.batch_size=64"], steps=steps)
    print(
        f"(b) epoch on {b['train_images']} training images: frozen features {b['frozen_epoch_s']:.2f} s, "
        f"fine-tuning {b['finetune_epoch_s']:.0f} s; frozen is {b['ratio']:.0f}x faster ({b['note']})"
    )
    c = bench_mining(files, cfg, images=48, steps=steps)
    print(
        f"(c) useful triplets/s with 48 images a step: offline triplets {c['offline_useful_per_s']:.0f} "
        f"({c['offline_useful_per_step']}/step), in-batch mining {c['in_batch_useful_per_s']:.0f} "
        f"({c['in_batch_useful_per_step']}/step); ratio {c['ratio']:.0f}x (target >= 3x)"
    )
    run = OUT / "speed-run"
    if not (run / "reference.npz").exists():
        from smse.engine import train
        from smse.evaluate import evaluate_run

        train(
            load_config(None, base + [f"data.root={data}", f"out={run}", "train.epochs=3", "model.views=2"]),
            progress=False,
        )
        evaluate_run(run, progress=False)
    d = bench_predict(run, files[: 256 if not args.quick else 32], cfg)
    print(
        f"(d) predict on {256 if not args.quick else 32} images: "
        f"bare decode+forward {d['bare_images_per_s']:.1f} img/s, "
        f"smse predict {d['predict_images_per_s']:.1f} img/s; ratio {d['ratio']:.2f} (target >= 0.85)"
    )
    sizes = [10**3, 10**4, 10**5] + ([] if args.quick else [10**6])
    print("(e) k-NN search, 256 queries, d=64, k=10:")
    print("| references | index MB | torch s | faiss s | same answers |")
    print("|---|---|---|---|---|")
    for row in bench_knn(sizes):
        print(
            f"| {row['references']:,} | {row['index_mb']:.0f} | {row['torch_s']:.3f} | "
            f"{row.get('faiss_s', float('nan')):.3f} | {row.get('same_answers', float('nan')):.3f} |"
        )


if __name__ == "__main__":
    main()
