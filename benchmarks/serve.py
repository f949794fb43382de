"""Web server latency: POST /api/predict for one image vs a bare decode + forward of the same image, side by side.

The server (``smse serve``, uvicorn) runs in its own process on a free localhost port; one client sends
requests one after another over a kept-alive connection. The bare path runs in a worker thread, as the
server's inference does (on a loaded machine, torch's two OpenMP threads behave differently in the main
thread). Rounds alternate between the two paths.

Run: python benchmarks/serve.py [--run RUN] [--rounds 7] [--per-round 15]
(without --run: a one-epoch run of the demo config, the model `smse demo` trains, on a small synthetic set)
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, SAMPLE, machine, synthetic_set  # noqa: E402

from smse.api import load_model  # noqa: E402
from smse.data.breakhis import iter_image_files  # noqa: E402
from smse.data.images import read_image  # noqa: E402


def demo_run() -> Path:
    """The demo config trained for one epoch on 8 synthetic patients (the weights do not change the timing)."""
    from smse.config import load_config
    from smse.engine import train

    out = OUT / "serve-run"
    if not (out / "best.safetensors").exists():
        data = synthetic_set(8, 4)
        train(load_config("demo", [f"data.root={data}", f"out={out}", "train.epochs=1"]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int) -> subprocess.Popen:
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "smse.cli", "serve", str(run), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"smse serve exited with {proc.returncode}")
    proc.kill()
    raise RuntimeError("smse serve did not answer within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run folder (default: a one-epoch demo-config run)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=15)
    args = parser.parse_args()
    run = args.run or demo_run()
    files = (
        sorted(iter_image_files(SAMPLE))
        if SAMPLE.exists()
        else sorted(iter_image_files(synthetic_set(8, 4, size=(700, 460))))
    )
    image = next((f for f in files if "-100-" in f.name), files[0])
    data = image.read_bytes()
    model = load_model(run)

    @torch.no_grad()
    def forward() -> None:
        model.module(model.transform(read_image(io.BytesIO(data), name=image.name))[None])

    worker = ThreadPoolExecutor(1)

    def bare() -> None:
        worker.submit(forward).result()

    port = free_port()
    server = start_server(run, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

            def request() -> None:
                response = client.post("/api/predict", files={"images": (image.name, data, "image/png")})
                response.raise_for_status()

            steps = {"bare": bare, "server": request}
            rounds: dict[str, list[list[float]]] = {name: [] for name in steps}
            for _ in range(3):  # warm-up
                for step in steps.values():
                    step()
            for _ in range(args.rounds):
                for name, step in steps.items():
                    times = []
                    for _ in range(args.per_round):
                        start = time.perf_counter()
                        step()
                        times.append(time.perf_counter() - start)
                    rounds[name].append(times)
    finally:
        server.terminate()
        server.wait(30)
    # the round with the lowest median of each path, as the other ratios take the best of interleaved rounds
    best = {name: min(r, key=np.median) for name, r in rounds.items()}
    stats = {name: (1 / np.mean(t), 1000 * np.median(t), 1000 * np.percentile(t, 95)) for name, t in best.items()}
    source = "the real BreakHis sample" if SAMPLE.exists() else "a synthetic set"
    w, h = read_image(image).size
    print(
        f"# web server: one {w}x{h} PNG from {source} per request, {model.config.model.backbone} at "
        f"{model.size[1]}x{model.size[0]}, one client, best of {args.rounds} interleaved rounds of {args.per_round} "
        f"requests per path; "
        f"{date.today()}; {machine()}; load average {os.getloadavg()[0]:.1f}"
    )
    print("| path | requests/s | p50 ms | p95 ms |")
    print("|---|---|---|---|")
    print("| bare decode + forward (in process, worker thread) | {:.1f} | {:.1f} | {:.1f} |".format(*stats["bare"]))
    print(
        "| POST /api/predict (HTTP, multipart, decode, forward, k-NN overall and per magnification, map, JSON) "
        "| {:.1f} | {:.1f} | {:.1f} |".format(*stats["server"])
    )
    print(f"p50 ratio server / bare: {stats['server'][1] / stats['bare'][1]:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
