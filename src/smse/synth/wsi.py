"""Small pyramidal whole-slide TIFFs (Aperio-style metadata) with known tissue regions, class and resolution."""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, label

from smse.data.breakhis import CLASS_FOLDERS, TYPE_CLASS, TYPES
from smse.errors import ConfigError
from smse.io import atomic_path, write_csv, write_json
from smse.synth.generator import allocate, parse_proportions
from smse.synth.noise import fbm
from smse.synth.slide import VirtualSlide
from smse.synth.styles import FAT, LUMEN, STROMA
from smse.wsi.reader import MPP_TIMES_OBJECTIVE

DEFAULT_SIZE = (4000, 3000)  # level-0 pixels (width, height)
DEFAULT_MPP = 0.5  # microns per pixel: a scan with a 20x objective
GLASS = np.array([238.0, 236.0, 240.0])  # bare glass under the scanner's light
CHUNK = 512  # level-0 pixels rendered at a time
#: microns per pixel a synthetic scan may have: the tissue is drawn in micrometres, so coarser pixels cover more
#: tissue and take longer to draw; finer ones than any optics would only magnify the noise
MPP_RANGE = (0.05, 10.0)
#: memory a slide takes while it is drawn and written, in bytes per level-0 pixel (measured: about 48)
BYTES_PER_PIXEL = 64
TIFF_TILE = 256
#: micrometres per pixel of the tumour masks written beside the slides (``masks/<slide>-tumour.png``)
MASK_STEP = 8.0
#: feature size of the noise whose level set outlines the tumour, as a share of the slide's shorter side: regions a
#: few hundred micrometres across on a 2000 x 1500 um slide, one or a few of them for 5-30% of the tissue
TUMOUR_SCALE = 0.3
#: softness of the tumour's edge where it meets the tissue around it: the sigma of the blur, in micrometres
TUMOUR_EDGE = 2.0
#: outlines tried per slide with tumour regions: the one whose regions lie most on the tumour type's own structures
TUMOUR_CANDIDATES = 16
BENIGN_TYPES = tuple(t for t in TYPES if TYPE_CLASS[t] == "B")


def aperio_description(
    width: int, height: int, mpp: float | None, objective: float | None, extra: dict[str, str] | None = None
) -> str:
    """An Aperio ImageDescription: OpenSlide and tiffslide read ``MPP`` and ``AppMag`` from it."""
    fields = [
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({TIFF_TILE}x{TIFF_TILE}) RAW"
    ]
    if objective is not None:
        fields.append(f"AppMag = {objective:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.6g}")
    fields += [f"{k} = {v}" for k, v in (extra or {}).items()]
    return "|".join(fields)


def write_pyramid(
    path: str | os.PathLike,
    image: np.ndarray,
    mpp: float | None,
    objective: float | None = None,
    extra: dict[str, str] | None = None,
    factor: int = 4,
    min_side: int = 128,
) -> Path:
    """Write an HxWx3 uint8 image as a tiled, deflate-compressed pyramidal TIFF laid out like an Aperio SVS.

    Pages: level 0 (tiled), a thumbnail (stripped), then levels reduced ``factor`` times while their
    longer side stays at least ``min_side``. ``mpp`` and ``objective`` go into the description
    (leave both None for a slide without resolution metadata).
    """
    import tifffile

    levels = [image]
    while max(levels[-1].shape[:2]) // factor >= min_side:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(factor)))
    h, w = image.shape[:2]
    thumb = Image.fromarray(image)
    thumb.thumbnail((512, 512), Image.Resampling.BOX)
    kwargs = {"compression": "zlib", "photometric": "rgb", "metadata": None}
    header = f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> "
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tiff:
        tiff.write(
            levels[0],
            tile=(TIFF_TILE, TIFF_TILE),
            description=aperio_description(w, h, mpp, objective, extra),
            **kwargs,
        )
        tiff.write(np.asarray(thumb), description=f"{header}{thumb.width}x{thumb.height}", **kwargs)
        for level in levels[1:]:
            tiff.write(
                level, tile=(TIFF_TILE, TIFF_TILE), description=f"{header}{level.shape[1]}x{level.shape[0]}", **kwargs
            )
    return Path(path)


@dataclass(frozen=True)
class SynthSlide:
    """One synthetic slide: a patient's tissue of one tumour type on glass, or benign tissue with tumour regions.

    Without tumour regions (``background_type`` None) the whole tissue is of ``tumor_type``: a malignant
    slide's tissue is all tumour, a benign slide has none. With them, the tissue is of ``background_type``
    (benign) and the tumour, of ``tumor_type``, fills the tissue where a noise field exceeds
    ``tumour_threshold``: ``tumour_fraction`` of the tissue area (see ``tumour``).

    Attributes:
        name: slide id (file name without suffix), the BreakHis-style patient id.
        tumor_type: BreakHis type code; ``label`` is its class (benign / malignant).
        seed: of the tissue's architecture, stain and outline (and of the tumour's outline).
        size: level-0 (width, height) in pixels.
        mpp: microns per level-0 pixel.
        blobs: tissue pieces as ellipses (cx, cy, a, b, angle) in micrometres; their outlines are
            roughened by noise (see ``tissue``).
        background_type: benign BreakHis type of the tissue around the tumour regions; None without regions.
        tumour_fraction: share of the tissue area that is tumour: the target drawn for a slide with tumour
            regions, 0 for a benign slide of a plan with regions; None for slides planned without them.
        tumour_threshold: level of the noise field above which tissue is tumour; None without regions.
        tumour_scale: feature size of that noise field in micrometres; None without regions.
        tumour_seed: seed of that noise field; None without regions.
    """

    name: str
    tumor_type: str
    label: str
    seed: int
    size: tuple[int, int]
    mpp: float
    blobs: tuple[tuple[float, float, float, float, float], ...]
    background_type: str | None = None
    tumour_fraction: float | None = None
    tumour_threshold: float | None = None
    tumour_scale: float | None = None
    tumour_seed: int | None = None

    @property
    def objective(self) -> float:
        """The objective power this resolution stands for (10 / mpp)."""
        return MPP_TIMES_OBJECTIVE / self.mpp

    def tissue(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True where the point (x, y), in micrometres, lies on tissue: the known answer for tests."""
        x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        rho = np.full(x.shape, np.inf)
        for cx, cy, a, b, angle in self.blobs:
            c, s = math.cos(angle), math.sin(angle)
            u = ((x - cx) * c + (y - cy) * s) / a
            v = (-(x - cx) * s + (y - cy) * c) / b
            rho = np.minimum(rho, np.hypot(u, v))
        scale = 0.2 * min(self.size) * self.mpp
        return rho < 1.0 + 0.6 * (fbm(x, y, scale, self.seed + 17) - 0.5)

    @property
    def has_regions(self) -> bool:
        """Whether the tumour covers only part of the tissue (a slide planned with ``tumour_fraction``)."""
        return self.background_type is not None and self.tumour_threshold is not None

    def tumour_field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The noise whose level set outlines the tumour regions: tissue where it exceeds ``tumour_threshold``.

        Two octaves of fbm (``tumour_seed``, feature size ``tumour_scale``): rough outlines, few specks.
        """
        if self.tumour_scale is None or self.tumour_seed is None:
            raise ValueError(f"{self.name}: a slide without tumour regions has no tumour field")
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return fbm(x, y, self.tumour_scale, self.tumour_seed, octaves=2)

    def tumour(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True where the point (x, y), in micrometres, lies on tumour: the known answer for tests and heat maps.

        On a slide with tumour regions: tissue where the tumour field exceeds its threshold. Otherwise one rule
        for every slide: a malignant slide's whole tissue is tumour, a benign slide has none.
        """
        if self.has_regions:
            return self.tissue(x, y) & (self.tumour_field(x, y) > self.tumour_threshold)
        if self.label == CLASS_FOLDERS["M"]:
            return self.tissue(x, y)
        return np.zeros(np.broadcast(np.asarray(x), np.asarray(y)).shape, dtype=bool)

    def stained(self, step: float) -> np.ndarray:
        """Stained tissue on a grid of ``step`` micrometres over the slide: on a piece, neither fat nor an empty lumen.

        Element [i, j] is the point (j + 0.5, i + 0.5) * ``step``.
        """
        w, h = self.size[0] * self.mpp, self.size[1] * self.mpp
        shape = (int(h / step), int(w / step))
        xs = (np.arange(shape[1]) + 0.5) * step
        ys = (np.arange(shape[0]) + 0.5)[:, None] * step
        regions = self._virtual().regions(step / 2, step / 2, step, shape)
        if self.has_regions:  # the tumour's own architecture inside its regions
            inside = self.tumour_field(xs, ys) > self.tumour_threshold
            regions = np.where(inside, self._virtual(self.tumor_type).regions(step / 2, step / 2, step, shape), regions)
        return self.tissue(xs, ys) & ~np.isin(regions, (FAT, LUMEN))

    def _virtual(self, tumor_type: str | None = None) -> VirtualSlide:
        """The procedural tissue of ``tumor_type`` (default: the tissue drawn everywhere on the slide's pieces).

        Both kinds of tissue of a slide with tumour regions share the seed, and so the patient's stain.
        """
        kind = tumor_type or self.background_type or self.tumor_type
        return VirtualSlide(kind, self.seed, size=(self.size[0] * self.mpp, self.size[1] * self.mpp))


def _grid(slide: SynthSlide, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Centres of a grid of ``step`` micrometres over the slide: element [i, j] is (j + 0.5, i + 0.5) * ``step``."""
    w, h = slide.size[0] * slide.mpp, slide.size[1] * slide.mpp
    xs = (np.arange(max(1, math.ceil(w / step))) + 0.5) * step
    ys = (np.arange(max(1, math.ceil(h / step))) + 0.5)[:, None] * step
    return xs, ys


def tumour_mask(slide: SynthSlide, step: float = MASK_STEP) -> np.ndarray:
    """``slide.tumour`` on a grid of ``step`` micrometres covering the slide: [i, j] is (j + 0.5, i + 0.5) * step."""
    return slide.tumour(*_grid(slide, step))


def tumour_share(slide: SynthSlide, step: float = MASK_STEP) -> float:
    """The share of the slide's tissue that is tumour, measured on a grid of ``step`` micrometres (0 without tissue)."""
    xs, ys = _grid(slide, step)
    tissue = slide.tissue(xs, ys)
    return float(slide.tumour(xs, ys)[tissue].mean()) if tissue.any() else 0.0


def parse_tumour_fraction(text: str) -> tuple[float, float]:
    """``--tumour-fraction``: ``LO-HI`` such as ``0.05-0.3``, or one number for LO = HI.

    Raises:
        ConfigError: naming the option and the value, for anything but numbers with 0 < LO <= HI < 1.
    """
    parts = re.split(r"(?<![eE])-", text.strip())  # a minus after an exponent's e is part of the number
    try:
        if len(parts) not in (1, 2) or not all(p.strip() for p in parts):
            raise ValueError(text)
        lo, hi = float(parts[0]), float(parts[-1])
    except ValueError:
        raise ConfigError(
            f"--tumour-fraction: a share of the tissue LO-HI such as 0.05-0.3, or one number, got {text!r}"
        ) from None
    return check_tumour_fraction((lo, hi), text)


def check_tumour_fraction(fraction: tuple[float, float], text: str | None = None) -> tuple[float, float]:
    """``fraction`` as a (lo, hi) pair of floats if 0 < lo <= hi < 1.

    Raises:
        ConfigError: naming ``--tumour-fraction`` and the value (``text`` where given) otherwise, NaN included.
    """
    try:
        lo, hi = (float(v) for v in fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"--tumour-fraction: a (low, high) pair of shares, got {fraction!r}") from None
    if not 0.0 < lo <= hi < 1.0:  # NaN fails too
        shown = repr(text) if text is not None else f"{lo:g}-{hi:g}"
        raise ConfigError(
            f"--tumour-fraction: shares of the tissue LO-HI with 0 < LO <= HI < 1 such as 0.05-0.3, got {shown}"
        )
    return lo, hi


def plan_slides(
    n: int,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    mpp: float = DEFAULT_MPP,
    proportions: str | None = None,
    tumour_fraction: tuple[float, float] | None = None,
) -> list[SynthSlide]:
    """``n`` slides, one per patient, with 1-3 pieces of tissue each.

    Slides are benign and malignant in turn (where ``proportions`` allows both classes); within a
    class, tumour types are allotted by ``proportions`` as in ``smse synth`` and shuffled by ``seed``.
    With ``tumour_fraction`` = (lo, hi), each malignant slide becomes benign tissue of a type drawn by the seed
    with tumour regions of its own type covering a share of the tissue drawn uniformly from [lo, hi] (see
    ``with_tumour_regions``); benign slides stay as they are. Without it, the plan is the same as it always was.
    """
    if n < 1:
        raise ConfigError(f"--patients: at least 1 slide, got {n}")
    if min(size) < 64:
        raise ConfigError(f"--size: a slide of at least 64x64 pixels, got {size[0]}x{size[1]}")
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:  # NaN fails too
        raise ConfigError(
            f"--mpp: microns per level-0 pixel from {MPP_RANGE[0]:g} (beyond any scanner) to {MPP_RANGE[1]:g} "
            f"(a 1x objective), got {mpp}"
        )
    if tumour_fraction is not None:
        tumour_fraction = check_tumour_fraction(tumour_fraction)
    weights = parse_proportions(proportions)
    classes = [c for c in ("B", "M") if any(weights[t] > 0 for t in TYPES if TYPE_CLASS[t] == c)]
    per_class = {c: len(range(i, n, len(classes))) for i, c in enumerate(classes)}
    rng = np.random.default_rng(seed)
    types = {}
    for c in classes:
        counts = allocate(per_class[c], {t: (w if TYPE_CLASS[t] == c else 0.0) for t, w in weights.items()})
        types[c] = list(rng.permutation([t for t in TYPES for _ in range(counts[t])]))
    numbers = rng.choice(np.arange(1000, 30000), n, replace=False)
    seeds = np.random.SeedSequence(seed).spawn(n)
    w, h = size[0] * mpp, size[1] * mpp
    out = []
    for i in range(n):
        cls = classes[i % len(classes)]
        tumor_type = str(types[cls][i // len(classes)])
        slide_seed = int(seeds[i].generate_state(1)[0]) & 0x7FFFFFFF
        blob_rng = np.random.default_rng(slide_seed)
        blobs = []
        for _ in range(int(blob_rng.integers(1, 4))):
            a, b = w * blob_rng.uniform(0.18, 0.3), h * blob_rng.uniform(0.22, 0.36)
            blobs.append(
                (
                    float(blob_rng.uniform(0.3 * w, 0.7 * w)),
                    float(blob_rng.uniform(0.3 * h, 0.7 * h)),
                    float(a),
                    float(b),
                    float(blob_rng.uniform(0, math.pi)),
                )
            )
        slide = SynthSlide(
            f"14-{numbers[i]}", tumor_type, CLASS_FOLDERS[cls], slide_seed, (size[0], size[1]), mpp, tuple(blobs)
        )
        if tumour_fraction is not None:
            slide = with_tumour_regions(slide, *tumour_fraction) if cls == "M" else replace(slide, tumour_fraction=0.0)
        out.append(slide)
    return out


def with_tumour_regions(slide: SynthSlide, lo: float, hi: float) -> SynthSlide:
    """``slide`` as benign tissue with tumour regions of its type covering a share of the tissue drawn from [lo, hi].

    The share, the benign type around the tumour and the regions' outline follow from the slide's seed (its own
    generator: the rest of the plan is untouched). The regions are the tissue where an fbm field of
    ``TUMOUR_SCALE`` times the slide's shorter side exceeds the quantile of that field over the tissue (on a
    grid of at most ``MASK_STEP`` micrometres) that leaves the drawn share of tissue above it: blob-like regions a
    few hundred micrometres across, the share exact up to the grid. The tumour's tissue is drawn over the whole
    slide and shown only inside the regions, so of ``TUMOUR_CANDIDATES`` fields the one whose regions hold most of
    the tumour type's own structures (nests, lakes, fronds, glands: anything but plain stroma and fat) is kept:
    regions of bare stroma would be tumour in the mask that no model could see.
    """
    rng = np.random.default_rng((slide.seed, 29))
    target = float(lo + (hi - lo) * rng.random())
    background = str(BENIGN_TYPES[int(rng.integers(len(BENIGN_TYPES)))])
    seeds = [int(v) for v in rng.integers(0, 2**31, TUMOUR_CANDIDATES)]
    w, h = slide.size[0] * slide.mpp, slide.size[1] * slide.mpp
    slide = replace(slide, background_type=background, tumour_fraction=target, tumour_scale=TUMOUR_SCALE * min(w, h))
    step = min(MASK_STEP, min(w, h) / 128)
    xs, ys = _grid(slide, step)
    tissue = slide.tissue(xs, ys)
    if not tissue.any():
        return replace(slide, tumour_threshold=1.0, tumour_seed=seeds[0])  # fbm < 1: no tumour
    regions = slide._virtual(slide.tumor_type).regions(step / 2, step / 2, step, tissue.shape)
    structure = ~np.isin(regions, (STROMA, FAT))
    best: tuple[tuple[float, float], float, int] | None = None
    for seed in seeds:
        field = np.broadcast_to(replace(slide, tumour_seed=seed).tumour_field(xs, ys), tissue.shape)
        threshold = float(np.quantile(field[tissue], 1.0 - target))
        score = _structure_score(tissue & (field > threshold), structure)
        if best is None or score > best[0]:
            best = (score, threshold, seed)
    assert best is not None
    return replace(slide, tumour_threshold=best[1], tumour_seed=best[2])


def _structure_score(tumour: np.ndarray, structure: np.ndarray) -> tuple[float, float]:
    """How well the regions of ``tumour`` show the tumour type: the least share of structure in any region of at
    least 2% of the tumour (a region of bare stroma is the worst), then the share over all of the tumour."""
    labels, n = label(tumour)
    if n == 0:
        return (0.0, 0.0)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    shown = np.bincount(labels.ravel(), weights=structure.ravel(), minlength=n + 1)[1:]
    big = area >= 0.02 * area.sum()
    return float((shown[big] / area[big]).min()), float(shown.sum() / area.sum())


def render_slide(slide: SynthSlide) -> np.ndarray:
    """Level 0 of ``slide``: glass with the tissue of its tumour type rendered in H&E chunk by chunk.

    On a slide with tumour regions, the benign ``background_type`` is drawn on all the tissue and the
    tumour's type over it inside the regions, with an edge blurred by ``TUMOUR_EDGE`` micrometres; only the
    chunks the regions touch draw the tumour.
    """
    w, h = slide.size
    rng = np.random.default_rng(slide.seed + 5)
    image = np.clip(GLASS + rng.normal(0, 1.5, (h, w, 3)), 0, 255).astype(np.uint8)
    virtual = slide._virtual()
    virtual.vignette = 0.0  # chunks tile the slide: no per-field darkening at their corners
    tumour, sigma = None, max(1.0, TUMOUR_EDGE / slide.mpp)
    if slide.has_regions:
        tumour = slide._virtual(slide.tumor_type)
        tumour.vignette = 0.0
    pad = 3
    tpad = math.ceil(3 * sigma)
    for y0 in range(0, h, CHUNK):
        for x0 in range(0, w, CHUNK):
            cw, ch = min(CHUNK, w - x0), min(CHUNK, h - y0)
            xs = (np.arange(x0 - pad, x0 + cw + pad) + 0.5) * slide.mpp
            ys = (np.arange(y0 - pad, y0 + ch + pad) + 0.5)[:, None] * slide.mpp
            alpha = gaussian_filter(slide.tissue(xs, ys).astype(np.float32), 1.0)[pad:-pad, pad:-pad]
            if alpha.max() <= 0.01:
                continue
            field = (x0 * slide.mpp, y0 * slide.mpp, cw * slide.mpp, ch * slide.mpp)
            tissue = virtual.render(field, (cw, ch), rng).astype(np.float32)
            if tumour is not None:  # the tissue's own edge is alpha's: the tumour's only where it meets the rest
                xs = (np.arange(x0 - tpad, x0 + cw + tpad) + 0.5) * slide.mpp
                ys = (np.arange(y0 - tpad, y0 + ch + tpad) + 0.5)[:, None] * slide.mpp
                inside = (slide.tumour_field(xs, ys) > slide.tumour_threshold).astype(np.float32)
                beta = gaussian_filter(inside, sigma)[tpad:-tpad, tpad:-tpad, None]
                if beta.max() > 0.01:
                    tissue = beta * tumour.render(field, (cw, ch), rng).astype(np.float32) + (1 - beta) * tissue
            view = image[y0 : y0 + ch, x0 : x0 + cw]
            view[:] = (alpha[..., None] * tissue + (1 - alpha[..., None]) * view + 0.5).astype(np.uint8)
    return image


def write_slide(slide: SynthSlide, folder: Path) -> Path:
    """Render ``slide`` and write it as ``folder/<name>.tiff`` with its resolution and class in the metadata."""
    extra = {"Patient": slide.name, "Class": slide.label, "TumorType": slide.tumor_type}
    return write_pyramid(folder / f"{slide.name}.tiff", render_slide(slide), slide.mpp, slide.objective, extra)


def write_mask(slide: SynthSlide, folder: Path) -> Path:
    """Write ``tumour_mask(slide)`` as ``folder/<name>-tumour.png``: 8-bit, 255 on tumour, ``MASK_STEP`` um/pixel."""
    path = folder / f"{slide.name}-tumour.png"
    with atomic_path(path) as tmp:
        Image.fromarray(tumour_mask(slide).astype(np.uint8) * 255).save(tmp, format="PNG")
    return path


def generate_slides(
    out: str | os.PathLike,
    patients: int = 8,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    mpp: float = DEFAULT_MPP,
    proportions: str | None = None,
    workers: int | None = None,
    tumour_fraction: tuple[float, float] | None = None,
) -> Path:
    """Write ``patients`` synthetic slides under ``out/slides``, ``out/labels.csv`` and ``out/smse-synth-wsi.json``.

    ``labels.csv`` (slide, label, patient, tumor_type) is what ``smse tiles --labels`` reads; the
    JSON keeps every slide's tissue outline. With ``tumour_fraction`` = (lo, hi), malignant slides are
    benign tissue with tumour regions covering a share of it from [lo, hi] (see ``plan_slides``), and every
    slide's tumour mask is written as ``out/masks/<slide>-tumour.png`` (``MASK_STEP`` micrometres per pixel).
    The output depends only on the arguments.
    """
    root = Path(out)
    plan = plan_slides(patients, seed, (size[0], size[1]), mpp, proportions, tumour_fraction)
    need, have = size[0] * size[1] * BYTES_PER_PIXEL, _memory()
    if need > have:
        raise ConfigError(
            f"--size {size[0]}x{size[1]}: a slide is drawn whole in memory, about {need / 2**30:.1f} GiB, and this "
            f"machine has {have / 2**30:.1f} GiB available; choose a smaller --size"
        )
    workers = min(workers or min(len(plan), os.cpu_count() or 1), max(1, int(have // need)))  # as many as fit
    folder = root / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write_slide, plan, [folder] * len(plan)))
    else:
        for s in plan:
            write_slide(s, folder)
    units = {
        "size": "pixels at level 0 (width, height)",
        "mpp": "micrometres per level-0 pixel",
        "blobs": "micrometres from the slide's top-left corner: centre x, centre y, semi-axes a, b; angle in radians",
        "tumour_fraction": "share of the tissue area that is tumour, 0-1 (the range the targets are drawn from; "
        "each slide's target); null: a malignant slide's tissue is all tumour, a benign slide's none",
    }
    if tumour_fraction is not None:
        for s in plan:
            write_mask(s, root / "masks")
        units["mask_step"] = "micrometres per pixel of the tumour masks"
        units["tumour_scale"] = "micrometres: feature size of the fbm field whose level set outlines the tumour"
        units["tumour_seed"] = "seed of that field (2 octaves)"
        units["tumour_threshold"] = "level of that field above which tissue is tumour"
        units["masks"] = (
            f"masks/<slide>-tumour.png: 8-bit, 255 = tumour, 0 = not; one pixel per {MASK_STEP:g} micrometres, "
            f"pixel [i, j] centred at ((j + 0.5) * {MASK_STEP:g}, (i + 0.5) * {MASK_STEP:g}) micrometres"
        )
    write_csv(
        root / "labels.csv",
        ["slide", "label", "patient", "tumor_type"],
        ([s.name, s.label, s.name, s.tumor_type] for s in plan),
    )
    write_json(
        root / "smse-synth-wsi.json",
        {
            "generator": "smse synth --wsi",
            "seed": seed,
            "patients": patients,
            "size": list(size),
            "mpp": mpp,
            "proportions": proportions or "breakhis",
            "tumour_fraction": None if tumour_fraction is None else [float(v) for v in tumour_fraction],
            "mask_step": MASK_STEP if tumour_fraction is not None else None,
            "units": units,
            "slides": [asdict(s) for s in plan],
        },
    )
    return root


def _memory() -> int:
    """Bytes of memory available to a new allocation: the kernel's estimate where it gives one, else all of it."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit known
        return 2**63


def load_slides(root: str | os.PathLike) -> list[SynthSlide]:
    """The slides described by ``root/smse-synth-wsi.json`` (to check tiles against the known tissue)."""
    meta = json.loads((Path(root) / "smse-synth-wsi.json").read_text())
    return [
        SynthSlide(**{**s, "size": tuple(s["size"]), "blobs": tuple(tuple(b) for b in s["blobs"])})
        for s in meta["slides"]
    ]


__all__ = [
    "DEFAULT_SIZE",
    "MASK_STEP",
    "write_pyramid",
    "generate_slides",
    "load_slides",
    "parse_tumour_fraction",
    "tumour_mask",
    "tumour_share",
]
