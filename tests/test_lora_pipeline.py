"""LoRAs and embeddings through the pipeline and the scripts: `<lora:NAME:W>` tags, `loras=`, folders, PNG hashes.

The weights themselves are checked against diffusers in tests/test_lora.py and tests/test_embeddings.py; here the
wiring: a tag is the same request as `loras=`, leaves the prompt text, lasts one request, and is named in the PNG.
"""

import jax
import numpy as np
import pytest
from PIL import Image

import sd_jax
from sd_jax import infotext, parallel
from sd_jax.embeddings import short_hash as ti_hash
from sd_jax.lora import LoRAError, short_hash
from sd_jax.settings import GenerationSettings
from tests.test_convert import run_script
from tests.test_embeddings import random_vectors, save_a1111_pt
from tests.test_lora import kohya_dict, random_pairs, save
from tests.tiny_models import tiny_config

RUN = dict(height=32, width=32, steps=2, seed=5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("networks")
    (root / "loras" / "styles").mkdir(parents=True)
    (root / "embeddings").mkdir()
    save(root / "loras" / "styles" / "style.safetensors", kohya_dict(random_pairs(tiny_config("sd1"), 3, 0.5)))
    save(root / "loras" / "other.safetensors", kohya_dict(random_pairs(tiny_config("sd1"), 4, 0.5)))
    width = tiny_config("sd1").text_encoder.hidden_size
    save_a1111_pt(root / "embeddings" / "shiny.pt", random_vectors(2, width, seed=1) * 4)
    return root


@pytest.fixture(scope="module")
def pipe(folders):
    return sd_jax.load(
        "random:tiny",
        mesh=parallel.batch_mesh(jax.devices()[:1]),
        lora_dir=folders / "loras",
        embeddings_dir=folders / "embeddings",
    )


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, np.int16) for image in images])


@pytest.fixture(scope="module")
def base(pipe):
    return pixels(pipe.txt2img("a photo of a cat", **RUN))


def test_a_tag_is_loras_and_lasts_one_request(pipe, base):
    tagged = pixels(pipe.txt2img("a photo of a cat <lora:style:0.8>", **RUN))
    assert np.abs(tagged - base).mean() > 5  # the LoRA matters
    np.testing.assert_array_equal(pixels(pipe.txt2img("a photo of a cat", loras=[("style", 0.8)], **RUN)), tagged)
    np.testing.assert_array_equal(pixels(pipe.txt2img("a photo of a cat", **RUN)), base)  # base weights are back
    # Weight 0 changes nothing, so the tag's text never reached the text encoder.
    np.testing.assert_array_equal(pixels(pipe.txt2img("a photo of a cat<lora:style:0>", **RUN)), base)
    # Per component: the U-Net's part alone is neither the base nor the whole.
    unet_only = pixels(pipe.txt2img("a photo of a cat <lora:style:0:0.8>", **RUN))
    assert np.abs(unet_only - base).mean() > 1 and np.abs(unet_only - tagged).mean() > 1
    # Tags in the negative prompt apply too; a file given by path is the same file.
    path = str(pipe.loras.resolve("style"))
    np.testing.assert_array_equal(
        pixels(pipe.txt2img("a photo of a cat", negative_prompt=f"<lora:{path}:0.8>", **RUN)), tagged
    )


def test_stacked_loras_differ_from_each_alone(pipe, base):
    both = pixels(pipe.txt2img("a photo of a cat <lora:style:0.8> <lora:other:0.5>", **RUN))
    style = pixels(pipe.txt2img("a photo of a cat <lora:style:0.8>", **RUN))
    assert np.abs(both - style).mean() > 1 and np.abs(both - base).mean() > 1


def test_request_errors_before_sampling(pipe):
    with pytest.raises(LoRAError, match="no LoRA file named 'missing'"):
        pipe.txt2img("a cat <lora:missing:1>", **RUN)
    with pytest.raises(ValueError, match="name different <lora:...> tags"):
        pipe.txt2img(["a cat <lora:style:1>", "a dog"], **RUN)
    with pytest.raises(ValueError, match="no 'hypernet' extra networks"):
        pipe.txt2img("a cat <hypernet:x:1>", **RUN)


def test_requests_of_different_loras_never_share_a_call(pipe):
    keys = [pipe.group_key(GenerationSettings(prompt=p, **RUN)) for p in ("a", "b <lora:style:1>", "c <lora:style:1>")]
    assert keys[0] != keys[1] and keys[1] == keys[2]


def test_png_text_names_the_loras_and_embeddings_by_hash(pipe, folders):
    settings = GenerationSettings(
        prompt="a shiny cat <lora:style:0.8>", negative_prompt="blurry", loras=[("other", 0.5)], **RUN
    )
    images = pipe.generate(settings)
    texts = infotext.image_texts(pipe, settings, images, [5], model="random:tiny", dtype="float32")[0]
    parameters = infotext.parse_infotext(texts[infotext.PARAMETERS_KEY])
    # The web UI's prompt carries the `loras` entries as tags, so it makes the same image there.
    assert parameters["prompt"] == "a shiny cat <lora:style:0.8> <lora:other:0.5>"
    style, other = (short_hash(folders / "loras" / n) for n in ("styles/style.safetensors", "other.safetensors"))
    assert parameters["parameters"]["Lora hashes"] == f"other: {other}, style: {style}"
    assert parameters["parameters"]["TI hashes"] == f"shiny: {ti_hash(folders / 'embeddings' / 'shiny.pt')}"
    stored = GenerationSettings.from_json(
        {k: v for k, v in infotext.json.loads(texts[infotext.SETTINGS_KEY]).items() if k in settings.to_json()}
    )
    assert stored.loras == (("other", 0.5, 0.5),)


def test_script_uses_the_folders_and_checks_names_before_loading(folders, tmp_path):
    common = [
        "scripts/txt2img.py",
        "--model=random:tiny",
        "--height=32",
        "--width=32",
        "--steps=2",
        "--num_images=2",
        "--seed=7",
        f"--output_dir={tmp_path}",
        f"--lora_dir={folders / 'loras'}",
    ]
    missing = run_script(*common, "--prompt=a cat <lora:nope:1>")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"error: <lora:nope>: no LoRA file named 'nope' in {folders / 'loras'}" in missing.stderr
    assert "random weights" not in missing.stderr  # before the model loads
    made = run_script(*common, "--prompt=a cat <lora:style:0.8>", "--loras=other:0.5")
    assert made.returncode == 0, made.stderr
    text = Image.open(made.stdout.split()[0]).text[infotext.PARAMETERS_KEY]
    assert "<lora:style:0.8> <lora:other:0.5>" in text and "Lora hashes:" in text
