"""One patient as a virtual slide: architecture, nuclei and stain, rendered at any field of view."""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

from smse.synth.noise import _hash01, fbm, value_noise
from smse.synth.styles import EPI, FAT, LUMEN, MUCIN, MYO, STROMA, STYLES, TUMOR

# structure kinds, painted in this order (later ones cover earlier ones)
LAKE, CYST, FATCELL, GLAND, NEST, CLUSTER, FROND, CLEFT = range(8)

H_VECTOR = np.array([0.65, 0.70, 0.29])
E_VECTOR = np.array([0.07, 0.99, 0.11])
MIN_SPACING = 5.0  # micrometres between candidate nucleus sites (a jittered lattice), at least


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


class VirtualSlide:
    """A procedural slide of one tumour type; all geometry in micrometres."""

    def __init__(self, tumor_type: str, seed: int, size: tuple[float, float] = (4000.0, 3000.0)):
        self.tumor_type = tumor_type
        self.style = STYLES[tumor_type]
        self.seed = int(seed) & 0x7FFFFFFF
        self.size = size
        rng = np.random.default_rng(seed)
        s = self.style
        draw = lambda rng_pair: float(rng.uniform(*rng_pair))  # noqa: E731
        self.p = {
            "r_nuc": draw(s.nucleus_radius),
            "pleo": draw(s.pleomorphism),
            "dark": draw(s.darkness),
            "epi_density": draw(s.epi_density),
            "stroma_density": draw(s.stroma_density),
            "stroma_eosin": draw(s.stroma_eosin),
            "R": draw(s.structure_size),
            "fill": draw(s.fill),
            "elong": draw(s.elongation),
        }
        # per-patient stain, illumination and optics: the nuisance a model must ignore
        self.h_vec = _unit(H_VECTOR + rng.normal(0, 0.04, 3).clip(-0.1, 0.1))
        self.e_vec = _unit(E_VECTOR + rng.normal(0, 0.04, 3).clip(-0.1, 0.1))
        self.h_gain = float(rng.uniform(0.75, 1.3))
        self.e_gain = float(rng.uniform(0.45, 0.85))
        self.background = np.clip(rng.normal(0.03, 0.015, 3), 0.0, 0.08)
        self.vignette = float(rng.uniform(0.0, 0.15))
        self.blur = float(rng.uniform(0.3, 0.9))
        self.noise = float(rng.uniform(1.0, 3.5))
        self.spacing = max(MIN_SPACING, 2.0 * self.p["r_nuc"])
        self.ellipses, self.capsules = self._build(rng)

    # ------------------------------------------------------------------ architecture
    def _build(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Ellipses: cx cy a b theta kind lumen myo irr2 ph2 irr3 ph3; capsules: x0 y0 x1 y1 core band kind."""
        W, H = self.size
        area = W * H
        R, fill = self.p["R"], self.p["fill"]
        ell: list[list[float]] = []
        cap: list[list[float]] = []

        def ellipse(cx, cy, a, b, theta, kind, lumen=0.0, myo=0.0, irr=0.08):
            ell.append(
                [
                    cx,
                    cy,
                    a,
                    b,
                    theta,
                    kind,
                    lumen,
                    myo,
                    rng.uniform(0, irr),
                    rng.uniform(0, 6.3),
                    rng.uniform(0, irr),
                    rng.uniform(0, 6.3),
                ]
            )

        layout = self.style.layout
        if layout == "lobules":
            L = R * rng.uniform(7, 10)
            for _ in range(max(1, int(fill * area / (math.pi * L * L) * 2.5))):
                cx, cy = rng.uniform(0, W), rng.uniform(0, H)
                for _ in range(int((L / R) ** 2 * 0.45)):
                    rr, ang = L * math.sqrt(rng.uniform()), rng.uniform(0, 6.3)
                    a = R * rng.uniform(0.7, 1.25)
                    ellipse(
                        cx + rr * math.cos(ang),
                        cy + rr * math.sin(ang),
                        a,
                        a * rng.uniform(0.55, 0.95),
                        rng.uniform(0, 3.15),
                        GLAND,
                        rng.uniform(0.1, 0.3),
                        0.22,
                    )
        elif layout == "slits":
            for _ in range(int(fill * area / (math.pi * R * R * 0.3))):
                a = R * rng.uniform(0.7, 1.6)
                ellipse(
                    rng.uniform(0, W),
                    rng.uniform(0, H),
                    a,
                    a * rng.uniform(0.12, 0.3),
                    rng.uniform(0, 3.15),
                    GLAND,
                    rng.uniform(0.08, 0.25),
                    0.15,
                    irr=0.12,
                )
        elif layout == "clefts":
            n_chains = int(fill * area / (R * 4 * 30))
            for _ in range(n_chains):
                x, y, ang = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0, 6.3)
                core, band = rng.uniform(2.5, 6), rng.uniform(7, 11)
                for _ in range(rng.integers(3, 7)):
                    ang += rng.normal(0, 0.5)
                    length = R * rng.uniform(0.5, 1.1)
                    nx, ny = x + length * math.cos(ang), y + length * math.sin(ang)
                    cap.append([x, y, nx, ny, core, band, CLEFT])
                    x, y = nx, ny
        elif layout == "tubules":
            step = R * rng.uniform(2.1, 2.5)
            for iy in range(int(H / (step * 0.87)) + 1):
                for ix in range(int(W / step) + 1):
                    cx = (ix + 0.5 * (iy % 2)) * step + rng.normal(0, 0.12 * step)
                    cy = iy * step * 0.87 + rng.normal(0, 0.12 * step)
                    if value_noise(np.array(cx), np.array(cy), 500.0, self.seed + 7) < 0.9 - fill:
                        continue
                    a = R * rng.uniform(0.85, 1.15)
                    ellipse(
                        cx,
                        cy,
                        a,
                        a * rng.uniform(0.8, 1.0),
                        rng.uniform(0, 3.15),
                        GLAND,
                        rng.uniform(0.25, 0.4),
                        0.3,
                        irr=0.05,
                    )
        elif layout == "nests":
            for _ in range(int(fill * area / (math.pi * R * R * 0.6))):
                a = R * rng.uniform(0.5, 1.4)
                lumen = rng.uniform(0.08, 0.2) if rng.uniform() < 0.25 else 0.0
                ellipse(
                    rng.uniform(0, W),
                    rng.uniform(0, H),
                    a,
                    a * rng.uniform(0.5, 1.0),
                    rng.uniform(0, 3.15),
                    NEST,
                    lumen,
                    0.0,
                    irr=0.25,
                )
        elif layout == "rows":
            for _ in range(int(fill * area / (math.pi * R * R))):
                a = R * rng.uniform(0.7, 1.3)
                ellipse(
                    rng.uniform(0, W),
                    rng.uniform(0, H),
                    a,
                    a * rng.uniform(0.6, 1.0),
                    rng.uniform(0, 3.15),
                    GLAND,
                    rng.uniform(0.15, 0.35),
                    0.2,
                )
        elif layout == "lakes":
            for _ in range(int(fill * area / (math.pi * R * R * 0.8))):
                cx, cy = rng.uniform(0, W), rng.uniform(0, H)
                a = R * rng.uniform(0.6, 1.3)
                b = a * rng.uniform(0.6, 1.0)
                theta = rng.uniform(0, 3.15)
                ellipse(cx, cy, a, b, theta, LAKE, irr=0.2)
                for _ in range(int(rng.uniform(4, 12) * a * b / 150.0**2) + 1):
                    rr, ang = 0.8 * math.sqrt(rng.uniform()), rng.uniform(0, 6.3)
                    ox, oy = rr * a * math.cos(ang), rr * b * math.sin(ang)
                    c = rng.uniform(10, 28)
                    ellipse(
                        cx + ox * math.cos(theta) - oy * math.sin(theta),
                        cy + ox * math.sin(theta) + oy * math.cos(theta),
                        c,
                        c * rng.uniform(0.5, 1.0),
                        rng.uniform(0, 3.15),
                        CLUSTER,
                        0.0,
                        0.0,
                        irr=0.25,
                    )
        elif layout == "fronds":
            for _ in range(int(fill * area / (math.pi * R * R * 0.9))):
                cx, cy = rng.uniform(0, W), rng.uniform(0, H)
                a = R * rng.uniform(0.8, 1.3)
                ellipse(cx, cy, a, a * rng.uniform(0.7, 1.0), rng.uniform(0, 3.15), CYST, irr=0.15)
                core, band = rng.uniform(3, 6), rng.uniform(10, 15) * self.p["elong"] / 1.5
                stack = [(cx + rng.normal(0, a * 0.2), cy + rng.normal(0, a * 0.2), rng.uniform(0, 6.3), a * 0.45, 0)]
                while stack:
                    x, y, ang, length, depth = stack.pop()
                    nx, ny = x + length * math.cos(ang), y + length * math.sin(ang)
                    cap.append([x, y, nx, ny, core, band, FROND])
                    if depth < 3:
                        for turn in (-1, 1):
                            stack.append(
                                (nx, ny, ang + turn * rng.uniform(0.4, 1.0), length * rng.uniform(0.55, 0.8), depth + 1)
                            )
        # a few fat lobules in any slide
        for _ in range(rng.integers(0, 3)):
            fx, fy = rng.uniform(0, W), rng.uniform(0, H)
            for _ in range(rng.integers(8, 30)):
                r = rng.uniform(25, 45)
                ellipse(
                    fx + rng.normal(0, 90),
                    fy + rng.normal(0, 90),
                    r,
                    r * rng.uniform(0.8, 1),
                    rng.uniform(0, 3.15),
                    FATCELL,
                    irr=0.06,
                )
        e = np.array(ell, dtype=np.float64).reshape(-1, 12)
        e = e[np.argsort(e[:, 5], kind="stable")]
        return e, np.array(cap, dtype=np.float64).reshape(-1, 7)

    # ------------------------------------------------------------------ tissue map
    def regions(self, x0: float, y0: float, step: float, shape: tuple[int, int]) -> np.ndarray:
        """Region code of each pixel of a grid whose pixel (0, 0) is centred at (x0, y0)."""
        h, w = shape
        out = np.full(shape, STROMA, dtype=np.int8)
        x1, y1 = x0 + w * step, y0 + h * step
        e = self.ellipses
        reach = np.maximum(e[:, 2], e[:, 3]) * 1.35
        keep = (e[:, 0] + reach > x0) & (e[:, 0] - reach < x1) & (e[:, 1] + reach > y0) & (e[:, 1] - reach < y1)
        for row in e[keep]:
            cx, cy, a, b, th, kind, lumen, myo, i2, p2, i3, p3 = row
            r = max(a, b) * 1.35
            c0, c1 = max(int((cx - r - x0) / step), 0), min(int((cx + r - x0) / step) + 2, w)
            r0, r1 = max(int((cy - r - y0) / step), 0), min(int((cy + r - y0) / step) + 2, h)
            if c0 >= c1 or r0 >= r1:
                continue
            xs = x0 + np.arange(c0, c1) * step - cx
            ys = (y0 + np.arange(r0, r1) * step - cy)[:, None]
            ct, st = math.cos(th), math.sin(th)
            u = (xs * ct + ys * st) / a
            v = (-xs * st + ys * ct) / b
            rho = np.hypot(u, v)
            phi = np.arctan2(v, u)
            rho = rho / (1 + i2 * np.cos(2 * phi + p2) + i3 * np.cos(3 * phi + p3))
            inside = rho < 1
            view = out[r0:r1, c0:c1]
            kind = int(kind)
            if kind == LAKE:
                view[inside] = MUCIN
            elif kind == CYST:
                view[inside] = LUMEN
            elif kind == FATCELL:
                view[inside & (rho < 0.93)] = FAT
            elif kind in (NEST, CLUSTER):
                view[inside] = TUMOR
                if lumen > 0:
                    view[inside & (rho < lumen)] = LUMEN
            else:  # GLAND
                view[inside] = EPI
                view[inside & (rho > 1 - myo * 0.5)] = MYO
                view[inside & (rho < lumen)] = LUMEN
        c = self.capsules
        if len(c):
            reach = c[:, 4] + c[:, 5]
            keep = (
                (np.maximum(c[:, 0], c[:, 2]) + reach > x0)
                & (np.minimum(c[:, 0], c[:, 2]) - reach < x1)
                & (np.maximum(c[:, 1], c[:, 3]) + reach > y0)
                & (np.minimum(c[:, 1], c[:, 3]) - reach < y1)
            )
            xs = x0 + np.arange(w) * step
            ys = (y0 + np.arange(h) * step)[:, None]
            for ax, ay, bx, by, core, band, kind in c[keep]:
                r = core + band
                c0, c1 = max(int((min(ax, bx) - r - x0) / step), 0), min(int((max(ax, bx) + r - x0) / step) + 2, w)
                r0, r1 = max(int((min(ay, by) - r - y0) / step), 0), min(int((max(ay, by) + r - y0) / step) + 2, h)
                if c0 >= c1 or r0 >= r1:
                    continue
                px, py = xs[c0:c1] - ax, ys[r0:r1] - ay
                dx, dy = bx - ax, by - ay
                t = np.clip((px * dx + py * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
                d = np.hypot(px - t * dx, py - t * dy)
                view = out[r0:r1, c0:c1]
                if int(kind) == FROND:
                    view[d < r] = EPI
                    view[d < core] = STROMA
                else:
                    view[(d < r) & (view != LUMEN)] = EPI
                    view[d < core] = LUMEN
        return out

    # ------------------------------------------------------------------ nuclei
    def nuclei(
        self, x0: float, y0: float, x1: float, y1: float, regions: np.ndarray, grid: tuple[float, float, float]
    ) -> dict[str, np.ndarray]:
        """Nuclei whose centres lie in [x0, x1) x [y0, y1): lattice sites thinned by tissue region."""
        s = self.spacing
        ix = np.arange(math.floor(x0 / s), math.ceil(x1 / s))
        iy = np.arange(math.floor(y0 / s), math.ceil(y1 / s))
        grid_x, grid_y = np.meshgrid(ix, iy)
        IX, IY = grid_x.ravel(), grid_y.ravel()
        h = lambda k: _hash01(IX, IY, self.seed * 31 + k)  # noqa: E731
        x = (IX + 0.5 + (h(1) - 0.5) * 0.8) * s
        y = (IY + 0.5 + (h(2) - 0.5) * 0.8) * s
        gx0, gy0, step = grid
        col = np.clip(((x - gx0) / step).astype(int), 0, regions.shape[1] - 1)
        row = np.clip(((y - gy0) / step).astype(int), 0, regions.shape[0] - 1)
        reg = regions[row, col]
        p = self.p
        site = s * s / 100.0  # sites per 100 um^2 -> probability
        density = np.zeros(8)
        density[[STROMA, EPI, LUMEN, MUCIN, FAT, TUMOR, MYO]] = [
            p["stroma_density"],
            p["epi_density"],
            0.01,
            0.03,
            0.0,
            p["epi_density"] * 1.1,
            1.2,
        ]
        prob = np.minimum(density[reg] * site, 0.92)
        tumor_like = np.isin(reg, (EPI, TUMOR))
        if self.style.layout == "rows":  # single-file rows of tumour cells running through the stroma
            theta = 6.283 * value_noise(x, y, 350.0, self.seed + 11)
            u = x * np.cos(theta) + y * np.sin(theta)
            row_mask = (np.abs(np.sin(np.pi * u / 22.0)) > 0.82) & (value_noise(x, y, 250.0, self.seed + 12) > 0.35)
            rows = (reg == STROMA) & row_mask
            prob = np.where(rows, 0.8, prob)
            tumor_like |= rows
        keep = h(3) < prob
        z = (h(4) + h(5) + h(6) - 1.5) * 2.0  # roughly standard normal
        r = p["r_nuc"] * np.clip(1 + p["pleo"] * z, 0.5, 2.5)
        aspect = p["elong"] * (1 + 0.25 * h(7))
        angle = h(8) * np.pi
        dark = p["dark"] * (1 + 0.15 * (h(9) - 0.5) * 2) * (1 + 0.6 * p["pleo"] * np.clip(z, 0, None))
        stromal = reg == STROMA
        stromal &= ~tumor_like
        lymph = stromal & (h(10) < 0.12)
        spindle = stromal & ~lymph
        fib = 6.283 * value_noise(x, y, 300.0, self.seed + 5)
        r = np.where(spindle, 2.6 * (0.8 + 0.4 * h(11)), np.where(lymph, 2.1, r))
        aspect = np.where(spindle, 5.0 + 3.0 * h(12), np.where(lymph, 1.05, aspect))
        angle = np.where(spindle, fib, angle)
        dark = np.where(lymph, 1.1, np.where(spindle, 0.6, dark))
        myo = reg == MYO
        r = np.where(myo, 3.5, r)
        aspect = np.where(myo, 2.5, aspect)
        k = keep & (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        return {
            "x": x[k],
            "y": y[k],
            "a": (r * np.sqrt(aspect))[k],
            "b": (r / np.sqrt(aspect))[k],
            "angle": angle[k],
            "dark": dark[k],
        }

    # ------------------------------------------------------------------ rendering
    def render(
        self,
        field: tuple[float, float, float, float],
        out_size: tuple[int, int],
        rng: np.random.Generator,
        supersample: int | None = None,
    ) -> np.ndarray:
        """Render the field (x, y, width, height in um) as an HxWx3 uint8 image of ``out_size`` = (W, H).

        Fields with pixels coarser than 2 um are supersampled 2x so that sub-pixel nuclei average out.
        """
        fx, fy, fw, fh = field
        W, H = out_size
        ss = supersample or (2 if fw / W > 2.0 else 1)
        gw, gh = W * ss, H * ss
        step = fw / gw
        margin = 12.0
        mpx = int(math.ceil(margin / step))
        gx0, gy0 = fx - mpx * step + step / 2, fy - mpx * step + step / 2
        reg = self.regions(gx0, gy0, step, (gh + 2 * mpx, gw + 2 * mpx))
        nuc = self.nuclei(fx - margin, fy - margin, fx + fw + margin, fy + fh + margin, reg, (gx0, gy0, step))
        reg = reg[mpx : mpx + gh, mpx : mpx + gw]
        # textures at output resolution (they vary slowly), then repeated onto the supersampled grid
        ostep = fw / W
        xs = fx + (np.arange(W) + 0.5) * ostep
        ys = (fy + (np.arange(H) + 0.5) * ostep)[:, None]
        X, Y = np.broadcast_to(xs, (H, W)), np.broadcast_to(ys, (H, W))
        theta = 6.283 * value_noise(X, Y, 300.0, self.seed + 5)
        u = X * np.cos(theta) + Y * np.sin(theta)
        v = -X * np.sin(theta) + Y * np.cos(theta)
        up = lambda a: np.repeat(np.repeat(a, ss, axis=0), ss, axis=1) if ss > 1 else a  # noqa: E731
        fibres = up(value_noise(u, v * 7.0, 45.0, self.seed + 6))
        patchy = up(value_noise(X, Y, 120.0, self.seed + 8))
        wisp = up(fbm(X, Y, 30.0, self.seed + 9, 2)) if (reg == MUCIN).any() else np.zeros((gh, gw))
        p = self.p
        E = np.zeros((gh, gw))
        Hc = np.zeros((gh, gw))
        se = p["stroma_eosin"]
        E[reg == STROMA] = (se * (0.45 + 0.7 * fibres + 0.3 * patchy))[reg == STROMA]
        Hc[reg == STROMA] = 0.13
        for region, e_val, h_val in (
            (EPI, 0.3, 0.22),
            (TUMOR, 0.26, 0.26),
            (MYO, 0.36, 0.16),
            (LUMEN, 0.02, 0.01),
            (FAT, 0.0, 0.0),
        ):
            m = reg == region
            E[m] = e_val * (0.85 + 0.3 * patchy[m])
            Hc[m] = h_val
        m = reg == MUCIN
        E[m] = 0.05 + 0.06 * wisp[m]
        Hc[m] = 0.08 + 0.25 * wisp[m] ** 2
        self._stamp_nuclei(Hc, E, nuc, fx, fy, step, rng)
        if ss > 1:
            Hc = Hc.reshape(H, ss, W, ss).mean(axis=(1, 3))
            E = E.reshape(H, ss, W, ss).mean(axis=(1, 3))
        od = (self.h_gain * Hc)[..., None] * self.h_vec + (self.e_gain * E)[..., None] * self.e_vec + self.background
        od = gaussian_filter(od, sigma=(self.blur, self.blur, 0))
        img = 255.0 * np.exp(-od * 0.75)
        yy, xx = np.mgrid[0:H, 0:W]
        rr = ((xx - W / 2) / (W / 2)) ** 2 + ((yy - H / 2) / (H / 2)) ** 2
        img *= (1.0 - self.vignette * rr / 2)[..., None]
        img += rng.normal(0, self.noise, img.shape)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    def _stamp_nuclei(
        self, Hc: np.ndarray, E: np.ndarray, nuc: dict, fx: float, fy: float, step: float, rng: np.random.Generator
    ) -> None:
        """Add each nucleus as a soft-edged ellipse with chromatin texture to the hematoxylin map."""
        if not len(nuc["x"]):
            return
        gh, gw = Hc.shape
        px = (nuc["x"] - fx) / step - 0.5
        py = (nuc["y"] - fy) / step - 0.5
        a, b = nuc["a"] / step, nuc["b"] / step
        k = int(min(math.ceil(np.percentile(a, 99)) + 1, 40))
        off = np.arange(-k, k + 1)
        cx, cy = np.round(px).astype(int), np.round(py).astype(int)
        cols = cx[:, None, None] + off[None, None, :]
        rows = cy[:, None, None] + off[None, :, None]
        dx = (cols - px[:, None, None]).astype(np.float32)
        dy = (rows - py[:, None, None]).astype(np.float32)
        ca, sa = np.cos(nuc["angle"])[:, None, None], np.sin(nuc["angle"])[:, None, None]
        uu = (dx * ca + dy * sa) / a[:, None, None]
        vv = (-dx * sa + dy * ca) / b[:, None, None]
        q = np.sqrt(uu * uu + vv * vv)
        edge = np.clip((1 - q) * np.minimum(a, b)[:, None, None] * 1.5 + 0.5, 0, 1)
        texture = 0.75 + 0.5 * rng.random(edge.shape, dtype=np.float32)
        rim = 1.0 + 0.35 * np.clip(q - 0.6, 0, 0.4) / 0.4  # chromatin gathers at the membrane
        value = 0.7 * edge * texture * rim * nuc["dark"][:, None, None]
        ok = (cols >= 0) & (cols < gw) & (rows >= 0) & (rows < gh) & (value > 0)
        r_idx, c_idx = np.broadcast_to(rows, value.shape)[ok], np.broadcast_to(cols, value.shape)[ok]
        layer = np.zeros_like(Hc)
        np.maximum.at(layer, (r_idx, c_idx), value[ok])
        Hc += layer
        E *= 1 - 0.5 * np.clip(layer, 0, 1)


__all__ = [
    "VirtualSlide",
]
