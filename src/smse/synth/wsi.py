"""Small pyramidal whole-slide TIFFs (Aperio-style metadata) with known tissue regions, class and resolution."""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from smse.data.breakhis import CLASS_FOLDERS, TYPE_CLASS, TYPES
from smse.errors import ConfigError
from smse.io import atomic_path, write_csv, write_json
from smse.synth.generator import allocate, parse_proportions
from smse.synth.noise import fbm
from smse.synth.slide import VirtualSlide
from smse.synth.styles import FAT, LUMEN
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
    """One synthetic slide: a patient's tissue of one tumour type on glass.

    Attributes:
        name: slide id (file name without suffix), the BreakHis-style patient id.
        tumor_type: BreakHis type code; ``label`` is its class (benign / malignant).
        seed: of the tissue's architecture, stain and outline.
        size: level-0 (width, height) in pixels.
        mpp: microns per level-0 pixel.
        blobs: tissue pieces as ellipses (cx, cy, a, b, angle) in micrometres; their outlines are
            roughened by noise (see ``tissue``).
    """

    name: str
    tumor_type: str
    label: str
    seed: int
    size: tuple[int, int]
    mpp: float
    blobs: tuple[tuple[float, float, float, float, float], ...]

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

    def stained(self, step: float) -> np.ndarray:
        """Stained tissue on a grid of ``step`` micrometres over the slide: on a piece, neither fat nor an empty lumen.

        Element [i, j] is the point (j + 0.5, i + 0.5) * ``step``.
        """
        w, h = self.size[0] * self.mpp, self.size[1] * self.mpp
        shape = (int(h / step), int(w / step))
        xs = (np.arange(shape[1]) + 0.5) * step
        ys = (np.arange(shape[0]) + 0.5)[:, None] * step
        regions = self._virtual().regions(step / 2, step / 2, step, shape)
        return self.tissue(xs, ys) & ~np.isin(regions, (FAT, LUMEN))

    def _virtual(self) -> VirtualSlide:
        return VirtualSlide(self.tumor_type, self.seed, size=(self.size[0] * self.mpp, self.size[1] * self.mpp))


def plan_slides(
    n: int,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    mpp: float = DEFAULT_MPP,
    proportions: str | None = None,
) -> list[SynthSlide]:
    """``n`` slides, one per patient, with 1-3 pieces of tissue each.

    Slides are benign and malignant in turn (where ``proportions`` allows both classes); within a
    class, tumour types are allotted by ``proportions`` as in ``smse synth`` and shuffled by ``seed``.
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
        out.append(
            SynthSlide(
                f"14-{numbers[i]}", tumor_type, CLASS_FOLDERS[cls], slide_seed, (size[0], size[1]), mpp, tuple(blobs)
            )
        )
    return out


def render_slide(slide: SynthSlide) -> np.ndarray:
    """Level 0 of ``slide``: glass with the tissue of its tumour type rendered in H&E chunk by chunk."""
    w, h = slide.size
    rng = np.random.default_rng(slide.seed + 5)
    image = np.clip(GLASS + rng.normal(0, 1.5, (h, w, 3)), 0, 255).astype(np.uint8)
    virtual = slide._virtual()
    virtual.vignette = 0.0  # chunks tile the slide: no per-field darkening at their corners
    pad = 3
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
            view = image[y0 : y0 + ch, x0 : x0 + cw]
            view[:] = (alpha[..., None] * tissue + (1 - alpha[..., None]) * view + 0.5).astype(np.uint8)
    return image


def write_slide(slide: SynthSlide, folder: Path) -> Path:
    """Render ``slide`` and write it as ``folder/<name>.tiff`` with its resolution and class in the metadata."""
    extra = {"Patient": slide.name, "Class": slide.label, "TumorType": slide.tumor_type}
    return write_pyramid(folder / f"{slide.name}.tiff", render_slide(slide), slide.mpp, slide.objective, extra)


def generate_slides(
    out: str | os.PathLike,
    patients: int = 8,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    mpp: float = DEFAULT_MPP,
    proportions: str | None = None,
    workers: int | None = None,
) -> Path:
    """Write ``patients`` synthetic slides under ``out/slides``, ``out/labels.csv`` and ``out/smse-synth-wsi.json``.

    ``labels.csv`` (slide, label, patient, tumor_type) is what ``smse tiles --labels`` reads; the
    JSON keeps every slide's tissue outline. The output depends only on the arguments.
    """
    root = Path(out)
    plan = plan_slides(patients, seed, (size[0], size[1]), mpp, proportions)
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
            "units": {
                "size": "pixels at level 0 (width, height)",
                "mpp": "micrometres per level-0 pixel",
                "blobs": "micrometres from the slide's top-left corner: "
                "centre x, centre y, semi-axes a, b; angle in radians",
            },
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
    "write_pyramid",
    "generate_slides",
    "load_slides",
]
