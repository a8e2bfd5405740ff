"""Times the batch job against calling the pipeline directly for the same images, alternating rounds.

    python scripts/benchmark_batch.py --lines=100 --steps=20

A prompts file of `--lines` shapes captions (one image a line, seed = line - 1) is made three ways per round, after
one untimed warm-up of each (compilation is excluded): `pipe.txt2img` on the same prompts in calls of the job's
batch size (generation only), the same plus saving each image as the txt2img script does (PNG text chunks,
watermark), and `batch.run_job` on the file into a fresh folder (manifest, atomic writes). Prints images/s and the
job's overhead against each direct path.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("model", None, "A model sd_jax.load reads (default: the shipped shapes64 model).")
flags.DEFINE_integer("lines", 100, "Lines in the prompts file (one image each).")
flags.DEFINE_integer("steps", 20, "Sampler steps per image.")
flags.DEFINE_integer("batch_size", 8, "Images per compiled call, for the job and the direct calls alike.")
flags.DEFINE_integer("rounds", 3, "Timed rounds of each path, alternating.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import sd_jax
    from sd_jax import batch, batch_files, infotext, shapes
    from sd_jax.images import save_generated
    from sd_jax.settings import GenerationSettings

    pipe = sd_jax.load(FLAGS.model)
    captions = [shapes.ALL_CAPTIONS[i % len(shapes.ALL_CAPTIONS)] for i in range(FLAGS.lines)]
    work = Path(tempfile.mkdtemp(prefix="sd_jax_batch_bench_"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": c, "seed": i}) + "\n" for i, c in enumerate(captions)))
    requests = batch_files.read_requests(prompts, {"steps": FLAGS.steps})
    b = FLAGS.batch_size

    def direct(save: bool, folder: Path) -> None:
        for start in range(0, len(captions), b):
            images = pipe.txt2img(captions[start : start + b], steps=FLAGS.steps, seed=start)
            if save:
                seeds = [start + i for i in range(len(images))]
                texts = [
                    infotext.image_texts(pipe, settings, [image], [seed], model=FLAGS.model, dtype="float32")[0]
                    for image, seed in zip(images, seeds, strict=True)
                    for settings in [GenerationSettings(prompt=captions[seed], steps=FLAGS.steps, seed=seed)]
                ]
                save_generated(images, folder, seeds, texts, family=pipe.config.family, log=lambda _: None)

    def job(folder: Path) -> None:
        batch.run_job(pipe, requests, folder, model=FLAGS.model, dtype="float32", batch_size=b, show_progress=False)

    paths = {
        "pipeline, generation only": lambda folder: direct(False, folder),
        "pipeline + saving PNGs": lambda folder: direct(True, folder),
        "batch job": job,
    }
    times = {name: [] for name in paths}
    for round_ in range(FLAGS.rounds + 1):  # round 0 warms up (compiles) and is not counted
        for name, run in paths.items():
            folder = work / f"{name.split()[0]}-{round_}-{len(times[name])}"
            start = time.perf_counter()
            run(folder)
            if round_:
                times[name].append(time.perf_counter() - start)
            print(f"round {round_} {name}: {time.perf_counter() - start:.2f} s", file=sys.stderr)
    best = {name: min(t) for name, t in times.items()}
    result = {
        "images": len(captions),
        "steps": FLAGS.steps,
        "batch_size": b,
        "devices": pipe.mesh.size,
        "seconds_min": best,
        "images_per_second": {name: len(captions) / t for name, t in best.items()},
        "job_overhead_vs_generation": best["batch job"] / best["pipeline, generation only"] - 1,
        "job_overhead_vs_saving": best["batch job"] / best["pipeline + saving PNGs"] - 1,
    }
    if FLAGS.json:
        print(json.dumps(result))
        return
    print(f"{len(captions)} images, {FLAGS.steps} steps, batch {b}, {pipe.mesh.size} device(s); best of {FLAGS.rounds}")
    for name, t in best.items():
        print(f"  {name:<28} {t:8.2f} s  {len(captions) / t:7.2f} images/s")
    print(f"  batch job overhead: {result['job_overhead_vs_generation']:+.1%} against generation only, ")
    print(f"                      {result['job_overhead_vs_saving']:+.1%} against the pipeline saving its PNGs")


if __name__ == "__main__":
    sys.exit(app.run(main))
