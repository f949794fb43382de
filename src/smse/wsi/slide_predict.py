"""Classify every tile of a slide: per-tile CSV, slide score, heat map over the thumbnail, and an HTML page."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smse.api import Model, load_model
from smse.data.records import mag_name
from smse.errors import CheckpointError, ConfigError, SlideError
from smse.io import atomic_path, writable_folder, write_csv, write_json, write_text
from smse.report.pages import png_uri, render
from smse.runfiles import RunFiles, SlideRunFiles, tiles_json
from smse.runtime import resolve_device
from smse.wsi.reader import open_slide
from smse.wsi.tiles import TilePlan, TileSpec, plan_tiles

TOP_LOCATIONS = 6

log = logging.getLogger(__name__)


def tiling_of_run(model: Model) -> TileSpec | None:
    """The tiling a run's model was trained with, None where the run does not know it (trained on images).

    Tiles of a slide to classify should cover the fields the model learnt from: same tile size,
    same magnifications. The run records the tiling of its ``smse tiles`` data (``tiling.json``, at
    training); a run from before that record falls back on the ``tiles.json`` beside its manifest,
    which may have moved or been re-tiled since, and says so.

    Raises:
        CheckpointError: naming the file, when the recorded tiling is not a valid one.
    """
    checkpoint = Path(model.source)  # "<model>" for a model built in Python: no run to ask
    files = RunFiles(checkpoint.parent)
    tiling = files.read_tiling() if checkpoint.is_file() else None
    source = files.tiling
    if tiling is None:
        meta = tiles_json(model.config.data.root)
        if meta is None:
            return None
        log.warning(
            "%s does not record the tiling its model was trained with (trained before smse recorded it); taking "
            "it from %s, which may have been re-tiled since",
            checkpoint.parent,
            meta,
        )
        try:
            tiling = json.loads(meta.read_text())["tiling"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{meta}: not the tiles.json of smse tiles ({exc!r}); give --tile and --magnifications"
            ) from None
        source = meta
    try:  # the kind of tile, not how many the training cut: no cap on the locations
        return dataclasses.replace(TileSpec.from_dict(tiling), max_locations=None, seed=0)
    except (ConfigError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{source}: not a valid tiling ({exc}); give --tile and --magnifications") from None


def resolve_tiling(model: Model, overrides: Mapping[str, Any] | None = None, spec: TileSpec | None = None) -> TileSpec:
    """How to cut slides for ``model``: ``spec``, else the run's training tiling (``tiling_of_run``), else
    ``TileSpec``'s defaults, with ``overrides`` (TileSpec fields) replacing fields; a warning where the tiles are
    not the kind the model was trained on (predict-slide, index build/add and search all come through here)."""
    trained = tiling_of_run(model)
    chosen = dataclasses.replace(spec or trained or TileSpec(), **dict(overrides or {}))
    _check_against_training(chosen, trained)
    return chosen


def _check_against_training(spec: TileSpec, trained: TileSpec | None) -> None:
    """Warn where the tiles to classify are not the kind the model was trained on (the user's explicit choice)."""
    if trained is None:
        return
    if spec.size != trained.size:
        log.warning(
            "--tile %dx%d: the model was trained on %dx%d tiles; its probabilities on other fields of view may not "
            "mean what they did in training",
            *spec.size,
            *trained.size,
        )
    unseen = sorted(set(spec.magnifications) - set(trained.magnifications))
    if unseen:
        log.warning(
            "--magnifications: the model was trained on %s tiles, not on %s",
            ", ".join(mag_name(m) for m in trained.magnifications),
            ", ".join(mag_name(m) for m in unseen),
        )


def _positive_class(model: Model, positive: str | None) -> str:
    if positive is None:
        return "malignant" if "malignant" in model.classes else model.classes[-1]
    if positive not in model.classes:
        raise ConfigError(f"--positive: {positive!r} is not a class of the model ({', '.join(model.classes)})")
    return positive


def classify_tiles(
    model: Model, plan: TilePlan, batch_size: int = 32, progress: bool = False
) -> tuple[list, np.ndarray, np.ndarray]:
    """Every tile of ``plan`` through the model, a batch at a time: [(x, y, magnification)], probabilities [N, C]
    and embeddings [N, d]."""
    keys: list[tuple[int, int, int]] = []
    probs: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        emb, prob = model.infer(batch, len(batch))
        embs.append(emb)
        probs.append(prob)
        batch.clear()

    for (x, y), tiles in plan.tiles(progress):
        for mag, tile in tiles.items():
            keys.append((x, y, mag))
            batch.append(tile)
        if len(batch) >= batch_size:  # whole locations: a flush may pass batch_size by a few tiles, in one forward
            flush()
    if batch:
        flush()
    if not probs:
        return keys, np.zeros((0, len(model.classes)), np.float32), np.zeros((0, 0), np.float32)
    return keys, np.concatenate(probs), np.concatenate(embs)


def _panels(
    plan: TilePlan,
    panels: list[tuple[str, np.ndarray | None]],
    vmax: float,
    label: str,
    title: str,
    path: Path,
    cmap_name: str = "turbo",
) -> Path:
    """Panels over the slide's thumbnail: a None panel shows the tissue outline and the cells tiled; the others colour
    each location by its value (0 to ``vmax``), with one colour bar."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    thumb = plan.thumbnail
    scale = plan.tissue.scale
    cw, ch = plan.cell[0] / scale, plan.cell[1] / scale
    h, w = thumb.shape[:2]
    # show the tissue and the tiled cells, with a margin, rather than the whole glass
    rows, cols = np.nonzero(plan.tissue.mask)
    xs = np.concatenate([cols, plan.locations[:, 0] / scale - cw / 2, plan.locations[:, 0] / scale + cw / 2])
    ys = np.concatenate([rows, plan.locations[:, 1] / scale - ch / 2, plan.locations[:, 1] / scale + ch / 2])
    pad = 0.05 * max(xs.max() - xs.min(), ys.max() - ys.min())
    x0, x1 = max(xs.min() - pad, -0.5), min(xs.max() + pad, w - 0.5)
    y0, y1 = max(ys.min() - pad, -0.5), min(ys.max() + pad, h - 0.5)
    grey = (0.35 * thumb.mean(axis=2, keepdims=True) + 0.65 * 255).repeat(3, axis=2).astype(np.uint8)
    fig_w = 6.5 * len(panels)
    aspect = float(np.clip((y1 - y0) / (x1 - x0), 0.3, 1.6))
    fig = Figure(figsize=(fig_w, (6.5 - 0.6) * aspect + 0.9), constrained_layout=True)  # no pyplot state
    axes = list(np.atleast_1d(fig.subplots(1, len(panels))))
    cmap = matplotlib.colormaps[cmap_name]
    norm = Normalize(0, vmax)
    for ax, (name, values) in zip(axes, panels):
        ax.set_title(name, fontsize=10)
        if values is None:
            ax.imshow(thumb)
            ax.contour(plan.tissue.mask.astype(float), levels=[0.5], colors="#00a651", linewidths=1.2)
            for x, y in plan.locations:
                cx, cy = x / scale, y / scale
                ax.add_patch(Rectangle((cx - cw / 2, cy - ch / 2), cw, ch, fill=False, lw=0.5, ec="#333", alpha=0.6))
        else:
            ax.imshow(grey)
            for (x, y), v in zip(plan.locations, values):
                cx, cy = x / scale, y / scale
                colour = cmap(norm(float(v)))
                ax.add_patch(Rectangle((cx - cw / 2, cy - ch / 2), cw, ch, color=colour, alpha=0.7, lw=0))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
    coloured = [ax for ax, (_, v) in zip(axes, panels) if v is not None]
    bar = fig.colorbar(ScalarMappable(cmap=cmap, norm=norm), ax=coloured, fraction=0.04, pad=0.02)
    bar.set_label(label)
    fig.suptitle(title, fontsize=12)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def heat_map(plan: TilePlan, location_prob: np.ndarray, positive: str, title: str, path: Path) -> Path:
    """Two panels: the thumbnail with the tissue outline and the grid cells tiled; the probability heat map over it."""
    outline = f"thumbnail: tissue outline (green), {len(plan)} locations tiled (boxes)"
    panels = [(outline, None), (f"P({positive}) per location, mean over its magnifications", location_prob)]
    return _panels(plan, panels, 1.0, f"P({positive})", title, path)


def attention_map(plan: TilePlan, attention: np.ndarray, title: str, path: Path) -> Path:
    """The slide model's attention per location: over all magnifications, then one panel per magnification.

    ``attention`` [L, M] sums to 1 over the slide's tiles; it is shown times the number of locations, so that
    1 is a location's share under uniform attention (mean pooling) and 10 is ten times that.
    """
    relative = attention * len(plan)
    total = relative.sum(1)
    mags = list(plan.sources)
    panels: list[tuple[str, np.ndarray | None]] = [("attention per location, all magnifications", total)]
    panels += [(f"{mag_name(m)} tiles", relative[:, j]) for j, m in enumerate(mags)]
    vmax = float(np.quantile(total, 0.99)) if len(total) else 1.0
    return _panels(plan, panels, max(vmax, 1e-9), "attention x locations (1 = uniform)", title, path, "YlOrRd")


def _png(image: np.ndarray, width: int) -> str:
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    picture.thumbnail((width, width), Image.Resampling.LANCZOS)
    picture.save(buffer, format="PNG")
    return png_uri(buffer.getvalue())


def _page(result: dict, plan: TilePlan, location_prob: np.ndarray, heat: Path, attention: Path | None = None) -> str:
    """The HTML page: score, heat map, the most suspicious locations at every magnification, slide facts."""
    slide = result["slide_info"]
    pos = result["positive"]
    kpis = [
        (f"mean P({pos})", f"{result['mean_probability']:.3f}"),
        (f"tiles with P({pos}) >= {result['threshold']:g}", f"{100 * result['share_above_threshold']:.1f}%"),
        ("slide prediction (mean probabilities)", result["predicted"]),
        ("tiles / locations", f"{result['tiles']} / {result['locations']}"),
    ]
    bag = result.get("slide_model")
    if bag is not None:
        trust = bag.get("cross_validated")
        auc = (
            f"{trust['roc_auc']:.2f} [{trust['roc_auc_interval'][0]:.2f}, {trust['roc_auc_interval'][1]:.2f}] on "
            f"{trust['slides']} slides"
            if trust and "roc_auc" in trust
            else "not recorded"
        )
        kpis = [
            (f"slide model ({bag['pool']}): P({bag['positive']})", f"{bag['probability']:.3f}"),
            ("slide prediction (slide model)", bag["predicted"]),
            ("slide model's cross-validated ROC-AUC", auc),
            *kpis,
        ]
    mags = list(plan.sources)
    by_mag = {m: result["per_magnification"][mag_name(m)] for m in mags}
    per_mag = [
        [
            mag_name(m),
            f"{by_mag[m]['mean_probability']:.3f}",
            f"{100 * by_mag[m]['share_above_threshold']:.1f}%",
            plan.sources[m].level,
            f"{plan.sources[m].scale:.3g}",
        ]
        for m in mags
    ]
    top = [
        {
            "centre": f"({int(plan.locations[i][0])}, {int(plan.locations[i][1])})",
            "p": f"{location_prob[i]:.3f}",
            "tiles": [
                {"uri": _png(tile, 180), "alt": f"{mag_name(m)} tile"}
                for m, tile in plan.cut((int(plan.locations[i][0]), int(plan.locations[i][1]))).items()
            ],
        }
        for i in np.argsort(-location_prob, kind="stable")[:TOP_LOCATIONS]
    ]
    levels = ", ".join(f"{lv['size'][0]}x{lv['size'][1]} ({lv['mpp']:g} um/px)" for lv in slide["levels"])
    facts = [
        ("file", slide["path"]),
        ("reader", slide["backend"]),
        (
            "level 0",
            f"{slide['dimensions'][0]}x{slide['dimensions'][1]} px at {slide['mpp']:g} um/px "
            f"(from {slide['mpp_source']})",
        ),
        ("objective power", f"{slide['objective_power']:g}x" if slide["objective_power"] else "not recorded"),
        ("levels", levels),
        ("model", f"{result['run']} (classes {', '.join(result['classes'])})"),
        (
            "tiling",
            f"{plan.spec.size[0]}x{plan.spec.size[1]} px tiles at {', '.join(mag_name(m) for m in mags)}; "
            f"one location per {mag_name(plan.spec.grid_magnification)} field with at least "
            f"{100 * plan.spec.min_tissue:.0f}% tissue in every tile",
        ),
    ]
    return render(
        "slide.html.j2",
        title=f"smse slide: {result['slide']}",
        heading=f"smse slide: {result['slide']}",
        subtitle=f"{result['locations']} tissue locations, {result['tiles']} tiles, classified by {result['run']}",
        kpis=kpis,
        tiles=result["tiles"],
        heatmap=png_uri(heat.read_bytes()),
        attention=png_uri(attention.read_bytes()) if attention is not None else None,
        positive=pos,
        threshold=f"{result['threshold']:g}",
        per_magnification=per_mag,
        top=top,
        magnifications=[mag_name(m) for m in mags],
        facts=facts,
    )


def predict_slide(
    run: str | os.PathLike,
    slide_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    spec: TileSpec | None = None,
    overrides: dict | None = None,
    threshold: float = 0.5,
    positive: str | None = None,
    mpp: float | None = None,
    backend: str | None = None,
    batch_size: int = 32,
    which: str = "best",
    device: str = "auto",
    progress: bool = True,
    slide_model: str | os.PathLike | None = None,
) -> dict:
    """Tile a slide, classify every tile, and write ``tiles.csv``, ``score.json``, ``heatmap.png`` and ``report.html``.

    With ``slide_model`` (a folder of ``smse train-slides``), the slide is also scored by that model from its
    tiles' embeddings, and ``attention.png`` shows where it looked (per location, per magnification).

    Args:
        run: run folder (or checkpoint file).
        slide_path: the slide.
        out: output folder (default ``<slide name>-prediction``).
        spec: the tiling; default: the run's training tiling (``tiling_of_run``).
        overrides: TileSpec fields replacing those of ``spec`` (the command line's options).
        threshold: a tile counts as positive from this probability on.
        positive: the class scored (default ``malignant`` where the model has it, else its last class).
        mpp: microns per level-0 pixel for a slide whose metadata lacks it.
        backend: ``openslide`` or ``tiffslide``.
        slide_model: a slide run folder whose model learnt from this run's embeddings.

    Returns:
        The slide score: mean probability, share of tiles above the threshold, per magnification, paths.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold: a probability in [0, 1], got {threshold}")
    model = load_model(run, which, resolve_device(device))
    positive = _positive_class(model, positive)
    spec = resolve_tiling(model, overrides, spec)
    bag_model = None
    if slide_model is not None:
        from smse.checkpoint import find_checkpoint
        from smse.mil.predict import check_tile_model, load_slide_model

        bag_folder = SlideRunFiles(slide_model).root  # the folder, also where its slide-model.pt was given
        bag_model = load_slide_model(bag_folder)
        check_tile_model(bag_model[1], find_checkpoint(Path(run), which), bag_folder)
        unseen = sorted(set(spec.magnifications) - {int(m) for m in bag_model[1]["magnifications"]})
        if unseen:  # refused before the slide is tiled and before --out is made
            raise ConfigError(
                f"--magnifications: the slide model learnt from "
                f"{', '.join(mag_name(int(m)) for m in bag_model[1]['magnifications'])} tiles, not "
                f"{', '.join(mag_name(m) for m in unseen)}"
            )
    with open_slide(slide_path, backend, mpp) as slide:
        out = writable_folder(out if out is not None else f"{slide.name}-prediction", "--out")
        plan = plan_tiles(slide, spec)
        if not len(plan):
            raise SlideError(
                f"{slide.path}: no tissue found (no location with {100 * spec.min_tissue:.0f}% tissue "
                "in every tile); check the slide or lower --min-tissue"
            )
        keys, probs, embs = classify_tiles(model, plan, batch_size, progress)
        col = model.classes.index(positive)
        p_pos = probs[:, col]
        mags = np.array([k[2] for k in keys])
        location_prob = p_pos.reshape(len(plan), len(plan.sources)).mean(axis=1)
        result: dict[str, Any] = {
            "slide": slide.name,
            "run": str(run),
            "classes": list(model.classes),
            "positive": positive,
            "threshold": threshold,
            "mean_probability": float(p_pos.mean()),
            "share_above_threshold": float((p_pos >= threshold).mean()),
            "predicted": model.classes[int(probs.mean(axis=0).argmax())],
            "mean_probabilities": {c: float(v) for c, v in zip(model.classes, probs.mean(axis=0))},
            "per_magnification": {
                mag_name(m): {
                    "mean_probability": float(p_pos[mags == m].mean()),
                    "share_above_threshold": float((p_pos[mags == m] >= threshold).mean()),
                }
                for m in plan.sources
            },
            "tiles": len(keys),
            "locations": len(plan),
            "tiling": spec.to_dict(),
            "slide_info": slide.describe(),
        }
        tile_attention = None
        if bag_model is not None:
            from smse.mil.predict import score_slide

            xs, ys = np.array([k[0] for k in keys], float), np.array([k[1] for k in keys], float)
            scored = score_slide(bag_model[0], bag_model[1], slide.name, embs, xs, ys, mags)
            tile_attention = scored.pop("attention")
            from smse.mil.predict import cross_validated

            trust = cross_validated(bag_folder, scored["pool"])
            result["slide_model"] = {"folder": str(slide_model), **scored, "cross_validated": trust}
            if trust is not None and "roc_auc" in trust and trust["roc_auc_interval"][0] <= 0.5:
                log.warning(
                    "--slide-model %s: its cross-validated ROC-AUC is %.2f [%.2f, %.2f] on %d slides, not above "
                    "chance: its probability says little",
                    slide_model,
                    trust["roc_auc"],
                    *trust["roc_auc_interval"],
                    trust["slides"],
                )
            location_att = tile_attention.reshape(len(plan), len(plan.sources))
            attention_map(
                plan,
                location_att,
                f"{slide.name}: {scored['pool']} slide model, P({scored['positive']}) {scored['probability']:.3f} "
                f"({scored['predicted']})",
                out / "attention.png",
            )
        extra = ["attention"] if tile_attention is not None else []
        write_csv(
            out / "tiles.csv",
            ["slide", "x", "y", "magnification", *(f"p_{c}" for c in model.classes), *extra],
            (
                [
                    slide.name,
                    x,
                    y,
                    m,
                    *(f"{v:.6f}" for v in row),
                    *([f"{tile_attention[i]:.6g}"] if tile_attention is not None else []),
                ]
                for i, ((x, y, m), row) in enumerate(zip(keys, probs))
            ),
        )
        title = (
            f"{slide.name}: mean P({positive}) {result['mean_probability']:.3f}, "
            f"{100 * result['share_above_threshold']:.0f}% of {len(keys)} tiles >= {threshold:g}"
        )
        heat = heat_map(plan, location_prob, positive, title, out / "heatmap.png")
        write_text(
            out / "report.html", _page(result, plan, location_prob, heat, out / "attention.png" if bag_model else None)
        )
    names = ["tiles.csv", "heatmap.png", *(["attention.png"] if bag_model is not None else []), "report.html"]
    result["files"] = {name: str(out / name) for name in [*names, "score.json"]}
    write_json(out / "score.json", result)
    return result


__all__ = [
    "predict_slide",
]
