"""Times the HTTP server under load: requests/s and latency percentiles at 1 and 16 concurrent clients.

    python scripts/benchmark_server.py --requests=64 --steps=20
    python scripts/benchmark_server.py --micro_batch=8 --batch_size=8     # images share U-Net calls

A server of the model (default: the shipped shapes64 model, 64x64) runs on a thread of this process on 127.0.0.1;
clients post AUTOMATIC1111 txt2img bodies (one image each, distinct seeds and captions) over HTTP. After one
untimed warm-up request per concurrency (compilation excluded), `--requests` requests are timed at each
concurrency. Reported: requests/s, latency p50/p90/p99, the compiled calls the server made, and the gain of 16
clients over 1 (what sharing calls and overlapping HTTP with generation give), plus the Python API's images/s on
the same settings for reference.
"""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from absl import app, flags

flags.DEFINE_string("model", None, "A model sd_jax.load reads (default: the shipped shapes64 model).")
flags.DEFINE_integer("requests", 64, "Timed requests at each concurrency.")
flags.DEFINE_list("clients", ["1", "16"], "Concurrencies to time.")
flags.DEFINE_integer("steps", 20, "Sampler steps per image.")
flags.DEFINE_integer("size", None, "Image side in pixels (default: the model's native size).")
flags.DEFINE_integer("batch_size", None, "The server's images per compiled call (default: devices x micro-batch).")
flags.DEFINE_integer("micro_batch", 1, "Images per U-Net call on each device.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import numpy as np
    import requests

    import sd_jax
    from sd_jax import shapes
    from sd_jax.server.app import Config, create_app
    from sd_jax.server.models import ModelStore
    from sd_jax.server.serve import Running
    from sd_jax.server.worker import Worker

    pipe = sd_jax.load(FLAGS.model, micro_batch=FLAGS.micro_batch)
    size = FLAGS.size or pipe.native_size
    worker = Worker(ModelStore(None, FLAGS.model), pipe=pipe, batch_size=FLAGS.batch_size)
    captions = shapes.ALL_CAPTIONS

    def body(i: int) -> dict:
        caption = captions[i % len(captions)]
        return {"prompt": caption, "seed": i, "steps": FLAGS.steps, "width": size, "height": size, "cfg_scale": 7.5}

    results = {"model": FLAGS.model or "shapes64", "size": size, "steps": FLAGS.steps, "devices": pipe.mesh.size}
    results |= {"micro_batch": FLAGS.micro_batch, "batch_size": FLAGS.batch_size}
    with Running(create_app(worker, Config(watermark=False))) as server:
        url = server.url + "/sdapi/v1/txt2img"

        def one(i: int) -> float:
            start = time.perf_counter()
            response = requests.post(url, json=body(i), timeout=3600)
            response.raise_for_status()
            return time.perf_counter() - start

        for clients in map(int, FLAGS.clients):
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, range(10**6, 10**6 + clients)))  # warm-up: compiles the call sizes this load uses
                calls = worker.calls
                start = time.perf_counter()
                latencies = sorted(pool.map(one, range(FLAGS.requests)))
                seconds = time.perf_counter() - start
            results[f"clients_{clients}"] = {
                "requests_per_s": FLAGS.requests / seconds,
                "p50_s": float(np.percentile(latencies, 50)),
                "p90_s": float(np.percentile(latencies, 90)),
                "p99_s": float(np.percentile(latencies, 99)),
                "calls": worker.calls - calls,
            }
    worker.close()

    # The Python API, one image a call, for what the server's HTTP and queue add.
    pipe.txt2img(captions[0], steps=FLAGS.steps, width=size, height=size, seed=0)
    start = time.perf_counter()
    n = min(FLAGS.requests, 16)
    for i in range(n):
        pipe.txt2img(captions[i % len(captions)], steps=FLAGS.steps, width=size, height=size, seed=i)
    results["python_api_images_per_s"] = n / (time.perf_counter() - start)

    if FLAGS.json:
        print(json.dumps(results))
        return
    print(
        f"model {results['model']}, {size}x{size}, {FLAGS.steps} steps, {pipe.mesh.size} device(s), "
        f"micro_batch {FLAGS.micro_batch}, batch_size {FLAGS.batch_size or 'default'}"
    )
    print(f"{'clients':>8} {'req/s':>8} {'p50 s':>8} {'p90 s':>8} {'p99 s':>8} {'calls':>6}")
    for clients in map(int, FLAGS.clients):
        r = results[f"clients_{clients}"]
        print(
            f"{clients:>8} {r['requests_per_s']:>8.2f} {r['p50_s']:>8.3f} {r['p90_s']:>8.3f} {r['p99_s']:>8.3f} "
            f"{r['calls']:>6}"
        )
    keys = [f"clients_{c}" for c in FLAGS.clients]
    if len(keys) > 1:
        gain = results[keys[-1]]["requests_per_s"] / results[keys[0]]["requests_per_s"]
        print(f"throughput at {FLAGS.clients[-1]} clients / at {FLAGS.clients[0]}: {gain:.2f}x")
    print(f"Python API, one image a call: {results['python_api_images_per_s']:.2f} images/s")


if __name__ == "__main__":
    sys.exit(app.run(main))
