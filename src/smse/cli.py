"""smse: magnification-independent histopathology classification with similarity-based multi-scale embeddings."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from pathlib import Path
from typing import Protocol, cast

import typer

from smse.errors import ConfigError, OutputError, SmseError
from smse.runfiles import RunFiles, SlideRunFiles

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, context_settings=HELP)
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.", context_settings=HELP)
app.add_typer(data_app, name="data")
config_app = typer.Typer(no_args_is_help=True, help="Show configs.", context_settings=HELP)
app.add_typer(config_app, name="config")
INDEX_HELP = "Build, grow and inspect an archive index for similar-case search."
index_app = typer.Typer(no_args_is_help=True, help=INDEX_HELP, context_settings=HELP)
app.add_typer(index_app, name="index")


def _version(value: bool) -> None:
    if value:
        from smse import __version__

        typer.echo(f"smse {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Show warnings and errors only."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Show the library's log (epochs, resumes, warnings) on standard error."""
    import logging

    logger = logging.getLogger("smse")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


@data_app.command("summary")
def data_summary(
    path: Path = typer.Argument(..., help="BreakHis folder (official or nested copy) or manifest CSV."),
    json_out: Path | None = typer.Option(
        None, "--json", dir_okay=False, help="Also write the summary as JSON to this file."
    ),
    skip_bad: bool = typer.Option(False, help="Skip unreadable or misnamed files and list them."),
    cache_dir: Path | None = typer.Option(
        None, file_okay=False, help="Cache folder (default $SMSE_CACHE_DIR or ~/.cache/smse)."
    ),
) -> None:
    """Print images by class, type and magnification, and patient counts (as JSON too with --json)."""
    from smse.config import DataConfig
    from smse.data.loading import load_data
    from smse.data.summary import format_table, summarize
    from smse.io import write_json

    cfg = DataConfig(
        root=str(path), skip_bad=skip_bad, cache_dir=str(cache_dir) if cache_dir else None, duplicates="keep"
    )
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
    if json_out is not None:
        write_json(json_out, summary)
        typer.echo(f"wrote {json_out}")


@config_app.command("show", context_settings={"allow_extra_args": True, **HELP})
def config_show(
    config: str | None = typer.Option(
        None,
        "-c",
        "--config",
        help="A YAML file or a packaged config name (demo, breakhis, breakhis-paper); none: the defaults.",
    ),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides such as loss.gamma=1.5."),
) -> None:
    """Print the resolved config (file + overrides, validated) as YAML: what smse train would run."""
    import yaml

    from smse.config import to_dict

    typer.echo(yaml.safe_dump(to_dict(_config(config, overrides or [])), sort_keys=False).rstrip())


def _config(config: str | None, overrides: list[str]):
    """A config file, or the name of a packaged one (demo, breakhis, breakhis-paper), plus overrides."""
    from smse.config import load_config

    return load_config(config, overrides)


CONFIG_HELP = "YAML config file, or a packaged config name: demo, breakhis, breakhis-paper."
OVERRIDES_HELP = "Dotted overrides such as loss.gamma=1.5 data.root=/data/BreaKHis_v1."


@app.command(context_settings={"allow_extra_args": True})
def train(
    config: str | None = typer.Option(None, "-c", "--config", help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    evaluate: bool = typer.Option(True, help="Evaluate the best checkpoint on the test split afterwards."),
) -> None:
    """Train a model (resumes when the out folder holds an unfinished run of the same config)."""
    from smse.pipeline import run_pipeline

    run, result = run_pipeline(_config(config, overrides or []), evaluate=evaluate)
    if result is not None:
        _print_results(run, result)
    typer.echo(f"run folder: {run}")


def _print_results(run: Path, result: dict) -> None:
    typer.echo(RunFiles(run).results.read_text())
    probe = result["magnification_probe"]
    if probe["balanced_accuracy"] == probe["balanced_accuracy"]:
        typer.echo(
            f"magnification probe: balanced accuracy {100 * probe['balanced_accuracy']:.1f}% (chance "
            f"{100 * probe['balanced_chance']:.1f}%; {probe['images']} images, {probe['smallest']} at the rarest "
            "magnification; lower is more magnification-independent)"
        )
    typer.echo(f"report: {RunFiles(run).report}")


def _evaluate(run: Path, which: str = "best") -> dict:
    from smse.pipeline import evaluate_and_report

    result = evaluate_and_report(run, which)
    _print_results(run, result)
    return result


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder written by smse train."),
    which: str = typer.Option("best", help="best or last checkpoint."),
) -> None:
    """Evaluate a run on its test split: image/patient accuracy per magnification, k-NN, retrieval."""
    _evaluate(run, which)


@app.command()
def report(run: Path = typer.Argument(..., help="Run folder (evaluated).")) -> None:
    """Write the run's self-contained HTML report (and its plots as PNG files)."""
    from smse.report import write_report

    typer.echo(f"report: {write_report(run)}")


@app.command(context_settings={"allow_extra_args": True})
def cv(
    config: str | None = typer.Option(None, "-c", "--config", help=CONFIG_HELP),
    folds: int = typer.Option(5, min=1, help="Number of patient-disjoint splits."),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Cross-validate over k patient-disjoint splits; prints mean +- std in the literature's table form."""
    from smse.cv import cross_validate

    cfg = _config(config, overrides or [])
    summary = cross_validate(cfg, folds)
    typer.echo(summary["markdown"])
    typer.echo(f"wrote {Path(cfg.out) / 'cv.json'} and {Path(cfg.out) / 'cv.md'}")


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run folder (or checkpoint file)."),
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    out: Path = typer.Option(Path("predictions.csv"), dir_okay=False, help="CSV to write."),
    k: int = typer.Option(5, min=1, help="Nearest reference images per query."),
) -> None:
    """Classify images and list their most similar reference images (CSV)."""
    from smse.predict import predict as run_predict

    rows = run_predict(run, images, out, k=k)
    bad = sum(1 for r in rows if r["error"])
    typer.echo(f"wrote {out}: {len(rows)} images" + (f", {bad} unreadable (see the error column)" if bad else ""))


@app.command()
def embed(
    run: Path = typer.Argument(..., help="Run folder (or checkpoint file)."),
    data: Path = typer.Argument(..., help="BreakHis folder or manifest CSV."),
    out: Path = typer.Option(
        Path("embeddings.npz"), dir_okay=False, help="Output .npz; np.load(out) gives embeddings and metadata."
    ),
) -> None:
    """Write the embeddings of every image of a dataset, with label, patient and magnification."""
    from smse.evaluate import embed_folder

    typer.echo(f"wrote {embed_folder(run, data, out)}")


SOURCES_HELP = (
    "BreakHis folders, manifest CSVs, tile folders of smse tiles, or whole-slide images (SVS, NDPI, MRXS, pyramidal "
    "TIFF, ...: tiled as the run's tiles were, one part per slide)."
)
LABELS_HELP = "CSV slide,label[,patient][,tumor_type] for the whole-slide images (default: label unknown)."
MAX_TILES_HELP = "At most this many locations per whole slide (a seeded sample; a tile per magnification each)."
SLIDE_MAGS_HELP = "Whole slides: magnifications such as 40X,100X (default: the run's training tiles', else all four)."
SLIDE_TILE_HELP = "Whole slides: tile size WIDTHxHEIGHT in pixels (default: the run's training tiles', else 700x460)."
SLIDE_GRID_HELP = "Whole slides: the magnification whose field spaces the locations (default: the lowest)."
SLIDE_MPP_HELP = "Whole slides: microns per level-0 pixel, where their metadata lacks it (overrides the metadata)."
SLIDE_BACKEND_HELP = "Whole slides: openslide or tiffslide (default: openslide when it imports)."


def _index_params(**values: int | None) -> dict[str, int]:
    return {name: value for name, value in values.items() if value is not None}


def _echo_index(info: dict, slides: int = 20) -> None:
    from smse.index import info_lines

    for line in info_lines(info, slides):
        typer.echo(line)


def _main_process() -> bool:
    """Whether this is the process that reports (the first of a ``torchrun`` job, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


@index_app.command("build")
def index_build(
    run: Path = typer.Argument(..., help="Run folder (or checkpoint file) whose model embeds the tiles."),
    sources: list[Path] = typer.Argument(..., help=SOURCES_HELP),
    out: Path = typer.Option(..., "--out", file_okay=False, help="Index folder to write."),
    kind: str = typer.Option("auto", help="auto (flat below 200,000 vectors, ivfpq from there), flat, ivfpq or hnsw."),
    nlist: int | None = typer.Option(None, help="ivfpq: inverted lists (default 4 sqrt(n), at most 1/39 of 50,000)."),
    pq_m: int | None = typer.Option(None, "--pq-m", help="ivfpq: PQ sub-quantisers, a divisor of the dimension."),
    nprobe: int | None = typer.Option(None, help="ivfpq: lists scanned per query (default nlist / 40, 8 to 64)."),
    rerank: int | None = typer.Option(None, help="ivfpq: candidates re-ranked exactly (default 256; 0: off)."),
    which: str = typer.Option("best", help="best or last checkpoint."),
    magnifications: str | None = typer.Option(None, help=SLIDE_MAGS_HELP),
    tile: str | None = typer.Option(None, help=SLIDE_TILE_HELP),
    grid: str | None = typer.Option(None, help=SLIDE_GRID_HELP),
    min_tissue: float | None = typer.Option(None, help="Whole slides: least tissue share of every tile of a location."),
    max_tiles: int | None = typer.Option(None, help=MAX_TILES_HELP),
    labels: Path | None = typer.Option(None, help=LABELS_HELP),
    mpp: float | None = typer.Option(None, help=SLIDE_MPP_HELP),
    backend: str | None = typer.Option(None, help=SLIDE_BACKEND_HELP),
) -> None:
    """Embed sources with a run's model into an index folder (resumes a killed build; runs under torchrun)."""
    from smse.index import Index
    from smse.index.slides import SlideReading

    params = _index_params(nlist=nlist, m=pq_m, nprobe=nprobe, rerank=rerank)
    tiling = _tiling_options(magnifications, tile, grid, min_tissue, max_locations=max_tiles)
    reading = SlideReading(mpp=mpp, backend=backend)
    index = Index.build(
        run, sources, out, kind=kind, params=params, which=which, tiling=tiling, reading=reading, labels=labels
    )
    if _main_process():
        _echo_index(index.info(), slides=10)


@index_app.command("add")
def index_add(
    index: Path = typer.Argument(..., help="Index folder of smse index build."),
    sources: list[Path] = typer.Argument(..., help=SOURCES_HELP),
    max_tiles: int | None = typer.Option(None, help=MAX_TILES_HELP + " Default: the index's."),
    labels: Path | None = typer.Option(None, help=LABELS_HELP),
    mpp: float | None = typer.Option(None, help=SLIDE_MPP_HELP),
    backend: str | None = typer.Option(None, help=SLIDE_BACKEND_HELP),
) -> None:
    """Add the tiles of more sources (tiles already in the index are skipped); one add at a time."""
    from smse.index import Index
    from smse.index.slides import SlideReading

    archive = Index.open(index)
    report = archive.add(
        sources, reading=SlideReading(mpp=mpp, backend=backend, max_locations=max_tiles), labels=labels
    )
    if _main_process():
        typer.echo(
            f"{index}: added {report['added']} tiles"
            + (f", skipped {report['skipped']} already in the index" if report["skipped"] else "")
            + f"; {len(archive)} tiles now"
        )


@index_app.command("remove")
def index_remove(
    index: Path = typer.Argument(..., help="Index folder of smse index build."),
    slide: list[str] = typer.Option(..., "--slide", help="A slide to remove (repeat for several)."),
) -> None:
    """Remove every tile of the given slides."""
    from smse.index import Index

    archive = Index.open(index)
    removed = archive.remove(slide)
    typer.echo(f"{index}: removed {removed} tiles of {len(slide)} slide(s); {len(archive)} tiles now")


@index_app.command("info")
def index_info(
    index: Path = typer.Argument(..., help="Index folder of smse index build."),
    slides: int = typer.Option(20, min=0, help="Slides listed, most tiles first (0: all)."),
    json_out: Path | None = typer.Option(None, "--json", dir_okay=False, help="Also write everything as JSON here."),
) -> None:
    """Print what an index holds: tiles by magnification, label and slide; kind, parameters, files and memory."""
    from smse.index import Index
    from smse.io import write_json

    info = Index.open(index).info()
    _echo_index(info, slides)
    if json_out is not None:
        write_json(json_out, info)
        typer.echo(f"wrote {json_out}")


@app.command("search")
def search(
    index: Path = typer.Argument(..., help="Index folder of smse index build."),
    queries: list[Path] = typer.Argument(
        ...,
        help="Query images (or folders of them), whole slides (SLIDE.svs: its tiles are the case) or regions of "
        "them (SLIDE.svs@x,y,w,h in level-0 pixels: the tiles whose centre lies in the box); the index's model "
        "embeds them.",
    ),
    k: int = typer.Option(10, help="Nearest tiles per query image (with --by slide: also the most slides)."),
    magnification: str = typer.Option(
        "any", help="any, same (each query's own, from its file name), or a list such as 40X,100X."
    ),
    by: str = typer.Option("tile", help="tile: nearest tiles per query; slide: slides ranked by their tiles' votes."),
    output_format: str = typer.Option("csv", "--format", help="csv or json."),
    out: Path | None = typer.Option(None, dir_okay=False, help="File to write (default: standard output)."),
    exclude_slide: list[str] = typer.Option([], "--exclude-slide", help="A slide never returned (repeatable)."),
    nprobe: int | None = typer.Option(None, help="ivfpq: lists scanned per query (default: the index's)."),
    max_tiles: int | None = typer.Option(None, help=MAX_TILES_HELP + " For query slides; default: the index's."),
    mpp: float | None = typer.Option(None, help=SLIDE_MPP_HELP),
    backend: str | None = typer.Option(None, help=SLIDE_BACKEND_HELP),
) -> None:
    """Find the archive's tiles, or slides, most similar to query images, slides or regions of slides."""
    import csv
    import io as text_io

    from smse.index import Index
    from smse.index.slides import SlideReading, parse_slide_query
    from smse.io import write_csv, write_text
    from smse.predict import expand_inputs

    if output_format not in ("csv", "json"):
        raise ConfigError(f"--format: csv or json, got {output_format!r}")
    if by not in ("tile", "slide"):
        raise ConfigError(f"--by: tile or slide, got {by!r}")
    if k < 1:
        raise ConfigError(f"--k: at least 1, got {k}")
    reading = SlideReading(mpp=mpp, backend=backend, max_locations=max_tiles)
    archive = Index.open(index)
    paths = [
        str(p)
        for q in queries
        for p in ([q] if parse_slide_query(q) is not None else expand_inputs([q]))  # a slide or region: as given
    ]
    result = archive.search(
        paths,
        k=k,
        magnification=magnification,
        by=by,
        exclude_slides=exclude_slide,
        nprobe=nprobe,
        reading=reading,
        progress=True,
    )
    rows = result.rows()
    if output_format == "json":
        text = json.dumps(result.to_dict(), indent=2) + "\n"
        if out is None:
            typer.echo(text, nl=False)
        else:
            write_text(out, text)
    else:
        header = list(rows[0]) if rows else ["query_path"]
        if out is None:
            buffer = text_io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(header)
            writer.writerows([row[c] for c in header] for row in rows)
            typer.echo(buffer.getvalue(), nl=False)
        else:
            write_csv(out, header, ([row[c] for c in header] for row in rows))
    found = f"{len(result.slides)} slides" if by == "slide" else f"{sum(len(t) for t in result.tiles)} tiles"
    summary = f"{len(result.queries)} queries, {found} of {len(archive)} tiles" + (f"; wrote {out}" if out else "")
    typer.echo(summary, err=out is None)  # beside CSV or JSON on standard output: on standard error


@app.command()
def demo(
    out: Path = typer.Option(Path("smse-demo"), file_okay=False, help="Folder for the data, the run and the report."),
    patients: int = typer.Option(32, min=2, help="Synthetic patients."),
    images_per_mag: int = typer.Option(12, min=1, help="Images per patient and magnification."),
    epochs: int | None = typer.Option(None, min=1, help="Training epochs (default: the demo config's)."),
) -> None:
    """Generate the synthetic set, train SMSE on it, evaluate, write the report, say where all is."""
    import time

    from smse.synth import generate

    start = time.perf_counter()
    data = out / "data"
    meta = data / "smse-synth.json"
    wanted = {"patients": patients, "images_per_mag": images_per_mag, "seed": 0}
    have = json.loads(meta.read_text()) if meta.exists() else {}
    if any(have.get(k) != v for k, v in wanted.items()):
        typer.echo(f"generating {patients * images_per_mag * 4} synthetic images of {patients} patients ...")
        generate(data, patients=patients, seed=0, images_per_mag=images_per_mag)
    overrides = [f"data.root={data}", f"out={out / 'run'}"] + ([f"train.epochs={epochs}"] if epochs else [])
    from smse.pipeline import run_pipeline

    run, result = run_pipeline(_config("demo", overrides))
    if result is not None:  # None on the other processes of a distributed run: only the main one evaluates
        _print_results(run, result)
    typer.echo(f"demo finished in {time.perf_counter() - start:.0f} s")
    typer.echo(f"data: {data}\nrun: {run} (best.safetensors, history.json, eval/)")


@app.command()
def serve(
    run: Path = typer.Argument(..., help="Run folder (or checkpoint file)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but a loopback address needs --token."),
    port: int = typer.Option(8000, help="Port."),
    reference: Path | None = typer.Option(
        None,
        help="Reference images: a BreakHis folder or manifest CSV "
        "(embedded once, cached in the run folder) or an .npz of "
        "smse embed. Default: the run's training and validation images.",
    ),
    token: str | None = typer.Option(
        None, envvar="SMSE_TOKEN", show_envvar=True, help="Every API call must send 'Authorization: Bearer TOKEN'."
    ),
    max_files: int = typer.Option(16, help="Images per request."),
    max_file_mb: float = typer.Option(25.0, help="MiB per image file."),
    max_request_mb: float = typer.Option(100.0, help="MiB per request."),
    max_megapixels: float = typer.Option(
        64.0, help="Pixels per image, in millions (larger images are refused before decoding)."
    ),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    index: Path | None = typer.Option(
        None,
        "--index",
        file_okay=False,
        help="Archive index folder of smse index build with this run: the page also ranks its slides like the case.",
    ),
) -> None:
    """Serve a web page and a JSON API: classify images, show the most similar reference cases (and archive slides)."""
    from smse.serve import is_loopback

    if not is_loopback(host) and not token:
        raise ConfigError(
            f"--host {host}: not a loopback address, so the server needs a token "
            "(--token or the SMSE_TOKEN environment variable)"
        )
    try:
        import uvicorn

        from smse.serve import Limits, create_app
    except ImportError as exc:
        raise ConfigError(f"smse serve needs FastAPI and uvicorn ({exc}): pip install 'smse[serve]'") from None
    # every option checked before the model loads: one error line each, never a traceback after a wait
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port: a port from 1 to 65535, got {port}")
    if max_files < 1:
        raise ConfigError(f"--max-files: at least 1 image per request, got {max_files}")
    limits = Limits(
        max_files=max_files,
        max_file_bytes=_amount("--max-file-mb", max_file_mb, 2**20),
        max_request_bytes=_amount("--max-request-mb", max_request_mb, 2**20),
        max_pixels=_amount("--max-megapixels", max_megapixels, 1e6),
    )
    torch_device = _device(device)
    _check_port(host, port)
    web = create_app(run, reference, token, limits, torch_device, index=index)
    service = web.state.service
    typer.echo(f"model: {service.model!r}; {len(service.index)} reference images ({service.source})")
    if service.archive is not None:
        typer.echo(
            f"archive: {service.archive.root}, {len(service.archive):,} tiles of {service.archive_slides:,} slides"
        )
    url_host = f"[{host}]" if ":" in host else host
    typer.echo(
        f"page: http://{url_host}:{port}/   API docs: http://{url_host}:{port}/docs"
        + ("   (token required)" if token else "")
    )
    try:
        uvicorn.run(web, host=host, port=port, log_level="info")
    except SystemExit as exc:  # uvicorn's own exit when it cannot start (the port taken since it was checked)
        if exc.code in (None, 0):
            raise
        raise OutputError(f"--host {host} --port {port}: the server could not start (its log above says why)") from None


#: the largest amount an option may give: far beyond any use, and still an exact integer
AMOUNT_LIMIT = 2**53


def _amount(option: str, value: float, unit: float) -> int:
    """A positive finite option value in ``unit`` as a whole number of bytes or pixels (at least 1).

    Raises:
        ConfigError: naming the option, for zero, negative, infinite, NaN or absurdly large values.
    """
    if not (math.isfinite(value) and value > 0 and value * unit <= AMOUNT_LIMIT):
        raise ConfigError(f"{option}: a positive number up to {AMOUNT_LIMIT / unit:.3g}, got {value}")
    return max(1, int(value * unit))


def _device(name: str):
    """``--device`` as a torch device that exists here (checked before a model loads).

    Raises:
        ConfigError: naming the option, for an unknown device type, or one this machine lacks.
    """
    import torch

    from smse.runtime import resolve_device

    try:
        device = resolve_device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name}: not a device; expected cpu, cuda, cuda:N, mps or auto") from None
    except ConfigError:  # cuda asked for on a machine without
        device = torch.device("cuda")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: expected cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and (device.index or 0) >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    return device


def _check_port(host: str, port: int) -> None:
    """Refuse a host that cannot be bound, or a port in use, before the model loads.

    Raises:
        ConfigError: naming ``--host``, for a name that does not resolve.
        OutputError: naming the address and the reason, for a port in use or an address not of this machine.
    """
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host}: not an address of this machine ({exc})") from None
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(address)
    except OSError as exc:
        hint = (
            "; another server listens there: stop it, or choose another --port" if exc.errno == errno.EADDRINUSE else ""
        )
        raise OutputError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}){hint}") from None


def _size(text: str, option: str = "--size") -> tuple[int, int]:
    from smse.errors import ConfigError

    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{option}: expected WIDTHxHEIGHT such as 700x460, got {text!r}") from None
    return w, h


def _tiling_options(
    magnifications: str | None, tile: str | None, grid: str | None, min_tissue: float | None, **more: object
) -> dict:
    """The ``TileSpec`` fields a command's tiling options set (``--magnifications``, ``--tile``, ``--grid``,
    ``--min-tissue`` and ``more``), parsed; the ones left out are not in the dict."""
    from smse.wsi.tiles import parse_magnifications

    fields = {
        "magnifications": parse_magnifications(magnifications) if magnifications else None,
        "size": _size(tile, "--tile") if tile else None,
        "grid": _grid(grid),
        "min_tissue": min_tissue,
        **more,
    }
    return {k: v for k, v in fields.items() if v is not None}


@app.command()
def synth(
    out: Path | None = typer.Option(
        None, "--out", file_okay=False, help="Output folder (default smse-demo/data; with --wsi, smse-wsi)."
    ),
    patients: int | None = typer.Option(
        None, min=1, help="Number of patients, one virtual slide each (default 32; with --wsi, 8)."
    ),
    seed: int = typer.Option(0, min=0, help="Random seed; the output depends only on the arguments."),
    size: str | None = typer.Option(
        None, help="Image size WIDTHxHEIGHT (default 192x128; with --wsi, the slide's level-0 size, default 4000x3000)."
    ),
    images_per_mag: int = typer.Option(12, min=1, help="Images per patient and magnification."),
    proportions: str | None = typer.Option(None, help="breakhis (default), balanced, or A=1,F=2,... per type."),
    workers: int | None = typer.Option(None, min=1, help="Processes (default: all cores)."),
    preview_path: Path | None = typer.Option(
        None, "--preview", dir_okay=False, help="Only write a contact sheet PNG here."
    ),
    wsi: bool = typer.Option(
        False, "--wsi", help="Write pyramidal whole-slide TIFFs and labels.csv instead of images."
    ),
    mpp: float = typer.Option(0.5, help="With --wsi: microns per level-0 pixel (0.5 = a 20x scan)."),
    tumour_fraction: str | None = typer.Option(
        None,
        "--tumour-fraction",
        help="With --wsi: LO-HI (such as 0.05-0.3) or one share; malignant slides become benign tissue with tumour "
        "regions covering a share of the tissue drawn from [LO, HI], their masks in masks/<slide>-tumour.png.",
    ),
) -> None:
    """Generate the synthetic BreakHis-shaped H&E dataset (or, with --preview, a contact sheet; with --wsi, slides).

    With --wsi --tumour-fraction, malignant slides are mostly benign tissue with tumour regions of known extent
    (for multiple-instance learning and heat maps), and every slide's tumour mask is written beside the slides.
    """
    import time

    start = time.perf_counter()
    if wsi:
        from smse.errors import ConfigError
        from smse.synth.wsi import DEFAULT_SIZE, generate_slides, parse_tumour_fraction

        if preview_path is not None:
            raise ConfigError("--preview: a contact sheet of the image set; leave out --wsi")
        fraction = parse_tumour_fraction(tumour_fraction) if tumour_fraction is not None else None
        n = patients or 8
        wh = _size(size) if size else DEFAULT_SIZE
        root = generate_slides(
            out or Path("smse-wsi"),
            patients=n,
            seed=seed,
            size=wh,
            mpp=mpp,
            proportions=proportions,
            workers=workers,
            tumour_fraction=fraction,
        )
        masks = f", tumour masks in {root / 'masks'}" if fraction is not None else ""
        typer.echo(
            f"wrote {n} slides of {wh[0]}x{wh[1]} px at {mpp:g} um/px under {root / 'slides'} and their labels in "
            f"{root / 'labels.csv'}{masks} in {time.perf_counter() - start:.1f} s"
        )
        return
    if tumour_fraction is not None:
        from smse.errors import ConfigError  # a local name in this function (imported above for --wsi)

        raise ConfigError(f"--tumour-fraction {tumour_fraction}: tumour regions are drawn on slides; add --wsi")
    from smse.synth import generate, preview

    wh = _size(size or "192x128")
    if preview_path is not None:
        typer.echo(f"wrote {preview(preview_path, seed=seed, size=wh)}")
        return
    patients = patients or 32
    root = generate(
        out or Path("smse-demo/data"),
        patients=patients,
        seed=seed,
        size=wh,
        images_per_mag=images_per_mag,
        proportions=proportions,
        workers=workers,
    )
    n = patients * images_per_mag * 4
    typer.echo(f"wrote {n} images of {patients} patients under {root} in {time.perf_counter() - start:.1f} s")


MAGS_HELP = "Total (BreakHis) magnifications: 40X = 2.5, 100X = 1.0, 200X = 0.5, 400X = 0.25 um/px."
TILE_HELP = "Tile size WIDTHxHEIGHT in pixels, the same at every magnification (BreakHis: 700x460)."
GRID_HELP = "The magnification whose field spaces the locations (default: the lowest requested)."
MPP_HELP = "Microns per level-0 pixel, for slides whose metadata lacks it (overrides the metadata)."
BACKEND_HELP = "openslide or tiffslide (default: openslide when it imports)."


def _grid(text: str | None) -> int | None:
    """``--grid``: one magnification, or None."""
    from smse.wsi.tiles import parse_magnifications

    if not text:
        return None
    mags = parse_magnifications(text, "--grid")
    if len(mags) != 1:
        raise ConfigError(f"--grid: one magnification such as 100X, got {text!r}")
    return mags[0]


@app.command()
def tiles(
    slides: list[Path] = typer.Argument(..., help="Whole-slide images (SVS, NDPI, MRXS, pyramidal TIFF, ...)."),
    out: Path = typer.Option(..., "--out", help="Output folder: tiles, manifest.csv and tiles.json."),
    labels: Path | None = typer.Option(None, help="CSV slide,label[,patient][,tumor_type] (default: 'unlabelled')."),
    magnifications: str = typer.Option("40X,100X,200X,400X", help=MAGS_HELP),
    tile: str = typer.Option("700x460", help=TILE_HELP),
    grid: str | None = typer.Option(None, help=GRID_HELP),
    min_tissue: float = typer.Option(0.5, help="Least tissue share of every tile of a location."),
    max_tiles: int | None = typer.Option(
        None, help="At most this many locations per slide (a tile per magnification each)."
    ),
    mpp: float | None = typer.Option(None, help=MPP_HELP),
    backend: str | None = typer.Option(None, help=BACKEND_HELP),
    image_format: str = typer.Option("jpg", "--format", help="jpg (quality 95) or png (lossless, slower)."),
    seed: int = typer.Option(0, help="Seed of the --max-tiles sample."),
) -> None:
    """Cut slides into concentric multi-magnification tiles on their tissue, with a manifest smse train reads."""
    from smse.wsi.export import write_tiles
    from smse.wsi.tiles import TileSpec, parse_magnifications

    spec = TileSpec(
        magnifications=parse_magnifications(magnifications),
        size=_size(tile, "--tile"),
        grid=_grid(grid),
        min_tissue=min_tissue,
        max_locations=max_tiles,
        seed=seed,
    )
    result = write_tiles(slides, out, spec, labels=labels, mpp=mpp, backend=backend, image_format=image_format)
    said = ""
    for s in result.slides:
        levels = ", ".join(
            f"{m} from level {v['level']}" + ("" if v["scale"] == 1 else f" resampled {v['scale']:.3g}:1")
            for m, v in s["sources"].items()
        )
        levels = f"{s['mpp']:g} um/px from {s['mpp_source']}; {levels}"
        found = (
            f"{s['locations']} locations of {s['grid_cells']} grid cells"
            if s["locations"]
            else f"none of its {s['grid_cells']} grid cells holds enough tissue, skipped"
        )
        typer.echo(f"{s['slide']}: {found}" + (f" ({levels})" if levels != said else ""))
        said = levels
    typer.echo(f"wrote {result.tiles} tiles and {result.manifest}")
    from smse.wsi.export import advice

    for line in advice(result, spec):
        typer.echo(f"warning: {line}")


#: train-slides' settings with their defaults (tests/test_mil.py holds them equal to smse.mil.train.SlideConfig)
SLIDE_SETTINGS_HELP = (
    "Settings as field=value, defaults: pool=attention (or multimag, mean, max), epochs=40, lr=0.0005, "
    "weight_decay=0.0001, hidden=128, attention_hidden=64, dropout=0.25, batch_slides=8, folds=5, seed=0, "
    "loss=rfl, alpha=2.0, gamma=1.2, positive=None (the class scored: malignant where it is a label, else the "
    "last label in sorted order)."
)


@app.command("train-slides", context_settings={"allow_extra_args": True})
def train_slides(
    run: Path = typer.Argument(..., help="Tile run whose model embeds the tiles (folder or checkpoint)."),
    manifest: Path = typer.Argument(..., help="Tile manifest of smse tiles (tiles with slide,x,y)."),
    labels: Path = typer.Option(..., help="CSV slide,label[,patient][,tumor_type]: one label per slide."),
    out: Path = typer.Option(..., help="Slide run folder to write."),
    overrides: list[str] | None = typer.Argument(
        None,
        help=SLIDE_SETTINGS_HELP,
    ),
    which: str = typer.Option("best", help="best or last checkpoint of the tile run."),
) -> None:
    """Learn slide labels from a slide's tiles: attention pooling over a tile run's embeddings, cross-validated.

    Every method (the chosen pool, the other pools, and the mean and max of the tile classifier's
    probabilities) is scored out of fold on the same patient-disjoint folds; the chosen model is then
    fitted on every slide and saved for smse predict-slide --slide-model.
    """
    from smse.mil.train import results_lines
    from smse.mil.train import train_slides as run_train_slides

    metrics = run_train_slides(run, manifest, labels, out, overrides or [], which)
    typer.echo(
        f"{metrics['slides']} slides of {metrics['patients']} patients, {metrics['folds']}-fold CV (out of fold):"
    )
    for line in results_lines(metrics):
        typer.echo(f"  {line}")
    typer.echo(f"slide run folder: {out} (report: {SlideRunFiles(out).report})")


@app.command("predict-slide")
def predict_slide(
    run: Path = typer.Argument(..., help="Run folder (or checkpoint file)."),
    slide: Path = typer.Argument(..., help="Whole-slide image."),
    out: Path | None = typer.Option(None, help="Output folder (default: <slide name>-prediction)."),
    magnifications: str | None = typer.Option(None, help=MAGS_HELP + " Default: the run's training tiles'."),
    tile: str | None = typer.Option(None, help=TILE_HELP + " Default: the run's training tiles'."),
    grid: str | None = typer.Option(None, help=GRID_HELP),
    min_tissue: float | None = typer.Option(None, help="Least tissue share of every tile of a location."),
    threshold: float = typer.Option(0.5, help="A tile counts as positive from this probability on."),
    positive: str | None = typer.Option(
        None, help="The class scored (default: malignant, else the model's last class)."
    ),
    mpp: float | None = typer.Option(None, help=MPP_HELP),
    backend: str | None = typer.Option(None, help=BACKEND_HELP),
    which: str = typer.Option("best", help="best or last checkpoint."),
    slide_model: Path | None = typer.Option(
        None, help="Slide run folder of smse train-slides: score the slide with it and draw attention.png."
    ),
) -> None:
    """Classify every tile of a slide: heat map PNG, per-tile CSV, slide score and an HTML page."""
    from smse.wsi.slide_predict import predict_slide as run_predict_slide

    overrides = _tiling_options(magnifications, tile, grid, min_tissue)
    result = run_predict_slide(
        run,
        slide,
        out,
        overrides=overrides,
        threshold=threshold,
        positive=positive,
        mpp=mpp,
        backend=backend,
        which=which,
        slide_model=slide_model,
    )
    pos = result["positive"]
    typer.echo(
        f"{result['slide']}: mean P({pos}) {result['mean_probability']:.3f}; "
        f"{100 * result['share_above_threshold']:.1f}% of {result['tiles']} tiles (at {result['locations']} "
        f"locations) >= {result['threshold']:g}; prediction {result['predicted']}"
    )
    bag = result.get("slide_model")
    if bag is not None:
        trust = bag.get("cross_validated") or {}
        cv = (
            f" (its cross-validated ROC-AUC {trust['roc_auc']:.2f} [{trust['roc_auc_interval'][0]:.2f}, "
            f"{trust['roc_auc_interval'][1]:.2f}] on {trust['slides']} slides)"
            if "roc_auc" in trust
            else ""
        )
        typer.echo(
            f"slide model ({bag['pool']}): P({bag['positive']}) {bag['probability']:.3f}; prediction "
            f"{bag['predicted']}{cv}"
        )
    for name, path in result["files"].items():
        typer.echo(f"{name}: {path}")


class _UsageError(Protocol):
    """What main() uses of a click usage error (click's own, or typer's copy of click's: no common base class)."""

    exit_code: int

    def format_message(self) -> str: ...

    def show(self) -> None: ...


def main() -> None:
    """Entry point: project and usage errors become one ``error:`` line and exit code 2; Ctrl-C exits with 130."""
    try:
        code = app(standalone_mode=False)
    except SmseError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        name = str(exc.filename or "")  # a path longer than the system looks up, wherever it was met
        shown = name if len(name) <= 120 else f"{name[:60]}...{name[-40:]}"
        typer.echo(f"error: {shown}: a path of {len(os.fsencode(name))} bytes is too long ({exc.strerror})", err=True)
        sys.exit(2)
    except Exception as exc:
        if not hasattr(exc, "format_message"):  # not one of click's (or typer's copy of click's) usage errors
            raise
        usage = cast(_UsageError, exc)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command group: its help is the answer
            usage.show()
        else:
            ctx = getattr(exc, "ctx", None)
            see = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            typer.echo(f"error: {usage.format_message()}{see}", err=True)
        sys.exit(usage.exit_code)
    if code == 130:  # typer turns Ctrl-C outside training into this return value
        typer.echo("error: interrupted", err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()


__all__ = [
    "app",
    "main",
]
