"""The absl scripts end to end on the tiny model (`--model=random:tiny`): outputs, no overwriting, one-line errors."""

from PIL import Image

from tests.test_convert import run_script


def test_txt2img_script_writes_new_pngs(tmp_path):
    out = tmp_path / "out"
    args = [
        "scripts/txt2img.py",
        "--model=random:tiny",
        "--prompt=a photo of a cat",
        "--height=32",
        "--width=32",
        "--steps=2",
        "--num_images=2",
        "--seed=7",
        f"--output_dir={out}",
    ]
    cache = tmp_path / "jax_cache"
    first = run_script(*args, env={"SD_JAX_COMPILE_CACHE": str(cache)})
    assert first.returncode == 0, first.stderr
    paths = first.stdout.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00000-7.png", "00001-8.png"]
    assert "random:tiny has random weights" in first.stderr
    # Outside a terminal the program has no per-step callback, so it is cached for the next process.
    assert "sampling: 2 image(s) in" in first.stderr
    assert [p for p in cache.iterdir() if p.name.startswith("jit_generate-")], sorted(p.name for p in cache.iterdir())
    assert Image.open(paths[0]).size == (32, 32)
    before = (out / "00000-7.png").read_bytes()
    second = run_script(*args, env={"SD_JAX_COMPILE_CACHE": str(cache)})
    assert second.returncode == 0, second.stderr
    assert [p.rsplit("/", 1)[-1] for p in second.stdout.split()] == ["00002-7.png", "00003-8.png"]
    assert (out / "00000-7.png").read_bytes() == before
    # The same seed gives the same image.
    assert (out / "00002-7.png").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".partial")]


def test_txt2img_script_bad_size_is_one_line(tmp_path):
    result = run_script("scripts/txt2img.py", "--prompt=x", "--height=60", f"--output_dir={tmp_path}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: height and width must be positive multiples of 8, got height=60"
    ]
    assert list(tmp_path.iterdir()) == []


def test_txt2img_script_missing_model(tmp_path):
    result = run_script("scripts/txt2img.py", "--prompt=x", f"--model={tmp_path / 'nope'}")
    assert result.returncode == 1
    assert "no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_list_samplers():
    from sd_jax.sampling.samplers import SAMPLERS

    result = run_script("scripts/txt2img.py", "--list_samplers")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line and not line.startswith("schedules")]
    assert {row[0] for row in rows} == set(SAMPLERS)
    assert {row[0]: int(row[1]) for row in rows} == {s.name: s.calls_per_step for s in SAMPLERS.values()}
