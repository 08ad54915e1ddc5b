"""Web app latency: POST /api/classify on a live uvicorn server vs the bare compute of the same answer.

A real model: the locked ImageNet EfficientNet-Lite0 (weights from the `efficientnet` extra, offline)
with a 6-layer 384-wide text transformer (untrained: latency does not depend on the weights). A
451x300 JPEG (tests/data/chelsea.jpg) and 5 labels with the `short` templates (6 prompts per label).

  (a) the server, same labels each time: HTTP on loopback, multipart parsing, JPEG decode,
      preprocessing, the image tower, the answer (the labels' text embeddings are cached);
  (b) the server, new labels every request (the text tower runs too);
  (c) bare compute: model.classify(image, labels) on the already-decoded image (image + text towers);
  (d) bare image path: encode_images + label_probabilities with ready label weights.

Prints median / p90 / min ms of each over --requests interleaved rounds (after 2 warm-up rounds) and the ratios
(a)/(d) and (b)/(c): how much the web app adds to the compute it cannot avoid; ends with ``result:`` lines.
The locked image tower runs on littune's runtime (onnxruntime on a CPU), in the server and in (c) and (d) alike.

    .venv/bin/python benchmarks/serve_latency.py [--requests 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHOTO = HERE.parent / "tests" / "data" / "chelsea.jpg"
LABELS = ["cat", "dog", "cup of coffee", "bicycle", "mountain"]
CAPTIONS = ["a photo of a cat", "a dog on the grass", "a cup of coffee on a table", "a red bicycle",
            "snow on a mountain", "a tabby cat with green eyes", "espresso in a white cup"] * 20


def build_model():
    from littune import LiTConfig, LiTModel

    cfg = LiTConfig(setting="Lu", image_tower={"type": "efficientnet-lite", "name": "efficientnet-lite0"},
                    text_tower={"type": "transformer", "width": 384, "depth": 6, "heads": 6, "context_length": 32,
                                "vocab_size": 2000}, embed_dim=512)
    return LiTModel.from_config(cfg, captions=CAPTIONS).eval()


def summary(ms: list[float]) -> tuple[float, float]:
    s = sorted(ms)
    return statistics.median(s), s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


def start_server(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = ap.parse_args()

    import httpx
    import torch
    from PIL import Image

    from littune.serve.app import create_app

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model()
    print(f"model built in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}", file=sys.stderr)
    data = PHOTO.read_bytes()
    image = Image.open(io.BytesIO(data)).convert("RGB")

    weights = model.zeroshot_weights(LABELS, "short")
    paths = {
        "(a) server, same labels": lambda i: post(LABELS),
        "(b) server, new labels each request": lambda i: post([f"{x} {i + 100}" for x in LABELS]),
        "(c) bare model.classify (decoded image)": lambda i: model.classify(image, LABELS),
        "(d) bare image path (ready label weights)":
            lambda i: model.label_probabilities(model.encode_images([image]), weights),
    }
    rows: dict[str, list[float]] = {name: [] for name in paths}
    server, thread, url = start_server(create_app(model, model_name="effnet-lite0-bench"))
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            def post(labels):
                r = client.post("/api/classify", files={"image": ("chelsea.jpg", data, "image/jpeg")},
                                data={"labels": ", ".join(labels)})
                r.raise_for_status()
                return r.json()

            top = post(LABELS)["labels"][0]["label"]
            # Interleaved rounds: a busy machine slows every path alike instead of one of them.
            for i in range(-2, args.requests):
                for name, fn in paths.items():
                    t = time.perf_counter()
                    fn(i)
                    if i >= 0:
                        rows[name].append(1000 * (time.perf_counter() - t))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert LABELS[int(model.classify(image, LABELS)[0].argmax())] == top

    print(f"\nPOST /api/classify, {image.width}x{image.height} JPEG, {len(LABELS)} labels x 6 templates, "
          f"{args.requests} requests, {torch.get_num_threads()} torch threads\n")
    print("| path | median ms | p90 ms | min ms |")
    print("|---|---|---|---|")
    med = {}
    for name, ms in rows.items():
        m, p = summary(ms)
        med[name[:3]] = m
        print(f"| {name} | {m:.1f} | {p:.1f} | {min(ms):.1f} |")
    print(f"\nratio (a)/(d): {med['(a)'] / med['(d)']:.2f}   ratio (b)/(c): {med['(b)'] / med['(c)']:.2f}")
    print(f"result: classify_ms_median = {med['(a)']:.1f}")
    print(f"result: classify_vs_bare_image_path = {med['(a)'] / med['(d)']:.2f}")
    print(f"result: classify_new_labels_vs_bare = {med['(b)'] / med['(c)']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
