"""Real patients: the shipped default must not fall below a tuned linear probe on its own features, and its
embedding must not collapse to one point per class.

Five patient-grouped folds of ``../shared/data/breakhis-sample`` (38 patients), the default ``breakhis``
config at a smaller image size with one view (so the test takes about a minute), trained through the
trainer; the probe is scikit-learn's logistic regression on the same frozen features with C chosen by
patient-grouped cross-validation on each fold's training patients. The tolerances are about the
half-widths of the paired bootstrap intervals of the differences between the two on this sample
(BENCHMARKS.md, "Real BreakHis patients"): a larger gap is more than the sample's noise. Patient-level
accuracy alone would let a head that learned nothing pass (always "malignant" scores the majority rate,
63%), so the ranking (ROC-AUC, 0.5 for a constant) is checked too.

The collapse the default once had (two points: 97% of the variance on one axis, effective rank about
1) is refused by the spread of each fold's reference embeddings, and the tumour-type retrieval of
the test patients must not fall below the frozen features' by more than the sample's noise.
"""

import numpy as np
import pytest

from smse.baselines import out_of_fold, patient_folds, tuned_linear_probe
from smse.config import load_config
from smse.cv import heads_out_of_fold
from smse.data.loading import LoadedData, load_data
from smse.metrics import patient_accuracy, roc_auc
from smse.prepare import prepare
from smse.similarity import embedding_spread, type_retrieval

SMALL = ["data.image_size=[224, 336]", "model.views=1"]
TOLERANCE = 0.08  # patient-level accuracy
AUC_TOLERANCE = 0.08
MAX_FIRST_AXIS = 0.5  # share of the references' variance on their first axis (collapsed: 0.97)
MIN_EFFECTIVE_RANK = 10.0  # collapsed: about 1
TYPE_TOLERANCE = 0.05  # tumour-type precision@5 (the bootstrap half-width on this sample is about 0.04)
MIN_QUARTILE_RATIO = 0.2  # distances: 25% quantile / 75% quantile (a two-point embedding: near 0 / near 4)


@pytest.mark.slow
def test_default_is_not_below_the_tuned_probe_and_does_not_collapse_on_real_patients(
    sample_root, tmp_path, overrides=()
):
    cfg = load_config("breakhis", [f"data.root={sample_root}", f"out={tmp_path / 'unused'}", *SMALL, *overrides])
    records = [r.with_split("train") for r in load_data(cfg.data, split=False).records]
    prep = prepare(cfg, progress=False, data=LoadedData(records, {}))
    features = prep.features[:, 0].numpy()
    y = np.array([r.label == "malignant" for r in records], dtype=int)
    patients = np.array([r.patient for r in records])
    plan = patient_folds(records, k=5, repeats=1)

    probe = out_of_fold(tuned_linear_probe, features, y, patients, plan)[0]
    folds: list = []
    heads = heads_out_of_fold(cfg, records, plan, tmp_path / "folds", folds)[0][:, 1]
    assert not np.isnan(probe).any() and not np.isnan(heads).any()  # every image tested once
    default = patient_accuracy(y, (heads >= 0.5).astype(int), patients)
    baseline = patient_accuracy(y, (probe >= 0.5).astype(int), patients)
    auc, auc_baseline = roc_auc(y, heads), roc_auc(y, probe)

    types = np.array([r.tumor_type for r in records])
    labels = np.array([r.label for r in records])
    spreads, type_p5, frozen_p5 = [], [], []
    for f in folds[0]:
        q, g = f.test, f.references
        spreads.append(embedding_spread(f.reference_embeddings))
        ours = type_retrieval(
            f.test_embeddings,
            types[q],
            labels[q],
            patients[q],
            f.reference_embeddings,
            types[g],
            labels[g],
            patients[g],
        )["all"]
        mean, std = features[g].mean(0), features[g].std(0) + 1e-6
        frozen = type_retrieval(
            (features[q] - mean) / std,
            types[q],
            labels[q],
            patients[q],
            (features[g] - mean) / std,
            types[g],
            labels[g],
            patients[g],
        )["all"]
        type_p5.append((ours["precision_at_5"], ours["queries"]))
        frozen_p5.append((frozen["precision_at_5"], frozen["queries"]))

    def weighted(v):
        return sum(p * n for p, n in v if n) / sum(n for _, n in v)

    first_axis = max(s["first_axis_share"] for s in spreads)
    rank = min(s["effective_rank"] for s in spreads)
    # a step function of the class: half the distances near 0 (same class), half near 4 (antipodes)
    quartiles = min(s["distance_quantiles"][1] / s["distance_quantiles"][3] for s in spreads)
    print(
        f"patient-level accuracy: default {default:.3f}, tuned probe {baseline:.3f}; ROC-AUC: default {auc:.3f}, "
        f"tuned probe {auc_baseline:.3f}; references: first axis at most {first_axis:.3f}, effective rank at least "
        f"{rank:.1f}, distance quartile ratio at least {quartiles:.2f}; type P@5: default {weighted(type_p5):.3f}, "
        f"frozen features {weighted(frozen_p5):.3f}"
    )
    assert default >= baseline - TOLERANCE, (default, baseline)
    assert auc >= auc_baseline - AUC_TOLERANCE, (auc, auc_baseline)
    assert first_axis <= MAX_FIRST_AXIS, spreads
    assert rank >= MIN_EFFECTIVE_RANK, spreads
    assert quartiles >= MIN_QUARTILE_RATIO, spreads
    assert weighted(type_p5) >= weighted(frozen_p5) - TYPE_TOLERANCE, (type_p5, frozen_p5)
