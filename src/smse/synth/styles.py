"""How each BreakHis tumour type looks: architecture and nuclei, as parameter ranges (sizes in micrometres)."""

from __future__ import annotations

from dataclasses import dataclass

# tissue regions of the virtual slide
STROMA, EPI, LUMEN, MUCIN, FAT, TUMOR, MYO = range(7)


@dataclass(frozen=True)
class Style:
    """One tumour type. Each pair is a (low, high) range drawn per patient."""

    layout: str  # which architecture builder to use
    nucleus_radius: tuple[float, float]  # epithelial / tumour nucleus radius
    pleomorphism: tuple[float, float]  # relative spread of nucleus size
    darkness: tuple[float, float]  # hematoxylin density of nuclei
    epi_density: tuple[float, float]  # nuclei per 100 um^2 of epithelium
    stroma_density: tuple[float, float]  # stromal nuclei per 100 um^2
    stroma_eosin: tuple[float, float]  # eosin density of stroma
    structure_size: tuple[float, float]  # main structure radius
    fill: tuple[float, float]  # fraction of the slide covered by structures
    elongation: tuple[float, float] = (1.0, 1.3)


STYLES = {
    # adenosis: lobule-centred clusters of small compressed acini with a myoepithelial rim, sclerotic stroma
    "A": Style(
        "lobules", (2.6, 3.3), (0.08, 0.16), (0.9, 1.15), (1.4, 1.9), (0.06, 0.12), (0.75, 1.0), (14, 24), (0.35, 0.5)
    ),
    # fibroadenoma: abundant loose stroma ringing ducts or squeezing them into slit-like cords
    "F": Style(
        "slits", (2.7, 3.4), (0.08, 0.16), (0.85, 1.1), (1.3, 1.8), (0.25, 0.45), (0.4, 0.6), (50, 110), (0.2, 0.32)
    ),
    # phyllodes: leaf-like fronds of hypercellular stroma with elongated epithelium-lined clefts
    "PT": Style(
        "clefts", (2.8, 3.6), (0.1, 0.2), (0.9, 1.15), (1.3, 1.8), (0.7, 1.1), (0.45, 0.7), (80, 160), (0.2, 0.3)
    ),
    # tubular adenoma: closely packed uniform small round tubules, two cell layers, scant stroma
    "TA": Style(
        "tubules", (2.6, 3.2), (0.06, 0.12), (0.9, 1.1), (1.5, 2.0), (0.15, 0.3), (0.6, 0.85), (17, 26), (0.6, 0.75)
    ),
    # ductal carcinoma: sheets and nests of pleomorphic crowded nuclei in desmoplastic stroma
    "DC": Style(
        "nests",
        (3.8, 5.6),
        (0.22, 0.4),
        (1.05, 1.45),
        (1.8, 2.6),
        (0.2, 0.4),
        (0.55, 0.85),
        (70, 200),
        (0.35, 0.6),
        (1.0, 1.5),
    ),
    # lobular carcinoma: small non-cohesive cells in single-file rows, sometimes around ducts
    "LC": Style(
        "rows", (2.9, 3.6), (0.1, 0.2), (1.0, 1.3), (1.6, 2.2), (0.2, 0.35), (0.5, 0.75), (30, 60), (0.08, 0.15)
    ),
    # mucinous carcinoma: small uniform cell clusters floating in pale lakes of mucin
    "MC": Style(
        "lakes", (3.0, 3.9), (0.1, 0.2), (1.0, 1.3), (1.8, 2.4), (0.15, 0.3), (0.55, 0.8), (140, 320), (0.5, 0.7)
    ),
    # papillary carcinoma: branching fronds on thin fibrovascular cores, monomorphic epithelium
    "PC": Style(
        "fronds",
        (3.2, 4.2),
        (0.08, 0.16),
        (1.0, 1.3),
        (1.9, 2.5),
        (0.2, 0.4),
        (0.55, 0.8),
        (150, 300),
        (0.4, 0.6),
        (1.3, 1.8),
    ),
}


__all__ = [
    "STYLES",
]
