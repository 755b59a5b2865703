"""`mmfusion serve` as a real uvicorn server on 127.0.0.1: 200 requests from 8 concurrent clients are answered as the
Predictor predicts the same inputs, bad requests get a 4xx naming the field, and the server keeps answering."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers import SAMPLE, same_prediction, sample_checkpoint
from PIL import Image

from mmfusion.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
IMAGES = SAMPLE / "test"
LIMITS = {"max_image_bytes": 20_000, "max_image_pixels": 250_000, "max_text_chars": 300}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return sample_checkpoint(tmp_path_factory.mktemp("run") / "best", fusion="gated")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`python -m mmfusion serve` in a subprocess; yields its base URL once /health answers."""
    port = free_port()
    options = [f"--{name}={value}" for name, value in LIMITS.items()]
    command = [
        sys.executable,
        "-m",
        "mmfusion",
        "serve",
        str(checkpoint),
        "--port",
        str(port),
        "--image_root",
        str(IMAGES),
        "--max_batch",
        "16",
        "--max_wait_ms",
        "5",
        *options,
    ]
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, f"the server exited: {Path(log.name).read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the server did not answer /health within 90 s"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def requests_and_inputs(count: int) -> list[tuple[dict, tuple]]:
    """(httpx request arguments, (image, text) as given to Predictor.predict) in the formats the server takes."""
    rows = [json.loads(line) for line in (IMAGES / "metadata.jsonl").read_text().splitlines()]
    cases = []
    for i in range(count):
        row = rows[i % len(rows)]
        data = (IMAGES / row["file_name"]).read_bytes()
        kind = i % 5
        if kind == 0:  # multipart: image file and text
            cases.append(
                ({"files": {"image": ("x.png", data)}, "data": {"text": row["caption"]}}, (data, row["caption"]))
            )
        elif kind == 1:  # JSON: base64 image and text
            body = {"image": base64.b64encode(data).decode(), "text": row["caption"]}
            cases.append(({"json": body}, (data, row["caption"])))
        elif kind == 2:  # JSON: a path under the image root
            cases.append(({"json": {"image_path": row["file_name"], "text": row["caption"]}}, (data, row["caption"])))
        elif kind == 3:  # image only
            cases.append(({"files": {"image": ("x.png", data)}}, (data, None)))
        else:  # text only
            cases.append(({"json": {"text": row["caption"]}}, (None, row["caption"])))
    return cases


@pytest.mark.timeout(240)
def test_concurrent_requests_are_batched_and_answered_as_the_predictor_predicts(server, checkpoint):
    cases = requests_and_inputs(200)
    predictor = Predictor.from_pretrained(checkpoint, device="cpu")
    expected = predictor.predict([image for _, (image, _) in cases], [text for _, (_, text) in cases])
    with httpx.Client(base_url=server, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda case: client.post("/predict", **case[0]), cases))
    assert [answer.status_code for answer in answers] == [200] * len(cases)
    for i, (answer, want) in enumerate(zip(answers, expected)):
        assert same_prediction(answer.json()["predictions"], want), f"request {i}: {answer.json()} != {want}"
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["requests"] >= 200
    assert health["largest_batch"] > 1 and health["batches"] < health["requests"]  # requests shared forward passes


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = [
    # (request arguments, status, field, start of the message)
    ({"json": {}}, 400, None, "give an image (or image_path) and/or a text"),
    ({"json": {"text": "   "}}, 400, "text", "field 'text': text is empty"),
    ({"json": {"text": 5}}, 400, "text", "expected a string, got int"),
    ({"json": {"text": "a " * 200}}, 413, "text", "text of 400 characters exceeds the limit of 300"),
    ({"files": {"image": ("x.png", b"not an image at all")}}, 400, "image", "field 'image': not a readable image"),
    ({"files": {"image": ("x.png", png(64, 64)[:60])}}, 400, "image", "field 'image': image is corrupt or truncated"),
    (
        {"files": {"image": ("x.png", os.urandom(30_000))}},
        413,
        "image",
        "image of 30000 bytes exceeds the limit of 20000",
    ),
    (
        {"files": {"image": ("x.png", png(600, 600))}},
        413,
        "image",
        "image of 600x600 pixels exceeds the limit of 250000",
    ),
    ({"json": {"image": "!!not base64!!"}}, 400, "image", "not valid base64"),
    (
        {"json": {"image_path": "../train/00000.png"}},
        403,
        "image_path",
        "'../train/00000.png' is outside the allowed image root",
    ),
    ({"json": {"image_path": "/etc/passwd"}}, 403, "image_path", "'/etc/passwd' is outside the allowed image root"),
    ({"json": {"image_path": "missing.png"}}, 404, "image_path", "no image file 'missing.png' under the image root"),
    (
        {"json": {"image_path": "00000.png", "image": "aGVsbG8="}},
        400,
        "image_path",
        "give an image or an image_path, not both",
    ),
    ({"json": {"picture": "x", "text": "a cat"}}, 400, "picture", "unknown field 'picture'"),
    ({"json": ["a", "list"]}, 400, "body", "expected a JSON object"),
    (
        {"content": b'{"text": "unclosed', "headers": {"content-type": "application/json"}},
        400,
        "body",
        "not valid JSON",
    ),
    (
        {"data": {"image": "not a file", "text": "a cat"}, "files": {"other": ("x", b"")}},
        400,
        "image",
        "expected a file upload",
    ),
    ({"content": b"text=a cat", "headers": {"content-type": "text/plain"}}, 415, None, "send multipart/form-data"),
    (
        {"content": b"x" * 200_000, "headers": {"content-type": "application/json"}},
        413,
        None,
        "request body of 200000 bytes exceeds",
    ),
]


@pytest.mark.timeout(120)
def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        for arguments, status, field, message in BAD_REQUESTS:
            answer = client.post("/predict", **arguments)
            assert answer.status_code == status, (arguments.keys(), answer.text)
            body = answer.json()
            assert body["field"] == field and body["error"].startswith(message), body
        assert client.get("/health").status_code == 200
        assert client.post("/predict", json={"text": "a red circle"}).status_code == 200


def test_the_model_endpoint_lists_tasks_labels_and_versions(server, checkpoint):
    info = httpx.get(f"{server}/model").json()
    predictor_tasks = Predictor.from_pretrained(checkpoint, device="cpu").tasks
    assert [task["name"] for task in info["tasks"]] == [spec.name for spec in predictor_tasks]
    assert info["tasks"][1] == {"name": "background", "type": "classification", "labels": predictor_tasks[1].labels}
    assert info["backend"] == "torch" and info["versions"]["mmfusion"] == info["versions"]["checkpoint_mmfusion"]
    assert {key: info["limits"][key] for key in LIMITS} == LIMITS


def test_the_onnx_backend_serves_the_exported_graph(checkpoint, tmp_path):
    from fastapi.testclient import TestClient

    from mmfusion.cli import Serve
    from mmfusion.export import export_onnx
    from mmfusion.serve import create_app

    exported = export_onnx(checkpoint, tmp_path / "onnx").path.parent
    predictor = Predictor.from_pretrained(exported, backend="onnx")
    image, text = (IMAGES / "00003.png").read_bytes(), "a picture of one red square"
    expected = predictor.predict([image], [text])[0]
    app = create_app(predictor, Serve(checkpoint=str(exported), backend="onnx"), str(exported), "onnx")
    with TestClient(app) as client:
        answer = client.post("/predict", files={"image": ("x.png", image)}, data={"text": text})
        info = client.get("/model").json()
    assert answer.status_code == 200 and same_prediction(answer.json()["predictions"], expected)
    assert info["backend"] == "onnx" and "onnxruntime" in info["versions"]
