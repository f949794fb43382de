"""The HTML pages of smse (run report, slide page) from Jinja templates: one base page, autoescaped."""

from __future__ import annotations

import base64
from functools import lru_cache

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


@lru_cache(maxsize=1)
def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("smse.report", "templates"),
        undefined=StrictUndefined,
        autoescape=select_autoescape(["j2", "html"], default_for_string=True),
        trim_blocks=False,
    )


def render(template: str, **context) -> str:
    """``templates/<template>`` filled with ``context`` (every value escaped; a missing name is an error)."""
    return _environment().get_template(template).render(**context)


def png_uri(png: bytes) -> str:
    """A ``data:`` URI of PNG bytes: the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


__all__ = [
    "render",
    "png_uri",
]
