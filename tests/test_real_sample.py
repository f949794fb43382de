"""Real patients: the shipped default must not fall below an independent linear probe on its own features.

Five patient-grouped folds of ``../shared/data/breakhis-sample`` (38 patients), the default
``breakhis`` config at a smaller image size with one view (so the test takes about a minute),
trained through the trainer; the probe is scikit-learn's logistic regression on the same frozen
features. The tolerances are about the half-widths of the paired bootstrap intervals of the
differences between the two on this sample (BENCHMARKS.md, "Real BreakHis patients"): a larger
gap is more than the sample's noise. Patient-level accuracy alone would let a head that learned
nothing pass (always "malignant" scores the majority rate, 63%), so the ranking (ROC-AUC, 0.5 for
a constant) is checked too.
"""

import numpy as np

from smse.baselines import linear_probe, out_of_fold, patient_folds
from smse.config import load_config
from smse.cv import heads_out_of_fold
from smse.data.loading import LoadedData, load_data
from smse.metrics import patient_accuracy, roc_auc
from smse.prepare import prepare

SMALL = ["data.image_size=[224, 336]", "model.views=1"]
TOLERANCE = 0.08  # patient-level accuracy
AUC_TOLERANCE = 0.08


def test_default_is_not_below_the_linear_probe_on_real_patients(sample_root, tmp_path, overrides=()):
    cfg = load_config("breakhis", [f"data.root={sample_root}", f"out={tmp_path / 'unused'}", *SMALL, *overrides])
    records = [r.with_split("train") for r in load_data(cfg.data, split=False).records]
    prep = prepare(cfg, progress=False, data=LoadedData(records, {}))
    features = prep.features[:, 0].numpy()
    y = np.array([r.label == "malignant" for r in records], dtype=int)
    patients = np.array([r.patient for r in records])
    plan = patient_folds(records, k=5, repeats=1)
    probe = out_of_fold(linear_probe, features, y, patients, plan)[0]
    heads = heads_out_of_fold(cfg, records, plan, tmp_path / "folds")[0][:, 1]
    assert not np.isnan(probe).any() and not np.isnan(heads).any()  # every image tested once
    default = patient_accuracy(y, (heads >= 0.5).astype(int), patients)
    baseline = patient_accuracy(y, (probe >= 0.5).astype(int), patients)
    auc, auc_baseline = roc_auc(y, heads), roc_auc(y, probe)
    print(f"patient-level accuracy: default {default:.3f}, linear probe {baseline:.3f}; "
          f"ROC-AUC: default {auc:.3f}, linear probe {auc_baseline:.3f}")
    assert default >= baseline - TOLERANCE, (default, baseline)
    assert auc >= auc_baseline - AUC_TOLERANCE, (auc, auc_baseline)
