"""Evaluation of a trained run: the literature's image- and patient-level tables, k-NN, retrieval, leakage probe,
what "similar" means in the embedding, and independent baselines on the frozen features in the same run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from smse.calibration import calibration_report
from smse.checkpoint import find_checkpoint, load_checkpoint
from smse.data.loading import LoadedData
from smse.errors import CheckpointError
from smse.io import writable_folder
from smse.metrics import by_magnification, patient_scores
from smse.prepare import Prepared, embed, prepare
from smse.retrieval import cross_magnification_matrix, knn_predict, magnification_probe
from smse.runfiles import RunFiles, save_embeddings
from smse.runfolder import check_finite_outputs
from smse.similarity import distance_guide, embedding_spread, same_patient_retrieval, type_retrieval
from smse.spots import localisation, localisation_table
from smse.tables import result_rows, results_table, table_note


def load_run(run: str | Path, which: str = "best"):
    """A run's model, config, class map, checkpoint metadata and its records with their splits."""
    path = find_checkpoint(run, which)
    model, cfg, class_map, meta = load_checkpoint(path)
    return model, cfg, class_map, meta, RunFiles(Path(path).parent).read_split()


def evaluate_run(run: str | Path, which: str = "best", progress: bool = True, backend: str | None = None) -> dict:
    """Evaluate the ``which`` checkpoint of ``run`` on its test split; writes ``run/eval/``.

    Returns:
        The metrics dictionary that is also written to ``eval/metrics.json``.
    """
    run = Path(run)
    model, cfg, class_map, meta, records = load_run(run, which)
    writable_folder(RunFiles(run).eval, "eval folder")  # a read-only run, a file at eval/: refused before the work
    records = RunFiles(run).read_checked_split()  # split.csv as training recorded it (fingerprint, leak guard)
    if records is None:
        raise CheckpointError(f"{run}: no split.csv; evaluate needs the run folder written by smse train")
    backend = backend or cfg.eval.knn_backend
    prep = prepare(
        cfg,
        progress=progress,
        data=LoadedData(records, {}),
        trained=(model, class_map, meta.get("backbone_weights", "")),
    )
    # references: every training and validation image, the archive a k-NN model votes with and a query is shown
    test, train = prep.indices("test"), np.sort(np.concatenate([prep.indices("train"), prep.indices("val")]))
    targets = np.asarray(prep.dataset.targets)
    recs = prep.records
    emb, probs = embed(prep, test, progress=progress)
    ref_emb, _ = embed(prep, train, progress=progress)
    check_finite_outputs(find_checkpoint(run, which), embeddings=emb, probabilities=probs, reference_embeddings=ref_emb)
    located = _localisation(prep, test, emb)
    if not class_map.labelled:
        return _write_label_free(run, which, meta, prep, test, train, emb, ref_emb, located)
    t_test = targets[test]
    pats = np.array([recs[i].patient for i in test])
    mags = np.array([recs[i].magnification for i in test])
    k = cfg.eval.knn_k
    knn_probs = knn_predict(emb, ref_emb, targets[train], len(class_map), k, backend)
    out = {
        "run": str(run),
        "checkpoint": which,
        "epoch": int(meta.get("epoch", 0)),
        "task": class_map.task,
        "classes": list(class_map.names),
        "head": by_magnification(t_test, probs, pats, mags, len(class_map)),
        "knn": by_magnification(t_test, knn_probs, pats, mags, len(class_map)),
        "knn_k": k,
        "retrieval": cross_magnification_matrix(emb, t_test, pats, mags, backend),
        "magnification_probe": magnification_probe(emb, mags, pats, seed=cfg.seed),
        "classifier": classifier_name(cfg),
    }
    # probabilities that mean what they say: the test images' calibration, and what the temperature fitted on
    # the validation patients (training) did; T = 1 where the run had no validation patients
    files = RunFiles(run)
    out["calibration"] = calibration_report(t_test, probs, float(model.heads.temperature))
    out["calibration"]["validation"] = files.read_json(files.summary, {}).get("calibration")
    test_recs, train_recs = [recs[i] for i in test], [recs[i] for i in train]
    out["similarity"] = {"embedding": similarity(emb, ref_emb, test_recs, train_recs, backend)}
    if prep.features is not None:  # frozen mode: the features the heads start from, as baselines in the same run
        x_test, x_train = _plain_features(prep, test), _plain_features(prep, train)
        out["similarity"] |= frozen_baselines(x_test, x_train, test_recs, train_recs, cfg.model.embedding_dim, backend)
        out["probe"] = probe_baseline(x_test, x_train, t_test, targets[train], test_recs, train_recs, len(class_map))
    if located:
        out["localisation"] = located
    out["zooms"] = list(prep.model.zooms)  # the features' centre zooms: the embedding's and every frozen baseline's
    pred = probs.argmax(1)
    scores = patient_scores(t_test, pred, pats)
    out["patients"] = [
        {
            "patient": p,
            "label": class_map.names[int(np.bincount(t_test[pats == p]).argmax())],
            "images": int((pats == p).sum()),
            "score": scores[p],
            "predicted": class_map.names[int(np.bincount(pred[pats == p], minlength=len(class_map)).argmax())],
            "magnifications": sorted({int(m) for m in mags[pats == p]}),
        }
        for p in sorted(scores)
    ]
    files.eval.mkdir(parents=True, exist_ok=True)
    files.write_metrics(out)
    files.write_results(
        results_table(result_rows(out))
        + "\n\n"
        + table_note([p["images"] for p in out["patients"]])
        + "\n"
        + ("\n" + localisation_table(located, len(test), prep.model.zooms) if located else "")
    )
    files.write_predictions(
        class_map.names,
        (
            [
                recs[i].path,
                recs[i].patient,
                recs[i].magnification,
                class_map.names[t_test[j]],
                class_map.names[pred[j]],
                *probs[j],
            ]
            for j, i in enumerate(test)
        ),
    )
    files.write_test_embeddings(emb, test_recs, class_map, probs)
    files.write_reference(ref_emb, train_recs, class_map)
    return out


def _localisation(prep: Prepared, test: np.ndarray, emb: np.ndarray) -> dict | None:
    """Cross-magnification localisation of the test tiles (where they carry slide,x,y and two magnifications),
    for the embedding and, in frozen mode, the backbone's own features as the baseline; None otherwise."""
    recs = [prep.records[i] for i in test]
    if not recs or any(r.spot is None for r in recs) or len({r.magnification for r in recs}) < 2:
        return None
    where = ([r.slide or "" for r in recs], [r.x or 0.0 for r in recs], [r.y or 0.0 for r in recs])
    mags = [r.magnification for r in recs]
    out = {"embedding": localisation(emb, *where, mags)}
    if prep.features is not None:
        # the backbone's own features, not standardised: standardising them by the training tiles lowered
        # localisation on a real slide (top-1 9.6% against 13.4%), and a baseline is taken at its best
        out["frozen_features"] = localisation(_plain_features(prep, test, standardized=False), *where, mags)
    return out


def _write_label_free(
    run: Path,
    which: str,
    meta: dict,
    prep: Prepared,
    test: np.ndarray,
    train: np.ndarray,
    emb: np.ndarray,
    ref_emb: np.ndarray,
    located: dict | None,
) -> dict:
    """The evaluation of a label-free run: no class to score, so localisation, spread and the magnification probe."""
    recs = prep.records
    test_recs, train_recs = [recs[i] for i in test], [recs[i] for i in train]
    mags = np.array([r.magnification for r in test_recs])
    pats = np.array([r.patient for r in test_recs])
    out = {
        "run": str(run),
        "checkpoint": which,
        "epoch": int(meta.get("epoch", 0)),
        "task": prep.class_map.task,
        "classes": list(prep.class_map.names),
        "label_free": True,
        "images": len(test_recs),
        "slides": len({r.slide for r in test_recs}),
        "localisation": located,
        "zooms": list(prep.model.zooms),
        "spread": embedding_spread(emb),
        "magnification_probe": magnification_probe(emb, mags, pats, seed=prep.cfg.seed),
    }
    files = RunFiles(run)
    files.eval.mkdir(parents=True, exist_ok=True)
    files.write_metrics(out)
    files.write_results(
        localisation_table(located, len(test_recs), prep.model.zooms) if located else "(no test tiles with slide,x,y)\n"
    )
    files.write_test_embeddings(emb, test_recs, prep.class_map, np.ones((len(test_recs), 1), dtype=np.float32))
    files.write_reference(ref_emb, train_recs, prep.class_map)
    return out


def classifier_name(cfg) -> str:
    """How the model's own class probabilities are made, in words."""
    if cfg.model.classifier == "knn":
        return f"k-NN vote of the {cfg.model.knn_k} nearest training images"
    return "classifier head"


def similarity(emb: np.ndarray, ref_emb: np.ndarray, test_recs, ref_recs, backend: str = "torch") -> dict:
    """Tumour-type retrieval (test against references), same-patient retrieval across magnifications (test set),
    the references' spread and distance guide."""

    def cols(recs):
        return (
            [r.tumor_type for r in recs],
            [r.label for r in recs],
            [r.patient for r in recs],
            [r.magnification for r in recs],
        )

    qt, ql, qp, qm = cols(test_recs)
    gt, gl, gp, _ = cols(ref_recs)
    return {
        "type_retrieval": type_retrieval(emb, qt, ql, qp, ref_emb, gt, gl, gp, backend=backend),
        "same_patient": same_patient_retrieval(emb, qp, qm, backend=backend),
        "spread": embedding_spread(ref_emb),
        "distance_guide": distance_guide(ref_emb, gl, gt, gp),
    }


def _plain_features(prep, indices: np.ndarray, standardized: bool = True) -> np.ndarray:
    """The plain view's cached features, standardised as the heads standardise them (or as they are)."""
    heads = prep.model.heads
    if not standardized:
        return prep.features[indices, 0].double().cpu().numpy()
    with torch.no_grad():
        return heads.standardized(prep.features[indices, 0].to(heads.feature_mean.device)).double().cpu().numpy()


def frozen_baselines(
    x_test: np.ndarray, x_train: np.ndarray, test_recs, train_recs, dim: int, backend: str = "torch"
) -> dict:
    """The similarity measures on the frozen features themselves and on their PCA to the embedding's dimension."""
    from sklearn.decomposition import PCA

    out = {"frozen_features": similarity(x_test, x_train, test_recs, train_recs, backend)}
    n = min(dim, len(x_train), x_train.shape[1])
    if n >= 1 and len(x_train) > 1:
        pca = PCA(n, random_state=0).fit(x_train)
        out[f"frozen_pca{n}"] = similarity(
            pca.transform(x_test), pca.transform(x_train), test_recs, train_recs, backend
        )
    return out


def probe_baseline(
    x_test: np.ndarray,
    x_train: np.ndarray,
    y_test: np.ndarray,
    y_train: np.ndarray,
    test_recs,
    train_recs,
    n_classes: int,
) -> dict:
    """The independent baseline: scikit-learn's logistic regression on the standardised frozen features of the
    training images, C chosen by patient-grouped cross-validation on the training patients only."""
    from smse.baselines import choose_probe_c, linear_probe

    c = choose_probe_c(x_train, y_train, [r.patient for r in train_recs])
    probs = np.zeros((len(x_test), n_classes))
    probs[:, np.unique(y_train)] = linear_probe(x_train, y_train, x_test, c)
    return {
        "C": c,
        "results": by_magnification(
            y_test, probs, [r.patient for r in test_recs], [r.magnification for r in test_recs], n_classes
        ),
    }


@torch.no_grad()
def embed_folder(
    run: str | Path, data_root: str | Path, out: str | Path, which: str = "best", progress: bool = True
) -> Path:
    """Embeddings of every image of a dataset (BreakHis tree or manifest) under a run's model, to ``out`` (.npz)."""
    from smse.data.loading import load_data

    model, cfg, class_map, meta, _ = load_run(run, which)
    cfg.data.root = str(data_root)
    cfg.data.format = "auto"
    data = load_data(cfg.data, split=False)
    cfg.model.freeze_backbone = False  # embed straight from images through the whole model
    prep = prepare(cfg, progress=progress, data=data, trained=(model, class_map, ""))
    emb, probs = embed(prep, np.arange(len(prep.records)))
    check_finite_outputs(find_checkpoint(run, which), embeddings=emb, probabilities=probs)
    save_embeddings(out, emb, prep.records, class_map, probs)
    return Path(out)


__all__ = [
    "evaluate_run",
    "classifier_name",
    "embed_folder",
]
