"""The batch job (`sd_jax.batch`, scripts/generate_batch.py) on the tiny random model: each image equals the pipeline's
for its line, mixed settings share executables, a kill at any moment is resumed to the same bytes, and two processes
together make what one makes alone."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import sd_jax
from sd_jax import batch, batch_files, compile_cache
from sd_jax.settings import GenerationSettings
from tests.test_convert import ROOT, run_script

MODEL = "random:tiny"
FLAG_DEFAULTS = {"height": 32, "width": 32, "steps": 2}


def _write_inputs(folder):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(mask).save(folder / "mask.png")


MIXED = [
    {"prompt": "a cat", "seed": 3, "steps": 3},
    "# a comment, then a blank line",
    "",
    {"prompt": ["a dog", "a red fox"], "num_images": 2, "guidance_scale": 4.0, "seed": 10},
    {"prompt": "a cat", "sampler": "euler_a", "seed": 5},
    {"mode": "img2img", "prompt": "a bird", "init_image": "init.png", "strength": 0.5, "steps": 4},
    {"mode": "inpaint", "prompt": "a bird", "init_image": "init.png", "mask": "mask.png", "seed": 1},
    {"prompt": "a house", "height": 48, "width": 32, "sampler": "euler_a"},
    {"prompt": "a cat " * 90, "seed": 2},  # three chunks: the bucket of four
]


def _prompts_file(folder, lines=MIXED):
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pipe():
    # Its own executables: the tests count what the job compiles, whatever other tests of this process compiled.
    compile_cache.clear_shared()
    return sd_jax.load(MODEL)


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    """An uninterrupted in-process run of the mixed file: (requests, output folder, summary)."""
    folder = tmp_path_factory.mktemp("reference")
    _write_inputs(folder)
    requests = batch_files.read_requests(_prompts_file(folder), FLAG_DEFAULTS)
    summary = batch.run_job(pipe, requests, folder / "out", model=MODEL, dtype="float32", show_progress=False)
    return requests, folder / "out", summary


def _pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _done_records(folder):
    records = [r for p in folder.glob("manifest*.jsonl") for r in batch_files.read_manifest(p)]
    return sorted((r["line"], r["index"]) for r in records if r["status"] == "done")


def test_each_image_is_the_pipelines_and_mixed_settings_share_executables(pipe, reference):
    requests, out, summary = reference
    total = sum(r.num_images_total for r in requests)
    assert (summary.done, summary.skipped, summary.failed) == (total, 0, 0)
    # ddim 32x32 one-chunk txt2img (lines 1 and 4: other steps, guidance, seeds), euler_a, img2img, inpaint, 48x32,
    # and the two-chunk prompt: six programs, each compiled once.
    assert summary.groups == 6
    assert summary.executables == 6
    assert _done_records(out) == sorted((r.line, i) for r in requests for i in range(r.num_images_total))
    for request in requests:
        images = pipe.generate(request.settings, request.init_image, request.mask)
        for index, image in enumerate(images):
            path = out / batch_files.image_name(request.line, index)
            np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(image), err_msg=path.name)
    stored = json.loads(Image.open(out / "000004-003.png").text["sd_jax"])
    assert (stored["prompt"], stored["seed"], stored["guidance_scale"], stored["num_images"]) == (
        "a red fox",
        13,
        4.0,
        1,
    )
    assert "Steps: 2, Sampler: DDIM" in Image.open(out / "000004-003.png").text["parameters"]


@pytest.mark.parametrize("devices", [1, 4])
def test_the_same_files_on_any_device_count(pipe, reference, tmp_path, devices):
    """Lines of two modes, sizes, samplers and step counts (three programs, to keep compiling short) on 1 and 4
    devices give the files the 8-device reference run wrote (each mesh compiles its own programs)."""
    import jax

    from sd_jax import parallel
    from sd_jax.pipeline import StableDiffusionPipeline

    requests, ref_out, _ = reference
    requests = [r for r in requests if r.line in (1, 4, 7, 8)]
    mesh = parallel.batch_mesh(jax.devices()[:devices])
    fewer = StableDiffusionPipeline(pipe.config, pipe.states, pipe.tokenizer, mesh=mesh)
    summary = batch.run_job(fewer, requests, tmp_path / "out", model=MODEL, dtype="float32", show_progress=False)
    assert summary.groups == 3
    made = _pngs(tmp_path / "out")
    assert len(made) == 7 and made == {name: data for name, data in _pngs(ref_out).items() if name in made}


def test_a_groups_last_call_is_padded_to_the_call_size(pipe, tmp_path):
    """20 images in calls of 16: the last call of 4 is padded to 16 and reuses the first call's executable."""
    requests = batch_files.read_requests(
        _prompts_file(tmp_path, [{"prompt": "a cat", "num_images": 20}]), FLAG_DEFAULTS
    )
    summary = batch.run_job(
        pipe, requests, tmp_path / "out", model=MODEL, dtype="float32", batch_size=16, show_progress=False
    )
    assert (summary.done, summary.executables) == (20, 1)


def test_resume_after_a_crash_between_rename_and_record(pipe, reference, tmp_path, monkeypatch):
    """Killed after an image's rename but before its manifest record: the rerun records it, makes the rest, and every
    file is byte-identical to the uninterrupted run's."""
    requests, ref_out, _ = reference
    _write_inputs(tmp_path)
    requests = batch_files.read_requests(_prompts_file(tmp_path), FLAG_DEFAULTS)
    out = tmp_path / "out"
    appended = []
    real_append = batch_files.Manifest.append

    def crash_on_third(self, record):
        if len(appended) == 2:
            raise KeyboardInterrupt("killed")
        appended.append(record)
        real_append(self, record)

    monkeypatch.setattr(batch_files.Manifest, "append", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        batch.run_job(pipe, requests, out, model=MODEL, dtype="float32", show_progress=False)
    monkeypatch.undo()
    assert len(_pngs(out)) == 3 and len(_done_records(out)) == 2
    summary = batch.run_job(pipe, requests, out, model=MODEL, dtype="float32", show_progress=False)
    assert summary.skipped == 3
    assert summary.done == sum(r.num_images_total for r in requests) - 3
    assert _pngs(out) == _pngs(ref_out)
    assert _done_records(out) == _done_records(ref_out)  # each image recorded exactly once
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_bad_line_fails_its_images_only(pipe, tmp_path):
    _write_inputs(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [{"prompt": "a cat"}, {"mode": "img2img", "prompt": "x", "init_image": "broken.png"}]
    requests = batch_files.read_requests(_prompts_file(tmp_path, lines), FLAG_DEFAULTS)
    summary = batch.run_job(pipe, requests, tmp_path / "out", model=MODEL, dtype="float32", show_progress=False)
    assert (summary.done, summary.failed) == (1, 1)
    records = batch_files.read_manifest(tmp_path / "out" / "manifest.jsonl")
    failed = [r for r in records if r["status"] == "failed"]
    assert [r["line"] for r in failed] == [2] and "broken.png" in failed[0]["error"]


def test_micro_batches_group_by_loop_data(tmp_path):
    """With micro-batches of 2 the lines of other steps go to other calls (a micro-batch walks one schedule), and
    every image still equals the pipeline's at that micro-batch."""
    pipe = sd_jax.load(MODEL, micro_batch=2)
    lines = [{"prompt": "a cat", "num_images": 3}, {"prompt": "a dog", "steps": 3}, {"prompt": "a fox", "seed": 4}]
    requests = batch_files.read_requests(_prompts_file(tmp_path, lines), FLAG_DEFAULTS)
    summary = batch.run_job(pipe, requests, tmp_path / "out", model=MODEL, dtype="float32", show_progress=False)
    assert summary.groups == 2 and summary.executables == 1
    for request in requests:
        for index, image in enumerate(pipe.generate(request.settings)):
            path = tmp_path / "out" / batch_files.image_name(request.line, index)
            np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(image))


# ---------------------------------------------------------------------------------------------------------------
# The script: SIGKILL and resume, two processes, one-line errors

TEXT_PROMPTS = [f"a photo of thing number {i}" for i in range(8)]
SCRIPT_FLAGS = ["--height=32", "--width=32", "--steps=3", "--num_images=3", "--seed=11", f"--model={MODEL}"]


@pytest.fixture(scope="module")
def text_reference(pipe, tmp_path_factory):
    """The in-process run of the text prompts file with the script's flags (8 devices here, 1 in the scripts)."""
    folder = tmp_path_factory.mktemp("text")
    path = folder / "prompts.txt"
    path.write_text("\n".join(TEXT_PROMPTS) + "\n")
    defaults = {"height": 32, "width": 32, "steps": 3, "num_images": 3, "seed": 11}
    requests = batch_files.read_requests(path, defaults)
    batch.run_job(pipe, requests, folder / "out", model=MODEL, dtype="float32", show_progress=False)
    return path, folder / "out"


def _script(prompts, out, *extra):
    return ["scripts/generate_batch.py", f"--prompts_file={prompts}", f"--output_dir={out}", *SCRIPT_FLAGS, *extra]


def _popen(args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def test_sigkill_at_random_moments_then_the_same_command_finishes_bit_identically(text_reference, tmp_path):
    """Three SIGKILLs, each at a random moment after a random number of images landed (so some land mid-write),
    each followed by the same command; the last run finishes. Files and manifest equal the uninterrupted run's."""
    prompts, ref_out = text_reference
    out = tmp_path / "out"
    manifest = out / "manifest.jsonl"
    rng = np.random.default_rng(0)
    made = []
    for _ in range(3):
        wanted = len(_done_records(out)) + int(rng.integers(1, 5))
        delay = float(rng.uniform(0.0, 0.3))
        process = _popen(_script(prompts, out))
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if len(batch_files.read_manifest(manifest)) >= wanted:
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        process.wait()
        assert process.returncode == -signal.SIGKILL, "the job ended before it could be killed"
        made.append(len(_pngs(out)))
    assert made == sorted(made) and made[-1] < 24
    result = run_script(*_script(prompts, out))
    assert result.returncode == 0, result.stderr
    assert f"skipped {made[-1]} (already finished)" in result.stderr
    assert _pngs(out) == _pngs(ref_out)
    assert _done_records(out) == _done_records(ref_out)  # each image recorded exactly once
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_together_make_what_one_makes(text_reference, tmp_path):
    prompts, ref_out = text_reference
    out = tmp_path / "out"
    address = f"--coordinator_address=127.0.0.1:{_free_port()}"
    processes = [_popen(_script(prompts, out, address, "--num_processes=2", f"--process_id={i}")) for i in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    assert _pngs(out) == _pngs(ref_out)
    shares = [
        {(r["line"], r["index"]) for r in batch_files.read_manifest(out / batch_files.manifest_name(i, 2))}
        for i in range(2)
    ]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert sorted(shares[0] | shares[1]) == _done_records(ref_out)


def test_bad_lines_are_reported_recorded_and_skipped(tmp_path):
    _write_inputs(tmp_path)
    lines = [
        {"prompt": "a cat"},
        '{"prompt": "a dog", ',  # not JSON
        {"prompt": "a dog", "stepz": 3},  # unknown field
        {"prompt": "a dog", "guidance_rescale": 2.0},  # invalid value
        {"mode": "img2img", "prompt": "a dog", "init_image": "missing.png"},  # missing image
        {"prompt": "a fox", "seed": 4},
    ]
    prompts = _prompts_file(tmp_path, lines)
    out = tmp_path / "out"
    result = run_script(*_script(prompts, out))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert [w.split(f"{prompts}:")[1].split(":")[0] for w in warned] == ["2", "3", "4", "5"]
    assert "stepz" in warned[1] and "guidance_rescale" in warned[2] and "missing.png" in warned[3]
    assert sorted(_pngs(out)) == ["000001-000.png", "000001-001.png", "000001-002.png"] + [
        f"000006-00{i}.png" for i in range(3)
    ]
    failed = [r for r in batch_files.read_manifest(out / "manifest.jsonl") if r["status"] == "failed"]
    assert [r["line"] for r in failed] == [2, 3, 4, 5]


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("nothing", [], "prompts file not found"),
        ("latin1", [], "not UTF-8"),
        ("file_as_output", [], "is a file, not a folder"),
        ("good", ["--steps=0"], "steps must be a positive integer, got 0"),
        ("good", ["--sampler=nope"], "unknown sampler 'nope'"),
        ("all_bad", [], "stepz"),
    ],
)
def test_a_bad_file_or_flag_fails_in_one_line_before_the_model_loads(tmp_path, setup, args, message):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    if setup == "latin1":
        prompts.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    elif setup == "all_bad":
        prompts.write_text('{"prompt": "a", "stepz": 1}\n')
    elif setup != "nothing":
        prompts.write_text('{"prompt": "a cat"}\n')
    if setup == "file_as_output":
        out.write_text("not a folder")
    result = run_script(*_script(prompts, out, *args))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "random weights" not in result.stderr  # nothing loaded
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert out.is_file() if setup == "file_as_output" else not out.exists()


def test_settings_of_a_line_are_the_flags_then_the_line(tmp_path):
    lines = [{"prompt": "a cat", "steps": 5}, {"mode": "upscale", "prompt": "x", "init_image": "init.png"}]
    _write_inputs(tmp_path)
    requests = batch_files.read_requests(_prompts_file(tmp_path, lines), {**FLAG_DEFAULTS, "strength": None})
    assert requests[0].settings == GenerationSettings(prompt="a cat", height=32, width=32, steps=5)
    assert requests[1].settings == GenerationSettings(mode="upscale", prompt="x", steps=2)
