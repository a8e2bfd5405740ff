"""End to end: sd_jax txt2img against diffusers' StableDiffusionPipeline on the same random weights and noise."""

import numpy as np
import pytest
import torch

import sd_jax
from tests.tiny_models import save_diffusers_pipeline, tiny_config

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk"]


@pytest.fixture(scope="module", params=["sd1", "sd2_v"])
def model_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    config = tiny_config(request.param)
    reference = save_diffusers_pipeline(config, folder)
    return request.param, reference, sd_jax.load(folder)


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_txt2img_matches_diffusers(model_pair, guidance_rescale):
    kind, reference, pipe = model_pair
    steps, height, width = 6, 64, 48
    latents = np.random.default_rng(0).standard_normal((2, 4, height // 8, width // 8)).astype(np.float32)
    kwargs = dict(
        negative_prompt=["blurry", ""],
        height=height,
        width=width,
        guidance_scale=7.5,
        guidance_rescale=guidance_rescale,
    )
    with torch.no_grad():
        expected = reference(
            PROMPTS, num_inference_steps=steps, latents=torch.from_numpy(latents), output_type="np", **kwargs
        ).images
    ours = pipe.txt2img(PROMPTS, steps=steps, latents=latents, **kwargs)
    expected = (expected * 255).round().astype(np.uint8)
    ours = np.stack([np.asarray(im) for im in ours])
    diff = np.abs(ours.astype(int) - expected.astype(int))
    print(f"{kind}, guidance_rescale {guidance_rescale}:", end=" ")
    print(f"max abs pixel difference {diff.max()} / 255, mean {diff.mean():.4f}")
    # The loop runs in float32 on both sides; the images agree to float32 rounding, at most 2 levels of 255.
    assert diff.max() <= 2
    # And the images are not trivially flat, so the comparison means something.
    assert expected.std() > 10


TWINS = {
    "euler": ("EulerDiscreteScheduler", {}, "default"),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "karras"),
    "lms": ("LMSDiscreteScheduler", {}, "default"),
    "dpm2": ("KDPM2DiscreteScheduler", {}, "default"),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}, "default"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "default"),
}


@pytest.mark.parametrize("sampler", sorted(TWINS))
def test_other_samplers_match_their_diffusers_twins(model_pair, sampler):
    import diffusers

    kind, reference, pipe = model_pair
    cls, extra, schedule = TWINS[sampler]
    reference.scheduler = getattr(diffusers, cls).from_config(dict(pipe.config.scheduler), **extra)
    latents = np.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(np.float32)
    kwargs = dict(height=32, width=32, guidance_scale=5.0)
    with torch.no_grad():
        expected = reference(
            "a lighthouse", num_inference_steps=5, latents=torch.from_numpy(latents), output_type="np", **kwargs
        ).images
    ours = pipe.txt2img("a lighthouse", steps=5, latents=latents, sampler=sampler, schedule=schedule, **kwargs)
    diff = np.abs(np.asarray(ours[0]).astype(int) - (expected[0] * 255).round().astype(int))
    print(f"{kind} {sampler} ({schedule}): max abs pixel difference {diff.max()} / 255")
    assert diff.max() <= 2


def test_image_i_uses_seed_plus_i(model_pair):
    _, _, pipe = model_pair
    kwargs = dict(height=32, width=32, steps=3)
    batch = pipe.txt2img("a cat", seed=10, num_images=3, **kwargs)
    alone = pipe.txt2img("a cat", seed=12, num_images=1, **kwargs)
    np.testing.assert_array_equal(np.asarray(batch[2]), np.asarray(alone[0]))
    assert np.abs(np.asarray(batch[0], float) - np.asarray(batch[1], float)).max() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=60), "multiples of 8"),
        (dict(steps=0), "steps must be"),
        (dict(sampler="nope"), "unknown sampler"),
        (dict(num_images=0), "num_images"),
        (dict(seed=-1), "seed must be"),
        (dict(latents=np.zeros((1, 4, 3, 3), np.float32)), "latents must have shape"),
        (dict(negative_prompt=["a", "b"]), "negative prompts"),
    ],
)
def test_bad_arguments(model_pair, kwargs, message):
    _, _, pipe = model_pair
    with pytest.raises(ValueError, match=message):
        pipe.txt2img("a cat", **{"height": 32, "width": 32, "steps": 2, **kwargs})


@pytest.mark.parametrize("devices", [1, 2])
def test_same_images_on_any_device_count(model_pair, devices):
    import jax

    from sd_jax import parallel
    from sd_jax.pipeline import StableDiffusionPipeline

    _, _, pipe = model_pair
    assert len(jax.devices()) == 8, "tests/conftest.py forces 8 CPU devices"
    assert pipe.mesh.size == 8
    fewer = StableDiffusionPipeline(
        pipe.config, pipe.states, pipe.tokenizer, mesh=parallel.batch_mesh(jax.devices()[:devices])
    )
    # eta > 0: the sampler's own noise must follow the image, not the device, too.
    kwargs = dict(height=32, width=32, steps=3, num_images=5, seed=3, eta=1.0)
    eight = [np.asarray(im) for im in pipe.txt2img("a cat", **kwargs)]
    few = [np.asarray(im) for im in fewer.txt2img("a cat", **kwargs)]
    np.testing.assert_array_equal(np.stack(eight), np.stack(few))


def test_batch_of_eight_equals_images_alone(model_pair):
    _, _, pipe = model_pair
    kwargs = dict(height=32, width=32, steps=3, eta=1.0)
    batch = pipe.txt2img(["a cat", "a dog"], num_images=4, seed=20, **kwargs)
    for i in (0, 5, 7):
        prompt = "a cat" if i < 4 else "a dog"
        alone = pipe.txt2img(prompt, num_images=1, seed=20 + i, **kwargs)[0]
        np.testing.assert_array_equal(np.asarray(batch[i]), np.asarray(alone))


def test_steps_guidance_and_eta_do_not_recompile(model_pair):
    _, _, pipe = model_pair
    kwargs = dict(height=32, width=32, seed=1)
    pipe.txt2img("a cat", steps=3, **kwargs)
    compiled = pipe.program.compiled_count()
    pipe.txt2img("a cat", steps=5, guidance_scale=3.0, **kwargs)
    pipe.txt2img("a cat", steps=4, guidance_scale=1.0, eta=0.5, **kwargs)
    pipe.txt2img("a cat", steps=4, guidance_scale=5.0, guidance_rescale=0.5, **kwargs)
    pipe.txt2img("a cat", steps=9, schedule="karras", **kwargs)
    assert pipe.program.compiled_count() == compiled


def test_progress_reports_each_step_once_per_call_from_two_threads(model_pair):
    """The callback fires once per sampler step of the first device's images (not once per device), and two calls
    running at once from two threads each hear only their own steps."""
    import threading

    kind, _, pipe = model_pair
    if kind != "sd1":
        pytest.skip("the reporting does not depend on the model; one keeps the compile time down")
    assert pipe.mesh.size == 8
    kwargs = dict(height=32, width=32, seed=1)
    heard = {"three": [], "ten": []}
    results = {}

    def call(name, steps, num_images):
        def report(done, total):
            heard[name].append((done, total))

        results[name] = pipe.txt2img("a cat", steps=steps, num_images=num_images, progress=report, **kwargs)

    threads = [
        threading.Thread(target=call, args=("three", 3, 3)),  # device 0 runs one image: 3 steps
        threading.Thread(target=call, args=("ten", 4, 10)),  # padded to 16: device 0 runs two images, 8 steps
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert heard["three"] == [(i, 3) for i in range(1, 4)]
    assert heard["ten"] == [(i, 8) for i in range(1, 9)]
    quiet = pipe.txt2img("a cat", steps=4, num_images=10, **kwargs)
    for a, b in zip(results["ten"], quiet, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
