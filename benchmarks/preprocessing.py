"""What input preprocessing is worth on real patients: a linear probe on frozen features under each variant.

The same logistic regression (``smse.baselines.linear_probe``) on the plain-view features of
``../shared/data/breakhis-sample``, leave-one-patient-out and patient-grouped 5-fold x 3, for:

- the architecture the offline EfficientNet-Lite0 weights are loaded into: timm's
  ``efficientnet_lite0`` (symmetric padding; what the package used before) or ``tf_efficientnet_lite0``
  (TensorFlow's "same" padding, the architecture these TensorFlow-trained weights come from);
- the input scaling: ImageNet mean/std (before) or (x - 127) / 128 (the weights' own);
- the image size, and the Lite1 and Lite2 weights at their native scale.

Run: python benchmarks/preprocessing.py
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, SAMPLE, machine  # noqa: E402

from smse.baselines import linear_probe, out_of_fold, patient_folds  # noqa: E402
from smse.config import DataConfig  # noqa: E402
from smse.data.images import ImageCache  # noqa: E402
from smse.data.loading import load_data  # noqa: E402
from smse.data.transforms import to_tensor  # noqa: E402
from smse.metrics import patient_accuracy, roc_auc  # noqa: E402
from smse.models.backbones import IMAGENET_MEAN, IMAGENET_STD, LITE_WEIGHTS  # noqa: E402

LITE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
VARIANTS = [  # (label, timm architecture, Lite weights, (height, width), scaling)
    ("before: efficientnet_lite0, ImageNet mean/std, 224x336", "efficientnet_lite0", 0, (224, 336), IMAGENET),
    ("efficientnet_lite0, (x-127)/128, 224x336", "efficientnet_lite0", 0, (224, 336), LITE),
    ("tf_efficientnet_lite0, ImageNet mean/std, 224x336", "tf_efficientnet_lite0", 0, (224, 336), IMAGENET),
    ("tf_efficientnet_lite0, (x-127)/128, 224x336", "tf_efficientnet_lite0", 0, (224, 336), LITE),
    ("tf_efficientnet_lite0, (x-127)/128, 320x480", "tf_efficientnet_lite0", 0, (320, 480), LITE),
    ("tf_efficientnet_lite0, (x-127)/128, 460x700 (default)", "tf_efficientnet_lite0", 0, (460, 700), LITE),
    ("tf_efficientnet_lite1, (x-127)/128, 240x360", "tf_efficientnet_lite1", 1, (240, 360), LITE),
    ("tf_efficientnet_lite2, (x-127)/128, 260x390", "tf_efficientnet_lite2", 2, (260, 390), LITE),
]


def lite_model(arch: str, variant: int) -> torch.nn.Module:
    """The offline Lite weights loaded in order into timm's ``arch`` (any padding), as pooled features."""
    import importlib

    import timm

    package, file_class = LITE_WEIGHTS[variant]
    source = torch.load(
        getattr(importlib.import_module(package), file_class).get_model_file_path(),
        map_location="cpu",
        weights_only=True,
    )
    model = timm.create_model(arch, pretrained=False, num_classes=1000)
    model.load_state_dict(dict(zip(model.state_dict().keys(), source.values())))
    model.reset_classifier(0)
    return model.eval()


@torch.no_grad()
def features(model, records, size, scaling, cache_dir: Path) -> np.ndarray:
    cache = ImageCache(cache_dir, size)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in scaling)
    out = []
    for start in range(0, len(records), 16):
        x = torch.stack([to_tensor(cache.load(r.path)) for r in records[start : start + 16]])
        out.append(model((x - mean) / std))
    return torch.cat(out).numpy()


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not (SAMPLE / "BreaKHis_v1").is_dir():
        sys.exit(f"the real sample is not at {SAMPLE}")
    cache_dir = OUT / "cache"
    records = load_data(DataConfig(root=str(SAMPLE), cache_dir=str(cache_dir)), split=False).records
    y = np.array([r.label == "malignant" for r in records], dtype=int)
    patients = np.array([r.patient for r in records])
    plans = {"LOPO": patient_folds(records, None), "5-fold x 3": patient_folds(records, 5, 3)}
    print(f"# preprocessing on real patients; {date.today()}; {machine()}")
    print(
        f"# {len(records)} images, {len(set(patients))} patients; logistic regression on the plain view; "
        "patient-level accuracy / ROC-AUC, mean over repeats"
    )
    print("| variant | LOPO patient acc | LOPO AUC | 5-fold x 3 patient acc | 5-fold x 3 AUC | seconds |")
    print("|---|---|---|---|---|---|")
    for label, arch, variant, size, scaling in VARIANTS:
        started = time.perf_counter()
        x = features(lite_model(arch, variant), records, size, scaling, cache_dir)
        cells = []
        for plan in plans.values():
            probs = out_of_fold(linear_probe, x, y, patients, plan)
            accs = [patient_accuracy(y, (prob >= 0.5).astype(int), patients) for prob in probs]
            aucs = [roc_auc(y, prob) for prob in probs]
            cells += [f"{100 * np.mean(accs):.1f}", f"{np.mean(aucs):.3f}"]
        print(f"| {label} | " + " | ".join(cells) + f" | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
