"""The ``smse`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from smse.errors import SmseError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")


@data_app.command("summary")
def data_summary(
    path: Path = typer.Argument(..., help="BreakHis folder (official or nested copy) or manifest CSV."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Where to write the JSON (default: ./data-summary.json)."),
    skip_bad: bool = typer.Option(False, help="Skip unreadable or misnamed files and list them."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache folder (default $SMSE_CACHE_DIR or ~/.cache/smse)."),
) -> None:
    """Print images by class, type and magnification, and patient counts; write them as JSON."""
    from smse.config import DataConfig
    from smse.data.loading import load_data
    from smse.data.summary import format_table, summarize
    from smse.io import write_json

    cfg = DataConfig(root=str(path), skip_bad=skip_bad, cache_dir=str(cache_dir) if cache_dir else None,
                     duplicates="keep")
    data = load_data(cfg, split=False)
    summary = summarize(data.records)
    summary["summary_line"] = data.summary_line()
    summary["image_sizes"] = dict(data.sizes.most_common())
    summary["skipped"] = [{"path": p, "reason": why} for p, why in data.skipped]
    summary["duplicates"] = {"groups": data.duplicates.groups, "conflicting": data.duplicates.conflicting}
    typer.echo(format_table(summary))
    typer.echo(data.summary_line())
    typer.echo("image sizes: " + ", ".join(f"{k} ({v})" for k, v in data.sizes.most_common()))
    for p, why in data.skipped:
        typer.echo(f"skipped {p}: {why}")
    for group in data.duplicates.conflicting:
        typer.echo("identical images with different labels: " + " == ".join(group))
    target = json_out or Path("data-summary.json")
    write_json(target, summary)
    typer.echo(f"wrote {target}")


def _size(text: str) -> tuple[int, int]:
    from smse.errors import ConfigError

    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: expected WIDTHxHEIGHT such as 192x128, got {text!r}") from None
    return w, h


@app.command()
def synth(
    out: Path = typer.Option(Path("smse-demo/data"), "--out", help="Output folder (BreaKHis_v1/... is written inside)."),
    patients: int = typer.Option(32, help="Number of patients (one virtual slide each)."),
    seed: int = typer.Option(0, help="Random seed; the output depends only on the arguments."),
    size: str = typer.Option("192x128", help="Image size WIDTHxHEIGHT."),
    images_per_mag: int = typer.Option(12, help="Images per patient and magnification."),
    proportions: Optional[str] = typer.Option(None, help="breakhis (default), balanced, or A=1,F=2,... per type."),
    workers: Optional[int] = typer.Option(None, help="Processes (default: all cores)."),
    preview_path: Optional[Path] = typer.Option(None, "--preview", help="Only write a contact sheet PNG here."),
) -> None:
    """Generate the synthetic BreakHis-shaped H&E dataset (or, with --preview, a contact sheet)."""
    import time

    from smse.synth import generate, preview

    wh = _size(size)
    if preview_path is not None:
        typer.echo(f"wrote {preview(preview_path, seed=seed, size=wh)}")
        return
    start = time.perf_counter()
    root = generate(out, patients=patients, seed=seed, size=wh, images_per_mag=images_per_mag,
                    proportions=proportions, workers=workers)
    n = patients * images_per_mag * 4
    typer.echo(f"wrote {n} images of {patients} patients under {root} in {time.perf_counter() - start:.1f} s")


def main() -> None:
    """Entry point: run the app, turning project errors into one clear line and exit code 2."""
    try:
        app(standalone_mode=False)
    except SmseError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
