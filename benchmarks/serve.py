"""Serving: requests/s and p50/p99 latency of `mmfusion serve` under a fixed number of concurrent clients.

    python benchmarks/serve.py                     # trains the default recipe for --train_steps steps, then measures
    python benchmarks/serve.py --checkpoint runs/default/best --requests 2000 --concurrency 16

Model: unless --checkpoint is given, the default recipe (configs/default.yaml: simple_cnn + bidirectional LSTM,
gated fusion, the sample data's five tasks and the pair matching task, 64 px) trained by train.py on data/sample for
--train_steps steps: the real architecture and size, accuracy beside the point. The server runs in its own process on
127.0.0.1 (torch backend) twice: with micro-batching (--max_batch 32, --max_wait_ms 5) and without (--max_batch 1).
Each request is a multipart PNG and caption from data/sample/test. Per setting: 50 warm-up requests, then
--requests requests from --concurrency client threads (httpx, in this process); latency is from sending a request to
its answer. The clients share the machine's cores with the server. Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import ROOT, write_result

IMAGES = ROOT / "data" / "sample" / "test"
SETTINGS = {"batched": ["--max_batch", "32", "--max_wait_ms", "5"], "unbatched": ["--max_batch", "1"]}


def train_checkpoint(steps: int, output_dir: Path) -> Path:
    """The default recipe trained for `steps` steps by train.py; its final/ checkpoint."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--train.max_steps",
        str(steps),
        "--train.output_dir",
        str(output_dir),
        "--train.report",
        "false",
    ]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    return output_dir / "final"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, options: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "mmfusion", "serve", str(checkpoint), "--port", str(port), *options]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")


def requests(count: int) -> list[dict]:
    """Multipart bodies (image file and caption) cycling through the sample test split."""
    rows = [json.loads(line) for line in (IMAGES / "metadata.jsonl").read_text().splitlines()]
    bodies = [
        {
            "files": {"image": (row["file_name"], (IMAGES / row["file_name"]).read_bytes())},
            "data": {"text": row["caption"]},
        }
        for row in rows
    ]
    return [bodies[i % len(bodies)] for i in range(count)]


def measure(url: str, count: int, concurrency: int) -> dict:
    """Requests/s over the whole run and per-request latency percentiles (ms); every answer must be 200."""
    with httpx.Client(base_url=url, timeout=120) as client:

        def send(body: dict) -> float:
            start = time.perf_counter()
            answer = client.post("/predict", **body)
            if answer.status_code != 200:
                raise RuntimeError(f"request failed: {answer.status_code} {answer.text}")
            return time.perf_counter() - start

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(send, requests(50)))  # warm-up
            start = time.perf_counter()
            latencies = list(pool.map(send, requests(count)))
            wall = time.perf_counter() - start
        health = client.get("/health").json()
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "requests_per_s": round(count / wall, 1),
        "latency_ms": {
            "p50": round(cuts[49] * 1000, 1),
            "p99": round(cuts[98] * 1000, 1),
            "mean": round(statistics.fmean(latencies) * 1000, 1),
        },
        "batches": health["batches"],
        "largest_batch": health["largest_batch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: train the default recipe briefly)")
    parser.add_argument("--train_steps", type=int, default=30)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.checkpoint:
            checkpoint, model = Path(args.checkpoint), args.checkpoint
        else:
            checkpoint = train_checkpoint(args.train_steps, scratch / "run")
            model = f"default recipe (configs/default.yaml) trained {args.train_steps} steps on data/sample"
        results = {}
        for name, options in SETTINGS.items():
            process, url = start_server(checkpoint, options, scratch / f"{name}.log")
            try:
                results[name] = {"options": " ".join(options), **measure(url, args.requests, args.concurrency)}
            finally:
                process.terminate()
                process.wait(timeout=30)
            figures = results[name]
            print(
                f"{name:<10} {figures['requests_per_s']:>7.1f} requests/s  p50 {figures['latency_ms']['p50']} ms  "
                f"p99 {figures['latency_ms']['p99']} ms  largest batch {figures['largest_batch']}"
            )
    load = os.getloadavg()[0]  # other work on a shared machine slows the server and the clients
    write_result(
        "serve",
        {
            "model": model,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "load_average": load,
            "request": "multipart PNG (64x64) + caption",
            "settings": results,
        },
    )


if __name__ == "__main__":
    main()
