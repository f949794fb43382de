"""Write a synthetic dataset in the exact BreakHis layout, and a contact sheet of it."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from smse.data.breakhis import CLASS_FOLDERS, TYPE_CLASS, TYPE_FOLDERS, TYPES
from smse.data.records import MAGNIFICATIONS
from smse.errors import ConfigError
from smse.io import atomic_path, write_json
from smse.synth.slide import VirtualSlide
from smse.synth.styles import EPI, MUCIN, MYO, TUMOR

FIELD_40X_WIDTH = 1500.0  # micrometres; 100X, 200X and 400X fields are 2.5x, 5x and 10x narrower
ZOOM = {40: 1.0, 100: 2.5, 200: 5.0, 400: 10.0}
#: slide folders per type in the archive: the default patient proportions
ARCHIVE_FOLDERS = {"A": 4, "F": 10, "PT": 3, "TA": 7, "DC": 38, "LC": 5, "MC": 9, "PC": 6}


@dataclass(frozen=True)
class SynthPatient:
    tumor_type: str
    year: str
    slide: str
    seed: int

    @property
    def folder(self) -> str:
        return f"SOB_{TYPE_CLASS[self.tumor_type]}_{self.tumor_type}_{self.year}-{self.slide}"

    def file_name(self, mag: int, seq: int) -> str:
        return f"SOB_{TYPE_CLASS[self.tumor_type]}_{self.tumor_type}-{self.year}-{self.slide}-{mag}-{seq:03d}.png"

    def path(self, root: Path, mag: int, seq: int) -> Path:
        cls = TYPE_CLASS[self.tumor_type]
        return (
            root
            / "BreaKHis_v1"
            / "histology_slides"
            / "breast"
            / CLASS_FOLDERS[cls]
            / "SOB"
            / TYPE_FOLDERS[self.tumor_type]
            / self.folder
            / f"{mag}X"
            / self.file_name(mag, seq)
        )


def parse_proportions(text: str | None) -> dict[str, float]:
    """``None``/``breakhis`` -> archive slide-folder proportions; ``balanced``; or ``A=1,F=2,...``."""
    if text in (None, "", "breakhis"):
        return {t: float(n) for t, n in ARCHIVE_FOLDERS.items()}
    if text == "balanced":
        return {t: 1.0 for t in TYPES}
    out = {t: 0.0 for t in TYPES}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in out:
            raise ConfigError(f"--proportions: unknown tumour type {key.strip()!r} (known: {', '.join(TYPES)})")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--proportions: {part!r} is not TYPE=number") from None
    if sum(out.values()) <= 0:
        raise ConfigError("--proportions: all weights are zero")
    return out


def allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``n`` patients over types by largest remainder, at least one per type with weight when n allows."""
    active = [t for t in TYPES if weights.get(t, 0) > 0]
    total = sum(weights[t] for t in active)
    base = {t: 1 if n >= len(active) else 0 for t in active}
    rest = n - sum(base.values())
    quota = {t: rest * weights[t] / total for t in active}
    counts = {t: base[t] + int(quota[t]) for t in active}
    left = n - sum(counts.values())
    for t in sorted(active, key=lambda t: -(quota[t] - int(quota[t])))[:left]:
        counts[t] += 1
    return {t: counts.get(t, 0) for t in TYPES}


def plan_patients(n: int, seed: int, proportions: str | None = None) -> list[SynthPatient]:
    """Patients with unique BreakHis-style slide ids (some with letter suffixes, some from year 15)."""
    if n < 1:
        raise ConfigError(f"--patients: must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    counts = allocate(n, parse_proportions(proportions))
    seeds = np.random.SeedSequence(seed).spawn(n)
    used: set[str] = set()
    patients: list[SynthPatient] = []
    for t in TYPES:
        for _ in range(counts[t]):
            while True:
                number = str(int(rng.integers(1000, 30000)))
                suffix = rng.choice(["", "", "", "AB", "CD", "EF", "B", "D"])
                slide = number + suffix
                if slide not in used:
                    used.add(slide)
                    break
            year = "15" if rng.uniform() < 0.05 else "14"
            patients.append(SynthPatient(t, year, slide, int(seeds[len(patients)].generate_state(1)[0])))
    return patients


LESION = (EPI, TUMOR, MYO, MUCIN)


def nested_fields(slide: VirtualSlide, aspect: float, k: int, rng: np.random.Generator) -> list[dict]:
    """``k`` chains of fields: 400X inside 200X inside 100X inside 40X, like a pathologist zooming in.

    The 400X field is centred on lesional tissue where one can be found (as pictures are taken of
    the lesion); each wider field then contains it and lies inside the next wider one.
    """
    chains = []
    W, H = slide.size
    for _ in range(k):
        w40, h40 = FIELD_40X_WIDTH, FIELD_40X_WIDTH / aspect
        x40, y40 = rng.uniform(0, W - w40), rng.uniform(0, H - h40)
        w4, h4 = w40 / ZOOM[400], h40 / ZOOM[400]
        cands = np.column_stack(
            [rng.uniform(x40 + w4 / 2, x40 + w40 - w4 / 2, 64), rng.uniform(y40 + h4 / 2, y40 + h40 - h4 / 2, 64)]
        )
        step = 2.0
        hits = [c for c in cands if slide.regions(c[0], c[1], step, (1, 1))[0, 0] in LESION]
        cx, cy = hits[0] if hits else cands[0]
        chain = {400: (cx - w4 / 2, cy - h4 / 2, w4, h4), 40: (x40, y40, w40, h40)}
        inner = chain[400]
        for mag in (200, 100):
            w, h = w40 / ZOOM[mag], h40 / ZOOM[mag]
            lo_x, hi_x = max(x40, inner[0] + inner[2] - w), min(x40 + w40 - w, inner[0])
            lo_y, hi_y = max(y40, inner[1] + inner[3] - h), min(y40 + h40 - h, inner[1])
            chain[mag] = (rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y), w, h)
            inner = chain[mag]
        chains.append({m: chain[m] for m in MAGNIFICATIONS})
    return chains


def render_patient(patient: SynthPatient, root: Path, size: tuple[int, int], images_per_mag: int) -> dict:
    """Render and write every image of one patient; returns file name -> field geometry."""
    slide = VirtualSlide(patient.tumor_type, patient.seed)
    rng = np.random.default_rng(patient.seed + 1)
    fields = {}
    for seq, chain in enumerate(nested_fields(slide, size[0] / size[1], images_per_mag, rng), start=1):
        for mag, field in chain.items():
            image = slide.render(field, size, rng)
            path = patient.path(root, mag, seq)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG", compress_level=1)
            fields[path.name] = {
                "patient": f"{patient.year}-{patient.slide}",
                "magnification": mag,
                "field_um": [round(v, 3) for v in field],
            }
    return fields


def _render_job(args):
    return render_patient(*args)


def generate(
    out: str | os.PathLike,
    patients: int = 32,
    seed: int = 0,
    size: tuple[int, int] = (192, 128),
    images_per_mag: int = 12,
    proportions: str | None = None,
    workers: int | None = None,
) -> Path:
    """Write the dataset under ``out`` (BreaKHis_v1/...) plus ``smse-synth.json`` with every field's geometry.

    The output depends only on the arguments, not on ``workers``.
    """
    if size[0] < 16 or size[1] < 16:
        raise ConfigError(f"--size: at least 16x16 pixels, got {size[0]}x{size[1]}")
    if images_per_mag < 1:
        raise ConfigError(f"--images-per-mag: must be at least 1, got {images_per_mag}")
    root = Path(out)
    plan = plan_patients(patients, seed, proportions)
    jobs = [(p, root, tuple(size), images_per_mag) for p in plan]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_render_job, jobs))
    else:
        results = [_render_job(j) for j in jobs]
    fields = {k: v for r in results for k, v in r.items()}
    write_json(
        root / "smse-synth.json",
        {
            "generator": "smse synth",
            "seed": seed,
            "patients": patients,
            "size": list(size),
            "images_per_mag": images_per_mag,
            "proportions": proportions or "breakhis",
            "fields": fields,
        },
    )
    return root


def preview(out: str | os.PathLike, seed: int = 0, size: tuple[int, int] = (192, 128)) -> Path:
    """A contact sheet: one patient of each type (rows) at 40X..400X (columns), one nested chain."""
    pad, label_w, head_h = 4, 120, 22
    W, H = size
    sheet = Image.new("RGB", (label_w + 4 * (W + pad), head_h + len(TYPES) * (H + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, mag in enumerate(MAGNIFICATIONS):
        draw.text((label_w + j * (W + pad) + W // 2 - 12, 5), f"{mag}X", fill="black")
    for i, t in enumerate(TYPES):
        slide = VirtualSlide(t, seed * 1000 + i)
        rng = np.random.default_rng(seed * 1000 + i)
        chain = nested_fields(slide, W / H, 1, rng)[0]
        y = head_h + i * (H + pad)
        draw.text((6, y + H // 2 - 12), f"{TYPE_FOLDERS[t]}", fill="black")
        draw.text((6, y + H // 2 + 2), f"({t}, {CLASS_FOLDERS[TYPE_CLASS[t]]})", fill="gray")
        for j, mag in enumerate(MAGNIFICATIONS):
            sheet.paste(Image.fromarray(slide.render(chain[mag], size, rng)), (label_w + j * (W + pad), y))
    path = Path(out)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


__all__ = ["generate", "preview", "plan_patients", "nested_fields", "allocate"]
