"""The installed package is the source tree: every folder of sd_jax with an __init__.py is listed in setup.py (a
`pip install .` leaves out any other, which editable installs and the tests would not notice)."""

import ast

from tests.test_convert import ROOT


def test_setup_lists_every_subpackage():
    call = next(
        node
        for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    )
    listed = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "packages"))
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "sd_jax").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found <= set(listed), f"missing from setup.py's packages: {sorted(found - set(listed))}"
