"""The Jinja pages: one base page, every value escaped, a missing value an error (not an empty cell)."""

import jinja2
import pytest

from smse.report.pages import png_uri, render

SLIDE = dict(
    title="t",
    heading="h",
    subtitle="s",
    kpis=[("k", "v")],
    tiles=3,
    heatmap=png_uri(b"\x89PNG"),
    attention=None,
    positive="malignant",
    threshold="0.5",
    per_magnification=[["40X", "0.5", "10%", 0, "1"]],
    top=[{"centre": "(1, 2)", "p": "0.9", "tiles": [{"uri": None, "alt": "40X tile"}]}],
    magnifications=["40X"],
    facts=[("file", "a.svs")],
)


def test_a_value_that_looks_like_markup_is_escaped():
    """Catches: autoescape off (a slide or patient name would inject script into the page)."""
    page = render("slide.html.j2", **{**SLIDE, "facts": [("file", "<script>alert(1)</script>.svs")]})
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;.svs" in page


def test_a_missing_value_is_an_error_not_an_empty_cell():
    """Catches: the default Undefined, which renders a forgotten value as nothing."""
    with pytest.raises(jinja2.UndefinedError):
        render("slide.html.j2", **{k: v for k, v in SLIDE.items() if k != "facts"})


def test_both_pages_share_the_base_page():
    """Catches: a page that no longer extends the base (no self-check, no shared style)."""
    page = render("slide.html.j2", **SLIDE)
    assert page.count('id="selfcheck"') == 1 and "window.__errors" in page and ".kpi{" in page
    assert "(40X tile: nothing to show for this run)" in page  # the shared image macro


def test_the_report_and_the_page_colour_classes_and_magnifications_alike():
    """Catches: the report painting a class or a magnification in another colour than the page does, or giving
    methods a colour that also means a class or a magnification."""
    import json
    import re
    from pathlib import Path

    from smse.report import plots

    app = (Path(plots.__file__).parents[1] / "serve" / "static" / "app.js").read_text()
    page_palette = json.loads(re.search(r"const PALETTE = (\[[^\]]*\]);", app).group(1))
    page_mags = dict(
        re.findall(r"(\d+): \"(#[0-9a-f]{6})\"", re.search(r"const MAG_COLOURS = \{([^}]*)\}", app).group(1))
    )
    assert plots.PALETTE == page_palette
    assert {k.removesuffix("X"): v for k, v in plots.MAG_COLOURS.items()} == {
        k: v for k, v in page_mags.items() if k != "0"
    }
    meanings = [set(plots.PALETTE), set(plots.MAG_COLOURS.values()), set(plots.METHOD_COLOURS)]
    assert all(not (a & b) for i, a in enumerate(meanings) for b in meanings[i + 1 :])
