"""`<lora:NAME:WEIGHT>` tags, the `loras` setting and LoRA folders: parsing and resolving, no model needed."""

import pytest

from sd_jax.infotext import format_infotext, parse_hashes, settings_from_infotext
from sd_jax.lora import LoRAError
from sd_jax.lora.library import LoRALibrary
from sd_jax.lora.tags import LoRAUse, extract, merge, parse_tag
from sd_jax.settings import GenerationSettings, parse_lora_entry


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a cat <lora:style:0.8>", ("a cat ", [LoRAUse("style", 0.8, 0.8)])),
        ("<lora:style>, a cat", (", a cat", [LoRAUse("style", 1.0, 1.0)])),
        ("a <lora:x:0.5:1.2> b <lyco:y:te=0.3:unet=0.7>", ("a  b ", [LoRAUse("x", 0.5, 1.2), LoRAUse("y", 0.3, 0.7)])),
        ("<lora:x:unet=0>", ("", [LoRAUse("x", 1.0, 0.0)])),
        ("(a <lora:x:-1>:1.2)", ("(a :1.2)", [LoRAUse("x", -1.0, -1.0)])),
        ("no tags <here>", ("no tags <here>", [])),
    ],
)
def test_tags_leave_the_prompt_with_their_weights(text, expected):
    assert extract(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("<hypernet:x:1>", "no 'hypernet' extra networks"),
        ("<lora:x:heavy>", "'heavy' is not a weight"),
        ("<lora:x:1:1:8>", "a fourth argument is not supported"),
        ("<lora:x:dyn=8>", "argument dyn= is not supported"),
        ("<lora::1>", "no LoRA name"),
        ("<lora:x:inf>", "not finite"),
    ],
)
def test_bad_tags_are_one_line_errors(text, message):
    with pytest.raises(ValueError, match=message):
        extract(text)


def test_a_name_given_twice_keeps_its_last_weights_once():
    uses = merge([LoRAUse("a", 1, 1), LoRAUse("b", 1, 1), LoRAUse("a", 0.5, 0.5)])
    assert uses == (LoRAUse("b", 1, 1), LoRAUse("a", 0.5, 0.5))
    assert parse_tag("lora", "a:0.5:0.25") == LoRAUse("a", 0.5, 0.25)
    assert LoRAUse("a", 0.5, 0.25).tag() == "<lora:a:0.5:0.25>"
    assert LoRAUse("a", 1.0, 1.0).tag() == "<lora:a:1>"


def test_loras_setting_takes_strings_pairs_and_triples():
    settings = GenerationSettings(prompt="x", loras=["a:0.5", ("b", 2), ["c"], ("d", 1, 0)]).validate()
    assert settings.loras == (("a", 0.5, 0.5), ("b", 2, 2), ("c", 1.0, 1.0), ("d", 1, 0))
    assert GenerationSettings.from_json(settings.to_json()) == settings
    assert parse_lora_entry("C:/loras/x.safetensors:0.7") == ("C:/loras/x.safetensors", 0.7, 0.7)
    assert parse_lora_entry("a:b") == ("a:b", 1.0, 1.0)
    for bad in ([("a", "heavy")], [("", 1)], [("a", float("nan"))], ["a", 3]):
        with pytest.raises(ValueError, match="loras entries"):
            GenerationSettings(prompt="x", loras=bad).validate()


def test_library_resolves_names_paths_and_reports_missing_and_ambiguous(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "style.safetensors").write_bytes(b"")
    (tmp_path / "sub" / "other.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    library = LoRALibrary(tmp_path)
    assert library.resolve("style") == tmp_path / "style.safetensors"
    assert library.resolve("other") == tmp_path / "sub" / "other.pt"
    assert library.resolve(str(tmp_path / "style.safetensors")) == tmp_path / "style.safetensors"
    assert library.resolve("sub/other.pt") == tmp_path / "sub" / "other.pt"
    with pytest.raises(LoRAError, match=f"no LoRA file named 'notes' in {tmp_path}"):
        library.resolve("notes")
    (tmp_path / "sub" / "style.pt").write_bytes(b"")  # found afresh: two files of one name
    with pytest.raises(LoRAError, match="several files are named 'style'"):
        library.resolve("style")
    with pytest.raises(LoRAError, match="no LoRA file named 'style' \\(no --lora_dir given\\)"):
        LoRALibrary(None).resolve("style")
    with pytest.raises(LoRAError, match="no such folder"):
        LoRALibrary(tmp_path / "missing")


def test_hashes_round_trip_through_the_infotext():
    settings = {
        "prompt": "a cat <lora:style:0.8>",
        "steps": 20,
        "seed": 3,
        "lora_hashes": {"style": "0123456789ab", "b": "ba9876543210"},
        "ti_hashes": {"emb": "aaaabbbbcccc"},
    }
    text = format_infotext(settings)
    assert 'Lora hashes: "style: 0123456789ab, b: ba9876543210", TI hashes: "emb: aaaabbbbcccc"' in text
    parsed = settings_from_infotext(text)
    assert parsed["prompt"] == "a cat <lora:style:0.8>"
    assert parsed["lora_hashes"] == settings["lora_hashes"] and parsed["ti_hashes"] == settings["ti_hashes"]
    assert parse_hashes("a: 1, broken, c:d: 2") == {"a": "1", "c:d": "2"}


def test_png_lora_names_missing_from_the_folder_are_found_by_hash(tmp_path):
    from sd_jax.cli import rename_loras_by_hash
    from sd_jax.lora import short_hash
    from tests.test_lora import kohya_dict, random_pairs, save
    from tests.tiny_models import tiny_config

    save(tmp_path / "renamed.safetensors", kohya_dict(random_pairs(tiny_config("sd1"), 3, 0.5)))
    (tmp_path / "kept.pt").write_bytes(b"")
    digest = short_hash(tmp_path / "renamed.safetensors")
    stored = {"prompt": "a <lora:original:0.8> b <lora:kept:1> <lora:gone>", "negative_prompt": "<lyco:original>"}
    hashes = {"original": digest, "kept": "000000000000", "gone": "111111111111"}
    renamed = rename_loras_by_hash(stored, hashes, str(tmp_path))
    assert renamed["prompt"] == "a <lora:renamed:0.8> b <lora:kept:1> <lora:gone>"
    assert renamed["negative_prompt"] == "<lyco:renamed>"
