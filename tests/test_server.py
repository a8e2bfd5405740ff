"""The HTTP server against a live instance on 127.0.0.1: AUTOMATIC1111's routes and bodies, pixels equal to the
Python API's, concurrent clients sharing device batches, bad requests, interrupt, auth and the body limit."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

from PIL import Image  # noqa: E402

import sd_jax  # noqa: E402
from sd_jax import checkpoint  # noqa: E402
from sd_jax.loading import random_model  # noqa: E402
from sd_jax.models import random_components  # noqa: E402
from sd_jax.server import a1111  # noqa: E402
from sd_jax.server.a1111 import FieldError  # noqa: E402
from tests.serving import tiny_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = {"width": 32, "height": 32}


def quiet(done: int, total: int) -> None:
    """A progress callback: the server's calls report progress, so the Python API's references pass one to run
    the same executable (a second compile of each program otherwise)."""


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A --models_dir with one model, `other`: the tiny preset with other random weights (seed 1)."""
    folder = tmp_path_factory.mktemp("models")
    config, _, tokenizer = random_model("tiny")
    checkpoint.save_converted(folder / "other", config, random_components(config, seed=1), tokenizer)
    return folder


@pytest.fixture(scope="module")
def served(models_dir):
    with tiny_server(models_dir=models_dir) as (server, worker, pipe):
        yield server, worker, pipe


def post(server, route: str, body: dict, **kwargs):
    return requests.post(f"{server.url}/sdapi/v1/{route}", json=body, timeout=300, **kwargs)


def get(server, route: str, **kwargs):
    return requests.get(f"{server.url}/sdapi/v1/{route}", timeout=60, **kwargs)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def checkered(size=(40, 32)) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Generation: the Python API's pixels


def test_txt2img_equals_the_python_api(served):
    server, worker, pipe = served
    body = {
        "prompt": "a lighthouse at dusk, (oil painting:1.2)",
        "negative_prompt": "blurry",
        "seed": 1234,
        "steps": 3,
        "cfg_scale": 7,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "batch_size": 2,
        "n_iter": 1,
        "override_settings": {"CLIP_stop_at_last_layers": 2},
        "override_settings_restore_afterwards": True,
        "send_images": True,
        "save_images": False,
        **SIZE,
    }
    response = post(server, "txt2img", body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert set(data) == {"images", "parameters", "info"}
    expected = pipe.txt2img(
        body["prompt"],
        negative_prompt="blurry",
        seed=1234,
        steps=3,
        guidance_scale=7.0,
        sampler="dpmpp_2m",
        schedule="karras",
        num_images=2,
        clip_skip=2,
        progress=quiet,
        **SIZE,
    )
    assert len(data["images"]) == 2
    for got, want in zip(data["images"], expected, strict=True):
        np.testing.assert_array_equal(pixels(got), np.asarray(want))
    info = json.loads(data["info"])
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234
    assert info["sampler_name"] == "DPM++ 2M" and info["clip_skip"] == 2 and info["steps"] == 3
    assert info["extra_generation_params"] == {"Schedule type": "Karras"}
    assert "Seed: 1235" in info["infotexts"][1] and "Clip skip: 2" in info["infotexts"][1]
    assert info["all_prompts"] == [body["prompt"]] * 2 and info["negative_prompt"] == "blurry"
    # The PNGs carry their infotext, as AUTOMATIC1111's do; `parameters` echoes the request with its defaults.
    assert Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).text["parameters"] == info["infotexts"][0]
    assert data["parameters"]["sampler_index"] == "Euler" and data["parameters"]["seed"] == 1234


def test_txt2img_defaults_are_automatic1111s(served):
    # The wiki's minimal body: Euler (sampler_index's default) on the model's own schedule, cfg 7, a random seed;
    # send_images false returns none.
    server, _, pipe = served
    data = post(server, "txt2img", {"prompt": "maltese puppy", "steps": 2, **SIZE}).json()
    info = json.loads(data["info"])
    assert info["sampler_name"] == "Euler" and info["cfg_scale"] == 7.0 and 0 <= info["seed"] < 2**32
    expected = pipe.txt2img(
        "maltese puppy", steps=2, seed=info["seed"], guidance_scale=7.0, sampler="euler", progress=quiet, **SIZE
    )
    np.testing.assert_array_equal(pixels(data["images"][0]), np.asarray(expected[0]))
    silent = post(server, "txt2img", {"prompt": "x", "steps": 1, "send_images": False, **SIZE}).json()
    assert silent["images"] == [] and len(json.loads(silent["info"])["infotexts"]) == 1


def test_hires_fix_is_txt2img_then_upscale(served):
    # AUTOMATIC1111's hires fix: each first-pass image resized by hr_scale (Lanczos: sd_jax's upscale mode) and
    # redrawn at denoising_strength for hr_second_pass_steps, with its own seed; info reports the first pass's size.
    server, _, pipe = served
    body = {"prompt": "a tower", "seed": 21, "steps": 3, "sampler_name": "Euler", "batch_size": 2, **SIZE}
    body |= {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_second_pass_steps": 2}
    response = post(server, "txt2img", body)
    assert response.status_code == 200, response.text
    first = pipe.txt2img("a tower", seed=21, steps=3, sampler="euler", num_images=2, guidance_scale=7.0, **SIZE)
    for i, got in enumerate(response.json()["images"]):
        want = pipe.upscale(
            "a tower", first[i], scale=1.5, strength=0.5, steps=2, seed=21 + i, sampler="euler", guidance_scale=7.0
        )[0]
        assert pixels(got).shape == (48, 48, 3)
        np.testing.assert_array_equal(pixels(got), np.asarray(want))
    info = json.loads(response.json()["info"])
    assert (info["width"], info["height"]) == (32, 32) and info["all_seeds"] == [21, 22]
    assert info["extra_generation_params"]["Hires upscale"] == 1.5 and "Hires upscale: 1.5" in info["infotexts"][0]


def test_img2img_and_inpainting_equal_the_python_api(served):
    server, _, pipe = served
    image = checkered()
    mask = np.zeros((32, 40), np.uint8)
    mask[8:20, 10:30] = 255
    common = {"prompt": "a red hat", "steps": 4, "seed": 7, "sampler_name": "Euler a", "denoising_strength": 0.6}
    python = dict(steps=4, seed=7, sampler="euler_a", strength=0.6, guidance_scale=7.0, progress=quiet)

    # img2img: the wiki's body; the image is resized to width x height (resize_mode 0).
    body = {**common, "init_images": ["data:image/png;base64," + png_b64(image)], "width": 32, "height": 24}
    got = pixels(post(server, "img2img", body).json()["images"][0])
    np.testing.assert_array_equal(got, np.asarray(pipe.img2img("a red hat", image, width=32, height=24, **python)[0]))

    # Inpainting, "whole picture": the image and mask resized to width x height, the mask's blur and fill.
    body = {
        **common,
        "init_images": [png_b64(image)],
        "mask": png_b64(Image.fromarray(mask)),
        "mask_blur": 2,
        "inpainting_fill": 1,
        "inpaint_full_res": False,
        "inpainting_mask_invert": 0,
        "resize_mode": 0,
        "include_init_images": False,
        "width": 40,
        "height": 32,
    }
    response = post(server, "img2img", body)
    assert response.status_code == 200, response.text
    want = pipe.inpaint("a red hat", image, mask, mask_blur=2.0, fill="original", **python)[0]
    np.testing.assert_array_equal(pixels(response.json()["images"][0]), np.asarray(want))
    assert response.json()["parameters"]["init_images"] is None

    # "Only masked" (the API's default) with padding, at width x height, pasted back at the image's size; fill 0
    # is AUTOMATIC1111's "fill"; an inverted mask repaints the rest.
    body.update(inpaint_full_res=True, inpaint_full_res_padding=4, inpainting_fill=0)
    body.update(inpainting_mask_invert=1, mask=png_b64(Image.fromarray(255 - mask)))
    response = post(server, "img2img", body)
    assert response.status_code == 200, response.text
    want = pipe.inpaint(
        "a red hat", image, mask, mask_blur=2.0, fill="fill", only_masked=True, padding=4, width=40, height=32, **python
    )[0]
    got = pixels(response.json()["images"][0])
    assert got.shape == (32, 40, 3)
    np.testing.assert_array_equal(got, np.asarray(want))
    info = json.loads(response.json()["info"])
    assert info["extra_generation_params"]["Masked content"] == "fill"
    assert info["extra_generation_params"]["Inpaint area"] == "Only masked"


# ---------------------------------------------------------------------------------------------------------------
# Lists, options, models


def test_samplers_schedulers_and_models(served, models_dir):
    server, worker, _ = served
    samplers = get(server, "samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "Euler", "DDIM", "DPM++ 2M", "DPM++ 2M SDE", "UniPC"} <= set(names) and len(names) == 13
    assert {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}} in samplers
    schedulers = get(server, "schedulers").json()
    assert {s["name"] for s in schedulers} == {"automatic", "uniform", "karras", "exponential", "sgm_uniform", "ddim"}
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in schedulers)
    models = get(server, "sd-models").json()
    assert [m["model_name"] for m in models] == ["random:tiny", "other"]
    other = models[1]
    assert other["title"] == f"other [{other['hash']}]" and len(other["hash"]) == 10
    assert other["filename"] == "other"  # a name, never a path of the server's
    assert not any(str(models_dir) in json.dumps(m) for m in models)


def test_options_switch_models_by_name_only(served):
    server, worker, _ = served
    options = get(server, "options").json()
    assert options["sd_model_checkpoint"] == "random:tiny" and options["CLIP_stop_at_last_layers"] == 1.0
    for bad in ("/etc/passwd", "../other", str(worker.store.models_dir / "other"), "nothing"):
        response = post(server, "options", {"sd_model_checkpoint": bad})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
    assert post(server, "options", {"no_such_option": 1}).status_code == 422
    assert post(server, "options", {"samples_format": "jpg"}).status_code == 422
    body = {"prompt": "a cat", "steps": 2, "seed": 3, **SIZE}
    before = pixels(post(server, "txt2img", body).json()["images"][0])

    assert post(server, "options", {"sd_model_checkpoint": "other"}).json() is None
    options = get(server, "options").json()
    assert options["sd_model_checkpoint"].startswith("other [")
    data = post(server, "txt2img", body).json()
    after = pixels(data["images"][0])
    assert json.loads(data["info"])["sd_model_name"] == "other"
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 10  # other weights, other pixels
    # A request may name the model for itself (override_settings), as AUTOMATIC1111's clients do.
    again = post(server, "txt2img", {**body, "override_settings": {"sd_model_checkpoint": "random:tiny"}}).json()
    np.testing.assert_array_equal(pixels(again["images"][0]), before)
    assert post(server, "options", {"sd_model_checkpoint": "random:tiny", "CLIP_stop_at_last_layers": 1}).ok
    assert get(server, "options").json()["sd_model_checkpoint"] == "random:tiny"


def test_png_info_reads_a_generated_image(served):
    server, _, _ = served
    data = post(
        server, "txt2img", {"prompt": "a (red:1.2) circle", "negative_prompt": "dull", "steps": 2, "seed": 9, **SIZE}
    )
    info = post(server, "png-info", {"image": data.json()["images"][0]}).json()
    assert info["info"] == json.loads(data.json()["info"])["infotexts"][0]
    params = info["parameters"]
    assert params["Prompt"] == "a (red:1.2) circle" and params["Negative prompt"] == "dull"
    assert params["Steps"] == "2" and params["Seed"] == "9" and params["Size-1"] == "32" and params["Size-2"] == "32"
    assert json.loads(info["items"]["sd_jax"])["seed"] == 9  # sd_jax's own settings chunk
    plain = post(server, "png-info", {"image": png_b64(checkered())}).json()
    assert plain["info"] == "" and plain["parameters"]["Prompt"] == ""


# ---------------------------------------------------------------------------------------------------------------
# Bad requests


BAD = [
    ("txt2img", {"width": 30}, "width"),
    ("txt2img", {"height": 0}, "height"),
    ("txt2img", {"steps": 0}, "steps"),
    ("txt2img", {"steps": 100000}, "steps"),
    ("txt2img", {"steps": "many"}, "steps"),
    ("txt2img", {"batch_size": 64}, "batch_size"),
    ("txt2img", {"sampler_name": "Euler b"}, "sampler_name"),
    ("txt2img", {"scheduler": "beta"}, "scheduler"),
    ("txt2img", {"seed": 2**40}, "seed"),
    ("txt2img", {"restore_faces": True}, "restore_faces"),
    ("txt2img", {"enable_hr": True}, "denoising_strength"),
    ("txt2img", {"enable_hr": True, "denoising_strength": 0.5, "hr_upscaler": "Latent"}, "hr_upscaler"),
    ("txt2img", {"enable_hr": True, "denoising_strength": 0.5, "hr_scale": 200}, "hr_scale"),
    ("txt2img", {"cfg_scale": "high"}, "cfg_scale"),
    ("img2img", {}, "init_images"),
    ("img2img", {"init_images": ["not base64!"]}, "init_images"),
    ("img2img", {"init_images": ["aGVsbG8="]}, "init_images"),  # base64 of text, not an image
    ("img2img", {"init_images": ["/etc/passwd"]}, "init_images"),
    ("img2img", {"init_images": ["http://127.0.0.1/x.png"]}, "init_images"),
    ("img2img", {"init_images": ["IMAGE"], "mask": "@@@"}, "mask"),
    ("img2img", {"init_images": ["IMAGE"], "denoising_strength": 2}, "denoising_strength"),
    ("img2img", {"init_images": ["IMAGE"], "inpainting_fill": 7, "mask": "MASK"}, "inpainting_fill"),
]


@pytest.mark.parametrize("route,fields,field", BAD, ids=[f"{r}-{f}" for r, _, f in BAD])
def test_bad_requests_name_the_field(served, route, fields, field):
    server, _, _ = served
    body = {"prompt": "x", "steps": 2, **SIZE, **fields}
    image = png_b64(checkered((32, 32)))
    if body.get("init_images") == ["IMAGE"]:
        body["init_images"] = [image]
    if body.get("mask") == "MASK":
        body["mask"] = png_b64(Image.new("L", (32, 32), 255))
    response = post(server, route, body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["detail"][0]["loc"] == ["body", field] and error["error"].startswith(field)


def test_oversize_image_and_body_limit(tmp_path):
    big = png_b64(Image.new("RGB", (300, 300)))
    with tiny_server(max_body=200_000, limits=a1111.Limits(max_image_pixels=250 * 250)) as (server, _, _):
        response = post(server, "img2img", {"prompt": "x", "init_images": [big], **SIZE})
        assert response.status_code == 422 and "300x300" in response.json()["error"]
        response = post(server, "png-info", {"image": "A" * 300_000})
        assert response.status_code == 413 and "200000 bytes" in response.json()["error"]

        def chunks():  # no Content-Length: the limit holds for a streamed body too
            for _ in range(30):
                yield b"A" * 10_000

        response = requests.post(f"{server.url}/sdapi/v1/png-info", data=chunks(), timeout=60)
        assert response.status_code == 413
        assert get(server, "samplers").ok  # and the server goes on


# ---------------------------------------------------------------------------------------------------------------
# Concurrency, progress, interrupt


def test_sixteen_clients_share_batches_and_get_their_own_images(served):
    server, worker, pipe = served
    prompts = ["a red circle", "a blue square", "a green triangle", "(a cat:1.3) on a [mat]"]
    base = 5000
    # Client c's request r: prompt r, seed base + 16 r + c. The Python API makes each prompt's 16 images at once.
    expected = {}
    for r, prompt in enumerate(prompts):
        for half in (0, 8):  # calls of 8 images, as the server's
            images = pipe.txt2img(
                prompt,
                seed=base + 16 * r + half,
                num_images=8,
                steps=2,
                sampler="euler",
                guidance_scale=7.0,
                progress=quiet,
                **SIZE,
            )
            for c, image in enumerate(images):
                expected[(half + c, r)] = np.asarray(image)
    calls_before, images_before = worker.calls, worker.images
    bad_answers = []
    stop = threading.Event()

    def client(c: int) -> list:
        session = requests.Session()
        out = []
        for r, prompt in enumerate(prompts):
            body = {"prompt": prompt, "seed": base + 16 * r + c, "steps": 2, "sampler_name": "Euler", **SIZE}
            response = session.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=600)
            out.append((c, r, response.status_code, response.json()))
        return out

    def bad_client() -> None:  # bad requests all along: each is answered 422, and the others keep getting images
        session = requests.Session()
        while not stop.is_set():
            bad = session.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 33}, timeout=60)
            bad_answers.append(bad.status_code)

    with ThreadPoolExecutor(20) as pool:
        bad = [pool.submit(bad_client) for _ in range(2)]
        results = [item for f in [pool.submit(client, c) for c in range(16)] for item in f.result()]
        stop.set()
        for f in bad:
            f.result()
    assert len(results) == 64
    for c, r, status, data in results:
        assert status == 200, data
        np.testing.assert_array_equal(pixels(data["images"][0]), expected[(c, r)])
        assert json.loads(data["info"])["seed"] == base + 16 * r + c
    assert bad_answers and set(bad_answers) == {422}
    # 64 one-image requests on 8 devices: calls of 8 images, shared among the clients' requests.
    assert worker.images - images_before == 64
    assert worker.calls - calls_before < 64


def test_progress_and_interrupt(served):
    server, worker, _ = served
    body = {"prompt": "a slow one", "steps": 150, "batch_size": 8, "n_iter": 2, "seed": 1, **SIZE}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, "txt2img", body)
        deadline = time.monotonic() + 300
        while True:
            state = get(server, "progress").json()
            if state["state"]["sampling_step"] > 0:
                break
            assert time.monotonic() < deadline and not running.done(), running.result().text if running.done() else ""
            time.sleep(0.05)
        assert 0 < state["progress"] < 1 and state["state"]["job_count"] == 2 and state["state"]["job"] == "txt2img"
        assert state["state"]["sampling_steps"] == 150 and state["eta_relative"] >= 0
        assert post(server, "interrupt", {}).json() == {}
        response = running.result(timeout=300)
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["interrupted"] and len(response.json()["images"]) < 16 and len(info["all_seeds"]) == 16
    # The next request is not interrupted.
    after = post(server, "txt2img", {"prompt": "x", "steps": 2, **SIZE})
    assert after.ok and len(after.json()["images"]) == 1
    assert get(server, "progress").json()["progress"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Auth


def test_auth_on_every_route():
    with tiny_server(auth={"alice": "s3cret", "bob": "hunter2"}) as (server, _, _):
        app_routes = server.app.routes
        paths = {(route.path, sorted(route.methods)[0]) for route in app_routes if hasattr(route, "methods")}
        assert ("/sdapi/v1/txt2img", "POST") in paths and ("/", "GET") in paths
        for path, method in paths:
            url = server.url + path
            for auth in (None, ("alice", "wrong"), ("mallory", "s3cret"), ("alice", "")):
                response = requests.request(method, url, auth=auth, json={}, timeout=60)
                assert response.status_code == 401, (path, auth)
                assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(server.url + "/sdapi/v1/samplers", auth=("bob", "hunter2"), timeout=60).ok
        assert requests.get(server.url + "/", auth=("alice", "s3cret"), timeout=60).ok


def test_parse_auth():
    from sd_jax.server.app import parse_auth

    assert parse_auth("a:b, c:d:e") == {"a": "b", "c": "d:e"}
    for bad in ("a", "a:", ":b", "a:b,"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth(bad)


# ---------------------------------------------------------------------------------------------------------------
# The translation (no server)


@pytest.mark.parametrize(
    "name,scheduler,expected",
    [
        ("Euler", None, ("euler", "default")),
        ("Euler a", "Automatic", ("euler_a", "default")),
        ("DPM++ 2M", None, ("dpmpp_2m", "karras")),  # its own default, as AUTOMATIC1111's "Automatic"
        ("DPM++ 2M", "uniform", ("dpmpp_2m", "default")),
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),  # the old names carry their schedule
        ("Euler Karras", None, ("euler", "karras")),
        ("DPM++ 2M SDE", "automatic", ("dpmpp_2m_sde", "exponential")),
        ("DDIM", "SGM Uniform", ("ddim", "default")),
        ("LMS", "exponential", ("lms", "exponential")),
    ],
)
def test_sampler_and_schedule(name, scheduler, expected):
    assert a1111.sampler_and_schedule(name, "Euler", scheduler) == expected


def test_decode_image_takes_base64_only():
    image = checkered((8, 8))
    data = png_b64(image)
    for form in (data, "data:image/png;base64," + data, data[:20] + "\n" + data[20:]):
        np.testing.assert_array_equal(np.asarray(a1111.decode_image(form, "f", 10_000)), np.asarray(image))
    for bad in (None, "", 3, "file:///etc/passwd", "./x.png", "https://example.com/x.png", "abc"):
        with pytest.raises(FieldError) as e:
            a1111.decode_image(bad, "init_images", 10_000)
        assert e.value.field == "init_images"
    with pytest.raises(FieldError, match="more than the server's 63 pixels"):
        a1111.decode_image(data, "init_images", 63)


# ---------------------------------------------------------------------------------------------------------------
# scripts/serve.py


def run_serve(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "XLA_FLAGS": ""},
    )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--api_auth=nopassword"], "error: --api_auth takes user:password"),
        (["--models_dir=/no/such/folder"], "error: --models_dir /no/such/folder: no such folder"),
        (["--model=/no/such/model"], "error: --model /no/such/model: no such file or folder"),
    ],
)
def test_serve_flag_errors(flags, message):
    result = run_serve("--nowatermark", *flags)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr and "loading" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# LoRAs: names of the server's folder only


def test_lora_tags_name_the_servers_files_only(tmp_path):
    from tests.test_lora import kohya_dict, random_pairs, save
    from tests.tiny_models import tiny_config

    (tmp_path / "loras").mkdir()
    save(tmp_path / "loras" / "style.safetensors", kohya_dict(random_pairs(tiny_config("sd1"), 3, 0.5)))
    outside = tmp_path / "outside.safetensors"
    save(outside, kohya_dict(random_pairs(tiny_config("sd1"), 3, 0.5)))
    pipe = sd_jax.load("random:tiny", lora_dir=tmp_path / "loras")
    with tiny_server(pipe) as (server, _, _):
        assert get(server, "loras").json() == [{"name": "style", "alias": "style", "path": "style", "metadata": {}}]
        body = {"prompt": "a cat <lora:style:0.8>", "steps": 2, "seed": 4, "sampler_name": "Euler", **SIZE}
        response = post(server, "txt2img", body)
        assert response.status_code == 200, response.text
        want = pipe.txt2img("a cat <lora:style:0.8>", steps=2, seed=4, sampler="euler", guidance_scale=7.0, **SIZE)
        np.testing.assert_array_equal(pixels(response.json()["images"][0]), np.asarray(want[0]))
        assert "Lora hashes" in json.loads(response.json()["info"])["infotexts"][0]
        for name in (str(outside), "../outside.safetensors", "nothing"):
            response = post(server, "txt2img", {**body, "prompt": f"a cat <lora:{name}:1>"})
            assert response.status_code == 422 and "no LoRA file named" in response.json()["error"], response.text
