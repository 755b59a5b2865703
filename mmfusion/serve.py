"""`mmfusion serve CHECKPOINT`: the Predictor over HTTP, with FastAPI under uvicorn.

    mmfusion serve runs/mine/best --port 8000 --image_root /srv/images
    curl -F image=@cat.png -F text="a cat" http://127.0.0.1:8000/predict
    curl -H "Content-Type: application/json" -d '{"image": "<base64>", "text": "a cat"}' http://127.0.0.1:8000/predict
    curl -H "Content-Type: application/json" -d '{"image_path": "cats/1.png"}' http://127.0.0.1:8000/predict

`POST /predict` takes one input: multipart form data (an `image` file and/or a `text` field), or a JSON object with
`image` (base64 bytes) or `image_path` (relative to --image_root; refused without one, and never outside it), and
`text`. It answers {"predictions": {task: ...}} in the terms of `Predictor.predict`. `GET /health` reports the
requests and batches served; `GET /model` the tasks, labels and versions.

Requests that arrive together share one forward pass: `MicroBatcher` gathers up to --max_batch inputs, waiting at
most --max_wait_ms after the first, and runs them in one worker thread while the server keeps accepting requests.
Bad input is answered 4xx with JSON {"error": message, "field": the field at fault}; it never stops the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import os
import platform
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from . import __version__
from .errors import BadInputError
from .model import MODEL_CONFIG_NAME
from .predictor import IMAGE, TEXT, Predictor, label_names
from .processing import open_image

if TYPE_CHECKING:
    from .cli import Serve

FIELDS = ("image", "image_path", "text")
LIMITS = ("max_image_bytes", "max_image_pixels", "max_text_chars", "max_batch", "max_wait_ms")


class RequestError(Exception):
    """A request the server refuses: HTTP status, the field at fault (None: the request as a whole), message."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class MicroBatcher:
    """Gathers inputs of concurrent requests into batches of up to `max_batch`, waiting at most `max_wait` seconds
    after the first for more, and runs each batch through `predict` in one worker thread, one batch at a time."""

    def __init__(self, predict: Callable[[list], list], max_batch: int, max_wait: float) -> None:
        self.predict, self.max_batch, self.max_wait = predict, max_batch, max_wait
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="mmfusion-predict")
        self.requests = self.batches = self.largest_batch = 0

    async def submit(self, row: Any) -> Any:
        """The prediction for one input, once its batch has run."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((row, future))
        return await future

    async def _gather(self) -> list[tuple[Any, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(items) < self.max_batch:
            try:
                items.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(remaining, 0.0005))  # polling: wait_for(queue.get()) can lose an item
        return items

    async def run(self) -> None:
        """Serve batches until cancelled; a failing batch fails its requests, not the server."""
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            self.requests += len(items)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(items))
            try:
                results = await loop.run_in_executor(self.worker, self.predict, [row for row, _ in items])
            except Exception as error:  # handed to each waiting request
                results = [error] * len(items)
            for (_, future), result in zip(items, results):
                if future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def create_app(predictor: Predictor, options: Serve, checkpoint: str = "", backend: str = "torch") -> FastAPI:
    """The FastAPI app: /predict, /health, /model. `options` is the `mmfusion serve` command (limits, batching)."""
    root = Path(os.path.realpath(options.image_root)) if options.image_root else None
    reader = predictor.row_reader(Path("/"))  # rows arrive as decoded images: no paths reach the reader
    batcher: MicroBatcher | None = None

    def predict_rows(rows: list[dict]) -> list[dict]:
        return predictor.predict_batch(predictor.collate(rows))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal batcher
        batcher = MicroBatcher(predict_rows, options.max_batch, options.max_wait_ms / 1000)
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.worker.shutdown(wait=True)

    app = FastAPI(title="mmfusion", version=__version__, lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": error.message, "field": error.field}, status_code=error.status)

    @app.get("/health")
    async def health() -> dict:
        counts = {"requests": batcher.requests, "batches": batcher.batches, "largest_batch": batcher.largest_batch}
        return {"status": "ok", **counts}

    @app.get("/model")
    async def model() -> dict:
        return describe_model(predictor, checkpoint, backend, options)

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        image, path, text = await read_request(request, options)
        row = await run_in_threadpool(make_row, reader, image, path, text, root, options)
        return {"predictions": await batcher.submit(row)}

    return app


async def read_request(request: Request, options: Serve) -> tuple[bytes | None, str | None, str | None]:
    """(image bytes, image path, text) of a multipart or JSON request, within the size limits."""
    length = request.headers.get("content-length")
    if length is None:
        raise RequestError(411, None, "the request must state its Content-Length")
    limit = max_request_bytes(options)
    if not length.isdigit() or int(length) > limit:
        raise RequestError(413, None, f"request body of {length} bytes exceeds the limit of {limit}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        values = await json_fields(request)
    elif kind == "multipart/form-data":
        values = await form_fields(request)
    else:
        raise RequestError(415, None, "send multipart/form-data (an image file and a text field) or application/json")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise RequestError(400, unknown[0], f"unknown field {unknown[0]!r}; the fields are {list(FIELDS)}")
    image, path, text = (values.get(name) for name in FIELDS)
    if image is not None and path is not None:
        raise RequestError(400, "image_path", "give an image or an image_path, not both")
    if image is None and path is None and text is None:
        raise RequestError(400, None, "give an image (or image_path) and/or a text")
    if text is not None and not isinstance(text, str):
        raise RequestError(400, "text", f"expected a string, got {type(text).__name__}")
    if text is not None and len(text) > options.max_text_chars:
        raise RequestError(413, "text", f"text of {len(text)} characters exceeds the limit of {options.max_text_chars}")
    if path is not None and not isinstance(path, str):
        raise RequestError(400, "image_path", f"expected a string, got {type(path).__name__}")
    if image is not None and len(image) > options.max_image_bytes:
        raise RequestError(413, "image", f"image of {len(image)} bytes exceeds the limit of {options.max_image_bytes}")
    return image, path, text


def max_request_bytes(options: Serve) -> int:
    """An image in base64 (4/3 of its bytes), a text of 4-byte characters, and room for the form or JSON around."""
    return options.max_image_bytes * 4 // 3 + 4 * options.max_text_chars + 65_536


async def json_fields(request: Request) -> dict:
    try:
        values = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, "body", f"not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise RequestError(400, "body", f"expected a JSON object with {list(FIELDS)}, got {type(values).__name__}")
    image = values.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise RequestError(400, "image", f"expected base64 text, got {type(image).__name__}")
        try:
            values["image"] = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(400, "image", f"not valid base64 ({error})") from None
    return values


async def form_fields(request: Request) -> dict:
    try:
        form = await request.form(max_files=1, max_fields=len(FIELDS))
    except HTTPException as error:  # starlette's answer to a malformed form
        raise RequestError(400, "body", f"not valid multipart form data ({error.detail})") from None
    values = {}
    for name, value in form.multi_items():
        if name in values:
            raise RequestError(400, name, f"field {name!r} given more than once")
        values[name] = await value.read() if isinstance(value, UploadFile) else value
    if isinstance(values.get("image"), str):
        raise RequestError(400, "image", "expected a file upload (curl -F image=@photo.png), got a text field")
    return values


def make_row(reader, image: bytes | None, path: str | None, text: str | None, root: Path | None, options: Serve):
    """The model-ready row of one request (image decoded and checked, text checked), or a RequestError."""
    field = "image_path" if path is not None else "image"
    try:
        source = image if path is None else image_file(path, root, options)
        decoded = None if source is None else decode(source, field, options)
    except BadInputError as error:
        raise RequestError(400, field, str(error)) from None
    try:
        text = None if text is None else reader.text(text, "field 'text'")
    except BadInputError as error:
        raise RequestError(400, "text", str(error)) from None
    return reader.read({IMAGE: decoded, TEXT: text}, 0)


def image_file(path: str, root: Path | None, options: Serve) -> str:
    """An image path resolved inside the allowed root (links followed), within the size limit."""
    if root is None:
        raise RequestError(403, "image_path", "this server takes no image paths (start it with --image_root DIR)")
    resolved = os.path.realpath(root / path)
    if os.path.commonpath([root, resolved]) != str(root):
        raise RequestError(403, "image_path", f"{path!r} is outside the allowed image root")
    if not os.path.isfile(resolved):
        raise RequestError(404, "image_path", f"no image file {path!r} under the image root")
    size = os.path.getsize(resolved)
    if size > options.max_image_bytes:
        raise RequestError(413, "image_path", f"image of {size} bytes exceeds the limit of {options.max_image_bytes}")
    return resolved


def decode(source: bytes | str, field: str, options: Serve) -> Image.Image:
    """Check the pixel count from the header, then decode fully (corrupt or truncated files fail here)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as header:
            width, height = header.size
    except Image.DecompressionBombError as error:
        raise RequestError(413, field, f"image too large ({error})") from None
    except (OSError, ValueError) as error:
        raise RequestError(400, field, f"field {field!r}: not a readable image ({error})") from None
    if width * height > options.max_image_pixels:
        limit = options.max_image_pixels
        raise RequestError(413, field, f"image of {width}x{height} pixels exceeds the limit of {limit} pixels")
    return open_image(source, options.max_image_pixels, f"field {field!r}")


def describe_model(predictor: Predictor, checkpoint: str, backend: str, options: Serve) -> dict:
    """GET /model: the tasks and their labels, input sizes, limits and the versions involved."""
    import torch

    config_file = Path(checkpoint) / MODEL_CONFIG_NAME
    trained_with = json.loads(config_file.read_text()).get("mmfusion_version") if config_file.is_file() else None
    versions = {"mmfusion": __version__, "checkpoint_mmfusion": trained_with, "torch": torch.__version__}
    versions["python"] = platform.python_version()
    if backend == "onnx":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    tasks = []
    for spec in predictor.tasks:
        task = {"name": spec.name, "type": spec.type}
        if spec.type in ("classification", "multilabel"):
            task["labels"] = label_names(spec)
        tasks.append(task)
    settings = predictor.processor.settings
    return {
        "checkpoint": checkpoint,
        "backend": backend,
        "tasks": tasks,
        "image_size": settings.image_size,
        "max_text_tokens": settings.max_text_length,
        "limits": {name: getattr(options, name) for name in LIMITS},
        "versions": versions,
    }
