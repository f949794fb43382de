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
