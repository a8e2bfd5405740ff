"""`sd_jax.batch_files`: prompts files become validated requests (errors name file and line), output names and the
manifest survive a kill, and processes split the images without overlap. No model, no JAX."""

import json
import os
from pathlib import Path

import pytest

from sd_jax.batch_files import (
    ImageJob,
    Manifest,
    Request,
    clean_temporary,
    expand,
    finished_images,
    image_name,
    image_record,
    manifest_name,
    read_manifest,
    read_requests,
    resume_state,
    split_for_process,
    temporary_name,
)
from sd_jax.settings import GenerationSettings

# What a batch script's flags give: fields of every mode, strength None (each mode's own default).
DEFAULTS = {"prompt": None, "steps": 12, "seed": 5, "guidance_scale": 6.0, "strength": None, "scale": 3.0}


def _write(path: Path, lines) -> Path:
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return path


def _touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not opened")
    return str(path.resolve())


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(ValueError) as e:
        read_requests(path, DEFAULTS, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


# -- reading ----------------------------------------------------------------------------------------------------


def test_text_file_skips_comments_and_blank_lines(tmp_path):
    path = _write(tmp_path / "prompts.txt", ["# a comment", "a red circle", "", "   ", "  a blue square  ", "  # too"])
    requests = read_requests(path, DEFAULTS)
    assert [r.line for r in requests] == [2, 5]
    assert [r.settings.prompt for r in requests] == ["a red circle", "a blue square"]
    for r in requests:
        assert r.settings.mode == "txt2img"
        assert (r.settings.steps, r.settings.seed, r.settings.guidance_scale) == (12, 5, 6.0)
        assert r.settings.sampler == "ddim"  # not in the defaults: the field's own
        assert r.init_image is None and r.mask is None


def test_text_file_in_an_image_mode_takes_the_argument_images(tmp_path, monkeypatch):
    init = _touch(tmp_path / "in" / "photo.png")
    mask = _touch(tmp_path / "in" / "mask.png")
    monkeypatch.chdir(tmp_path / "in")  # arguments are relative to the working folder
    path = _write(tmp_path / "prompts.txt", ["a cat"])
    (request,) = read_requests(path, DEFAULTS, default_mode="inpaint", init_image="photo.png", mask="mask.png")
    assert (request.init_image, request.mask) == (init, mask)
    assert request.settings.strength is None  # a None default leaves the mode's default
    with pytest.raises(ValueError, match=r"prompts.txt: mask given, but img2img takes none"):
        read_requests(path, DEFAULTS, default_mode="img2img", init_image="photo.png", mask="mask.png")


def test_jsonl_mixed_modes_paths_and_overrides(tmp_path):
    init = _touch(tmp_path / "jobs" / "images" / "cat.png")
    mask = _touch(tmp_path / "jobs" / "images" / "cat-mask.png")
    elsewhere = _touch(tmp_path / "elsewhere" / "dog.png")
    path = _write(
        tmp_path / "jobs" / "prompts.jsonl",
        [
            {"prompt": "a red circle", "steps": 30},
            "# comment",
            {"mode": "img2img", "prompt": ["a cat", "a dog"], "init_image": "images/cat.png", "strength": 0.4},
            {"mode": "inpaint", "prompt": "a hat", "init_image": "images/cat.png", "mask": "images/cat-mask.png"},
            {"mode": "upscale", "prompt": "sharp", "init_image": elsewhere},
        ],
    )
    defaults = {**DEFAULTS, "strength": 0.5, "prompt": "unused"}
    r1, r3, r4, r5 = read_requests(path, defaults)
    assert [r.line for r in (r1, r3, r4, r5)] == [1, 3, 4, 5]
    assert (r1.settings.mode, r1.settings.steps, r1.settings.seed) == ("txt2img", 30, 5)
    assert r1.settings.strength is None  # txt2img takes no strength: the default is ignored, not an error
    assert r3.settings.prompt == ("a cat", "a dog") and r3.settings.strength == 0.4
    assert r3.settings.steps == 12 and r3.init_image == init and r3.mask is None
    assert (r4.settings.mode, r4.settings.strength, r4.init_image, r4.mask) == ("inpaint", 0.5, init, mask)
    assert (r5.settings.scale, r5.settings.strength, r5.init_image) == (3.0, 0.5, elsewhere)


def test_jsonl_line_without_prompt_takes_the_default_prompt(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"seed": 9}])
    (request,) = read_requests(path, {**DEFAULTS, "prompt": "a tree"})
    assert (request.settings.prompt, request.settings.seed) == ("a tree", 9)
    assert "p.jsonl:1: no prompt" in _error(path)


def test_jsonl_argument_images_apply_only_to_modes_that_take_them(tmp_path):
    init = _touch(tmp_path / "photo.png")
    path = _write(tmp_path / "p.jsonl", [{"prompt": "a"}, {"mode": "img2img", "prompt": "b"}])
    r1, r2 = read_requests(path, DEFAULTS, init_image=init)
    assert (r1.init_image, r2.init_image) == (None, init)


OUTPAINT = {"mode": "outpaint", "prompt": "a", "left": 8, "init_image": "in.png"}


@pytest.mark.parametrize(
    "lines, expected",
    [
        (["", "# ok", {"prompt": "a", "stepz": 3}], "p.jsonl:3: txt2img takes no 'stepz'"),
        ([{"prompt": "a"}, '{"prompt": "b",'], "p.jsonl:2: not valid JSON ("),
        (['"just a string"'], "p.jsonl:1: a line must be a JSON object, got str"),
        ([{"prompt": "a", "steps": 0}], "p.jsonl:1: steps must be a positive integer, got 0"),
        ([{"prompt": "a", "strength": 0.5}], "p.jsonl:1: txt2img takes no 'strength'"),
        ([{"prompt": "a", "sampler": ["ddim"]}], "p.jsonl:1: "),  # a TypeError inside validation, wrapped
        ([{"mode": "paint", "prompt": "a"}], "p.jsonl:1: unknown mode 'paint'"),
        ([{"prompt": "a", "init_image": "x.png"}], "p.jsonl:1: txt2img takes no init_image"),
        ([{"mode": "img2img", "prompt": "a"}], "p.jsonl:1: img2img needs an init image"),
        ([{"mode": "img2img", "prompt": "a", "init_image": "gone.png"}], "p.jsonl:1: init_image not found: "),
        ([{"mode": "inpaint", "prompt": "a", "init_image": "in.png"}], "p.jsonl:1: inpaint needs a mask"),
        ([{**OUTPAINT, "mask": "in.png"}], "p.jsonl:1: outpaint takes no mask"),
        ([{"mode": "img2img", "prompt": "a", "init_image": 3}], "p.jsonl:1: init_image must be a path, got 3"),
        (["# nothing", "", "  "], "p.jsonl: no requests"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, expected):
    _touch(tmp_path / "in.png")
    assert expected in _error(_write(tmp_path / "p.jsonl", lines))


def test_text_file_errors(tmp_path):
    path = _write(tmp_path / "p.txt", ["# c", "a"])
    with pytest.raises(ValueError) as e:
        read_requests(path, {**DEFAULTS, "seed": -1})
    assert str(e.value).startswith(f"{path}:2: seed must be")
    path.write_bytes(b"fine\n\xff broken\n")
    assert "p.txt:2: not UTF-8 text" in _error(path)
    with pytest.raises(FileNotFoundError, match="prompts file not found: .*missing.txt"):
        read_requests(tmp_path / "missing.txt", DEFAULTS)


def test_image_seeds_are_prompt_major(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": ["a", "b"], "negative_prompt": ["na", "nb"], "num_images": 2}])
    (request,) = read_requests(path, DEFAULTS)
    assert request.num_images_total == 4
    assert request.image_seeds() == [5, 6, 7, 8]
    jobs = expand([request])
    assert [(j.index, j.seed, j.prompt, j.negative_prompt) for j in jobs] == [
        (0, 5, "a", "na"),
        (1, 6, "a", "na"),
        (2, 7, "b", "nb"),
        (3, 8, "b", "nb"),
    ]
    one = jobs[2].settings
    assert (one.prompt, one.negative_prompt, one.seed, one.num_images) == ("b", "nb", 7, 1)
    assert one.validate() is one


# -- names and the manifest -------------------------------------------------------------------------------------


def test_names():
    assert image_name(7, 2) == "000007-002.png"
    assert sorted([image_name(10, 0), image_name(9, 11), image_name(9, 2)]) == [
        image_name(9, 2),
        image_name(9, 11),
        image_name(10, 0),
    ]
    assert manifest_name(0, 1) == "manifest.jsonl"
    assert manifest_name(3, 8) == "manifest-00003-of-00008.jsonl"
    assert len({manifest_name(p, 4) for p in range(4)}) == 4
    temporary = temporary_name("000007-002.png")
    assert temporary.startswith(".") and temporary != "000007-002.png"


def _jobs(tmp_path, lines=({"prompt": ["a", "b"], "num_images": 2}, {"prompt": "c"})) -> list[ImageJob]:
    return expand(read_requests(_write(tmp_path / "p.jsonl", list(lines)), DEFAULTS))


def test_manifest_survives_a_torn_last_line(tmp_path):
    jobs = _jobs(tmp_path)
    path = tmp_path / "manifest.jsonl"
    with Manifest(path) as manifest:
        manifest.append(image_record(jobs[0], "done", 1.23456))
        manifest.append(image_record(jobs[1], "failed", 0.5, "out of memory\nat step 3"))
    with open(path, "ab") as f:
        f.write(b'{"line": 1, "index": 2, "sta')  # a kill mid-record
    records = read_manifest(path)
    assert [(r["line"], r["index"], r["status"]) for r in records] == [(1, 0, "done"), (1, 1, "failed")]
    assert records[0]["seconds"] == 1.235 and records[0]["file"] == "000001-000.png"
    assert records[0]["settings"] == jobs[0].request.settings.to_json() and "error" not in records[0]
    assert records[1]["error"] == "out of memory at step 3"

    with Manifest(path) as manifest:
        manifest.append(image_record(jobs[2], "done", 2.0))
    records = read_manifest(path)
    assert [(r["line"], r["index"]) for r in records] == [(1, 0), (1, 1), (1, 2)]
    assert path.read_bytes().endswith(b"\n")
    assert read_manifest(tmp_path / "none.jsonl") == []
    with pytest.raises(ValueError, match="unknown status"):
        image_record(jobs[0], "finished", 1.0)


def test_resume_state(tmp_path):
    jobs = _jobs(tmp_path)  # line 1: indices 0-3; line 2: index 0
    out = tmp_path / "out"
    out.mkdir()
    with Manifest(out / manifest_name(0, 1)) as manifest:
        for job in jobs[:3]:
            manifest.append(image_record(job, "done", 1.0))
    (out / jobs[0].name).write_bytes(b"png")
    (out / jobs[2].name).write_bytes(b"png")
    # jobs[1]: recorded done, but its file is gone -> redone.
    (out / jobs[3].name).write_bytes(b"png")  # renamed, then killed before the record
    temporary = out / temporary_name(jobs[4].name)
    temporary.write_bytes(b"half a png")
    other = out / ".000099-000.png.tmp-1"  # another process's image, being written
    other.write_bytes(b"")
    (out / "notes.txt").write_text("kept")

    assert finished_images(out, read_manifest(out / "manifest.jsonl")) == {(1, 0), (1, 2)}
    done, unrecorded = resume_state(out, jobs, out / "manifest.jsonl")
    assert done == {(1, 0), (1, 2), (1, 3)}
    assert unrecorded == [(1, 3)]
    assert resume_state(out, [jobs[0].request], None) == (done, unrecorded)  # a Request: all its images
    assert resume_state(out, jobs[3:], None) == ({(1, 3)}, [(1, 3)])  # only the images asked about

    assert clean_temporary(out, [job.name for job in jobs]) == [temporary.name]
    assert not temporary.exists() and other.exists() and (out / "notes.txt").exists()
    assert clean_temporary(out) == [other.name]
    assert sorted(os.listdir(out)) == sorted([jobs[0].name, jobs[2].name, jobs[3].name, "manifest.jsonl", "notes.txt"])
    assert clean_temporary(tmp_path / "missing") == []
    assert resume_state(tmp_path / "missing", jobs) == (set(), [])


def test_resume_reads_the_manifests_of_another_process_count(tmp_path):
    jobs = _jobs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with Manifest(out / manifest_name(1, 2)) as manifest:
        manifest.append(image_record(jobs[4], "done", 1.0))
    (out / jobs[4].name).write_bytes(b"png")
    assert resume_state(out, jobs, out / manifest_name(0, 3)) == ({(2, 0)}, [])


# -- splitting --------------------------------------------------------------------------------------------------


def _requests_of_sizes(sizes) -> list[Request]:
    return [
        Request(line, GenerationSettings(prompt="p", height=h, width=64, num_images=n, seed=line).validate())
        for line, (h, n) in enumerate(sizes, start=1)
    ]


@pytest.mark.parametrize("num_processes", [1, 2, 3, 4])
def test_split_covers_every_job_once(num_processes):
    jobs = expand(_requests_of_sizes([(64, 3), (128, 1), (64, 2), (96, 1), (128, 4), (96, 1), (64, 1)]))
    key = lambda job: job.request.settings.height  # noqa: E731
    shares = [split_for_process(jobs, p, num_processes, key=key) for p in range(num_processes)]
    names = [job.name for share in shares for job in share]
    assert sorted(names) == sorted(job.name for job in jobs) and len(names) == len(set(names))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for p, share in enumerate(shares):
        assert split_for_process(list(jobs), p, num_processes, key=key) == share  # deterministic
        heights = [key(job) for job in share]
        # group by group, groups in order of first appearance
        assert heights == sorted(heights, key=[64, 128, 96].index)


def test_split_spreads_many_small_groups():
    jobs = expand(_requests_of_sizes([(64 + 8 * i, 1) for i in range(8)]))  # eight shapes, one image each
    shares = [split_for_process(jobs, p, 4, key=lambda job: job.request.settings.height) for p in range(4)]
    assert [len(share) for share in shares] == [2, 2, 2, 2]
    assert split_for_process([1, 2, 3, 4, 5], 1, 2) == [2, 4]  # no key: one group
    with pytest.raises(ValueError, match="process_id"):
        split_for_process(jobs, 4, 4)
    with pytest.raises(ValueError, match="num_processes"):
        split_for_process(jobs, 0, 0)
