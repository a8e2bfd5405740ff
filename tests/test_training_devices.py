"""Training on one device, on four (data-parallel) and with FSDP gives the same parameters (its own file: its three
compiled training steps are the suite's longest test, and a file of its own lets the test workers share the load)."""

import jax
import numpy as np
import pytest

from sd_jax.training import Trainer
from tests.test_training import options, write_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "images")


def _final_params(trainer):
    state = trainer.run()
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_one_device_four_devices_and_fsdp_agree(tmp_path, images):
    """1 device vs 4 (data-parallel), and FSDP vs replicated on 4: the same parameters to float rounding. A large
    Adam epsilon keeps the update a smooth function of the gradient (else a rounding-level gradient flips sign)."""
    kw = dict(max_steps=2, adam_epsilon=1e-2, caption_dropout=0.5, random_flip=True)
    runs = {
        "1 device": (options(tmp_path / "a", images, **kw), jax.devices()[:1]),
        "4 devices": (options(tmp_path / "b", images, **kw), jax.devices()[:4]),
        "4 devices, fsdp": (options(tmp_path / "c", images, fsdp=True, **kw), jax.devices()[:4]),
    }
    params = {name: _final_params(Trainer(o, show_progress=False, devices=d)) for name, (o, d) in runs.items()}
    reference = params["1 device"]
    for name in ("4 devices", "4 devices, fsdp"):
        worst = 0.0
        for component in reference:
            for k, a in reference[component].items():
                scale = np.abs(a).max() + 1e-3
                worst = max(worst, np.abs(a - params[name][component][k]).max() / scale)
        print(f"{name} vs 1 device: max relative parameter difference {worst:.2e}")
        assert worst < 1e-5
