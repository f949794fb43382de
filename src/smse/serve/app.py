"""The FastAPI app of ``smse serve``: the page, and a JSON API guarded by size limits and an optional token."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from smse import __version__
from smse.errors import DataError, ImageError, SmseError
from smse.serve import is_loopback
from smse.serve.service import Limits, Service, Upload, parse_magnification

STATIC = Path(str(files("smse.serve") / "static"))
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ApiError(HTTPException):
    """An HTTP error with a short machine-readable code; answered as ``{"error": message, "code": code}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.code = code


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status, headers=headers)


def _host_name(header: bytes) -> str:
    """The host of a ``Host`` header without its port (``[::1]:8000`` -> ``[::1]``)."""
    text = header.decode("latin-1").strip()
    return text[: text.index("]") + 1] if text.startswith("[") and "]" in text else text.rsplit(":", 1)[0]


class _Guard:
    """ASGI middleware: without a token, local ``Host`` names only; on ``/api/``, the token, then the request size.

    A request with a body must declare its ``Content-Length`` (browsers and HTTP clients do), so an
    oversized upload is refused before a byte of it is read; the server never reads past that length.
    """

    def __init__(self, app, token: str | None, max_bytes: int):
        self.app = app
        self.token = token.encode() if token else None
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        if self.token is None and not is_loopback(_host_name(headers.get(b"host", b""))):
            return _error(
                400,
                "host_not_local",
                "without a token this server answers local host names only (localhost, 127.0.0.1, [::1])",
            )
        if not scope["path"].startswith("/api/"):
            return None
        if self.token is not None:
            given = headers.get(b"authorization", b"")
            if not (given.startswith(b"Bearer ") and hmac.compare_digest(given[7:].strip(), self.token)):
                return _error(
                    401,
                    "unauthorized",
                    "this server needs its token: send 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": "Bearer"},
                )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get(b"content-length")
            if length is None or not length.isdigit():
                return _error(411, "length_required", "the request must declare its Content-Length")
            if int(length) > self.max_bytes:
                return _error(
                    413,
                    "upload_too_large",
                    f"the request is {int(length) / 2**20:.1f} MiB, over the limit of {self.max_bytes / 2**20:.1f} MiB",
                )
        return None


class Neighbour(BaseModel):
    id: int
    rank: int
    class_: str
    label: str
    tumor_type: str
    magnification: int
    patient: str
    file: str
    distance: float
    in_top_k: bool

    model_config = {"alias_generator": lambda name: name.rstrip("_")}


class MagnificationGroup(BaseModel):
    magnification: int
    neighbours: list[Neighbour]


class ImageResult(BaseModel):
    name: str
    magnification: int | None = None
    magnification_source: str | None = None
    error: str | None = None
    predicted: str | None = None
    probabilities: dict[str, float] | None = None
    map: list[float] | None = None
    out_of_distribution: bool | None = None
    neighbours: list[Neighbour] | None = None
    by_magnification: list[MagnificationGroup] | None = None


class Case(BaseModel):
    images: int
    predicted: str
    out_of_distribution: int = 0  # how many of the case's images are out of distribution
    probabilities: dict[str, float]
    neighbour_vote: dict[str, int]


class ValidationFit(BaseModel):
    images: int
    patients: int | None = None
    ece_before: float | None = None
    ece_after: float | None = None


class Calibration(BaseModel):
    """Whether the probabilities are calibrated (temperature scaling on the validation patients), and on what."""

    calibrated: bool
    temperature: float
    reason: str
    validation: ValidationFit | None = None
    text: str


class ArchiveRegion(BaseModel):
    """A matching region of a hit slide: an archive tile (thumbnail: ``GET /api/archive/{id}/thumbnail``)."""

    id: int
    x: float | None = None
    y: float | None = None
    magnification: int
    distance: float
    image: int  # the upload it matched (0-based, among all uploads)
    name: str


class ArchiveSlide(BaseModel):
    rank: int
    slide: str
    score: float
    votes: int
    best_distance: float
    patient: str
    label: str
    tumor_type: str
    matching_regions: int
    regions: list[ArchiveRegion]


class Archive(BaseModel):
    """The archive's slides most like the case (``smse serve --index``), by the vote rule in ``rule``."""

    tiles: int
    slides_in_index: int
    k: int
    rule: str
    slides: list[ArchiveSlide]


class Prediction(BaseModel):
    classes: list[str]
    task: str
    k: int
    images: list[ImageResult]
    case: Case
    calibration: Calibration
    archive: Archive | None = None


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or several image files (PNG, JPEG, TIFF, BMP).",
                        },
                        "magnification": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "Optional, one per image in order: 40, 100X, ... or auto "
                            "(read from BreakHis-style names).",
                        },
                        "k": {
                            "type": "integer",
                            "default": 5,
                            "description": "Neighbours per image and per magnification.",
                        },
                    },
                }
            }
        },
    }
}


def create_app(
    run: str | Path | None = None,
    reference: str | Path | None = None,
    token: str | None = None,
    limits: Limits = Limits(),
    device: str = "cpu",
    service: Service | None = None,
    index: str | Path | None = None,
) -> FastAPI:
    """The app serving ``run``'s model (or a ready ``service``).

    Args:
        run: run folder or checkpoint file.
        reference: reference images: None (the run's training and validation images), a ``.npz`` of ``smse embed``, or a
            BreakHis folder / manifest CSV (embedded once and cached in the run folder).
        token: when set, every ``/api/`` call (health included) needs ``Authorization: Bearer <token>``.
            Without a token only local ``Host`` names are answered, so a web page elsewhere cannot reach the
            server through DNS rebinding.
        limits: files per request, bytes per file and per request, pixels per image, largest k.
        index: an archive index folder built by the same checkpoint (``smse index build``): every prediction also
            ranks its slides (``archive`` in the answer); an index of another model is refused
            (``CheckpointError``).
    """
    if service is None:
        if run is None:
            raise TypeError("create_app: give the run to serve, or a ready service")
        service = Service.from_run(run, reference, limits, device, index=index)
    limits = service.limits
    app = FastAPI(
        title="smse",
        version=__version__,
        description="Classify histopathology images and find similar reference cases at any magnification.",
    )
    app.state.service = service
    app.add_middleware(_Guard, token=token, max_bytes=limits.max_request_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), exc.headers)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health", summary="Model, classes, reference set, limits and version")
    def health() -> dict:
        return service.health()

    @app.get("/api/about", summary="How far to trust the model: test accuracy with n and 95% intervals, calibration")
    def about() -> JSONResponse:
        """The page's "About this model" panel, read from the run folder on each call.

        - ``calibration``: ``calibrated``, ``temperature`` (T; 1: none), ``reason`` (``fitted``, ``unrecorded``,
          ``no_validation_patients``, ``not_fitted``, ``no_classes``), ``validation`` (``images``, ``patients``,
          ``ece_before``, ``ece_after`` of the validation images T was fitted on) and ``text``; the same object
          comes with every ``/api/predict`` answer.
        - ``evaluation``: null until ``smse evaluate RUN``; else from ``eval/metrics.json``: ``checkpoint``,
          ``epoch``, the test set's ``images`` and ``patients``, ``confidence`` (0.95), ``head`` (the classifier)
          and ``knn`` (the nearest-reference vote, with ``k``), each with ``image_accuracy`` and
          ``patient_accuracy`` as ``{"value", "interval": [low, high]}`` and ``interval_method``; and
          ``calibration`` on the test images: ``images``, ``temperature``, ``ece``, ``ece_uncalibrated``, and the
          reliability diagram's bins ``reliability`` / ``reliability_uncalibrated`` (``edges``, and per bin
          ``confidence``, ``accuracy``, ``count``).
        - ``evaluation_note``: why there is no evaluation, or that it is of another checkpoint than the one
          served; else null.
        - ``run``: the run folder, or null for a checkpoint outside one.
        """
        return JSONResponse(service.about())

    @app.get("/api/reference/map", summary="2-D map (PCA) of the reference embeddings")
    def reference_map() -> Response:
        return Response(json.dumps(service.reference_map()), media_type="application/json")

    @app.get(
        "/api/reference/{ref_id}/thumbnail",
        summary="JPEG thumbnail of one reference image, by id",
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "unknown id"}},
    )
    async def thumbnail(ref_id: str) -> Response:
        if not (ref_id.isascii() and ref_id.isdigit()) or not int(ref_id) < len(service.index):
            raise ApiError(
                404,
                "unknown_reference",
                f"reference id {ref_id!r}: no such reference image (ids are 0 to {len(service.index) - 1})",
            )
        try:
            data = await run_in_threadpool(service.thumbnail, int(ref_id))
        except ImageError as exc:
            raise ApiError(
                404, "reference_unreadable", f"reference id {ref_id} ({Path(exc.path).name}): {exc.reason}"
            ) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.get(
        "/api/archive/{tile_id}/thumbnail",
        summary="JPEG thumbnail of one archive tile (a matching region of a hit slide), by id",
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no archive, or unknown id"}},
    )
    async def archive_thumbnail(tile_id: str) -> Response:
        """The tile is read from the file or the slide the archive's own metadata records: the client gives an id,
        never a path."""
        if service.archive is None:
            raise ApiError(404, "no_archive", "this server searches no archive (start it with --index)")
        if not (tile_id.isascii() and tile_id.isdigit()) or len(tile_id) > 18:
            raise ApiError(404, "unknown_tile", f"archive tile {tile_id[:40]!r}: ids are whole numbers")
        try:
            data = await run_in_threadpool(service.archive_thumbnail, int(tile_id))
        except KeyError:
            raise ApiError(404, "unknown_tile", f"archive tile {tile_id}: the archive holds no such tile") from None
        except SmseError as exc:  # the file or slide is gone or unreadable (named without its folders)
            reason = exc.reason if isinstance(exc, ImageError) else str(exc).split(": ", 1)[-1]
            raise ApiError(404, "archive_tile_unreadable", f"archive tile {tile_id}: {reason}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.post(
        "/api/predict",
        response_model=Prediction,
        response_model_by_alias=True,
        openapi_extra=PREDICT_BODY,
        summary="Classify images; their nearest references overall and per magnification; the case's mean",
        responses={
            400: {"description": "too many files, or not a multipart form"},
            413: {"description": "upload too large"},
            422: {"description": "no readable image, or a bad field"},
        },
    )
    async def predict(request: Request) -> dict:
        try:  # Starlette stops parsing at the first file over the limit
            form = await request.form(max_files=limits.max_files, max_fields=limits.max_files + 8)
        except StarletteHTTPException as exc:
            raise ApiError(400, "bad_form", f"images: {exc.detail}") from None
        try:
            uploads, k = await _read_form(form, limits)
        finally:
            await form.close()
        known = sorted(m for m, _, _ in service.groups if m > 0)
        for up in uploads:  # a magnification the references do not have is a typo, not a new microscope
            if up.magnification and known and up.magnification not in known:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"magnification: {up.magnification}X is not one of the "
                    f"references' ({', '.join(f'{m}X' for m in known)}) for {up.name}",
                )
        try:
            return await run_in_threadpool(service.predict, uploads, k)
        except ImageError as exc:
            raise ApiError(422, "bad_image", str(exc)) from None

    return app


async def _read_form(form, limits: Limits) -> tuple[list[Upload], int]:
    """The uploads (with their magnifications) and k of a predict form; ``ApiError`` naming what is wrong."""
    images = form.getlist("images")
    if not images:
        raise ApiError(422, "no_images", "images: no image uploaded (send files in the 'images' field)")
    mags = form.getlist("magnification")
    if mags and len(mags) != len(images):
        raise ApiError(
            422,
            "invalid_request",
            f"magnification: {len(mags)} values for {len(images)} images (give one per image, or none)",
        )
    try:
        k = int(form.get("k", 5))
        magnifications = [parse_magnification(str(m)) for m in mags] or [None] * len(images)
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_request", f"k: expected an integer, got {str(form.get('k'))[:40]!r}") from None
    except DataError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    if not 1 <= k <= limits.max_k:
        raise ApiError(422, "invalid_request", f"k: expected 1 to {limits.max_k}, got {k}")
    uploads = []
    for item, mag in zip(images, magnifications):
        if not isinstance(item, UploadFile):
            raise ApiError(422, "invalid_request", "images: expected files, got a text field")
        name = Path(item.filename or "upload").name
        data = await item.read(limits.max_file_bytes + 1)
        if len(data) > limits.max_file_bytes:
            size = max(item.size or 0, len(data)) / 2**20
            raise ApiError(
                413,
                "file_too_large",
                f"{name}: {size:.1f} MiB, over the limit of {limits.max_file_bytes / 2**20:.1f} MiB per file",
            )
        uploads.append(Upload(name, data, mag))
    return uploads, k


__all__ = [
    "create_app",
]
