"""Model identity follows what the model computes: peft adapters enabled, disabled, re-weighted or changed.

A LoRA's matrices are parameters whether the adapter is active or not, so a fingerprint of the weights
alone would let an inversion made with the LoRA active be reused with it disabled (or weighted 0).
"""
from __future__ import annotations

import pytest
import torch

from tokenflow.core.inversion import DDIMInverter
from tokenflow.core.video_inversion import invert_video
from tokenflow.models.loading import load_model
from tokenflow.storage.cache import InversionCache
from tokenflow.storage.video import Video

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def lora_model(cache_dir):
    """A private copy of the tiny model (the tests toggle its adapters) with a LoRA whose B is not zero."""
    peft = pytest.importorskip("peft")
    model = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir))
    plain = model.fingerprint
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.unet.add_adapter(peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    model.unet.eval()
    yield model, plain
    model.unet.enable_adapters()
    model.unet.set_adapters(["default"], weights=[1.0])


def _clip() -> Video:
    g = torch.Generator().manual_seed(0)
    return Video.from_tensor(torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, fps=10.0, source="random")


def _lora_layer(model):
    return next(m for m in model.unet.modules() if hasattr(m, "lora_B") and "default" in m.lora_B)


def test_fingerprint_follows_the_adapter_state(lora_model):
    model, plain = lora_model
    active = model.fingerprint
    assert active != plain  # the LoRA, added after loading, enters the fingerprint
    model.unet.disable_adapters()
    disabled = model.fingerprint
    model.unet.enable_adapters()
    assert model.fingerprint == active
    model.unet.set_adapters(["default"], weights=[0.0])
    zero = model.fingerprint
    model.unet.set_adapters(["default"], weights=[0.5])
    half = model.fingerprint
    model.unet.set_adapters(["default"], weights=[1.0])
    assert model.fingerprint == active
    assert len({plain, active, disabled, zero, half}) == 5


def test_toggling_adapters_does_not_read_the_weights_again(lora_model, monkeypatch):
    import tokenflow.models.fingerprint as fingerprint

    model, _ = lora_model
    active = model.fingerprint
    reads = []
    real = fingerprint.module_digest
    monkeypatch.setattr(fingerprint, "module_digest", lambda module: reads.append(module) or real(module))
    model.unet.disable_adapters()
    assert model.fingerprint != active and reads == []  # the adapter state alone: cheap
    model.unet.enable_adapters()
    assert model.fingerprint == active and reads == []
    weight = _lora_layer(model).lora_B["default"].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)  # another LoRA under the same name, at the same scale
    try:
        assert model.fingerprint != active and reads  # a weight written in place: the weights are read again
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert model.fingerprint == active  # the same bytes again


def test_inversion_cache_misses_when_the_adapter_is_disabled(lora_model, tmp_path):
    model, _ = lora_model
    cache, inverter, video = InversionCache(tmp_path / "cache"), DDIMInverter(n_steps=3, keep_steps=3), _clip()
    with_lora, hit = invert_video(model, video, inverter, "a wolf", cache, progress=False)
    assert not hit
    model.unet.disable_adapters()
    try:
        cached, hit = invert_video(model, video, inverter, "a wolf", cache, progress=False)
        assert not hit  # not the entry the active LoRA made
        uncached, _ = invert_video(model, video, inverter, "a wolf", None, progress=False)
        assert torch.equal(cached.latents, uncached.latents)
        assert float((cached.latents - with_lora.latents).abs().max()) > 1e-4  # the LoRA changes the inversion
        again, hit = invert_video(model, video, inverter, "a wolf", cache, progress=False)
        assert hit and torch.equal(again.latents, uncached.latents)
    finally:
        model.unet.enable_adapters()
    back, hit = invert_video(model, video, inverter, "a wolf", cache, progress=False)
    assert hit and torch.equal(back.latents, with_lora.latents)


def test_the_adapter_state_is_read_without_peft():
    """Duck-typed: a layer with peft's attributes counts, a model-level adapter method of the same name does not."""
    from tokenflow.models.fingerprint import adapter_state

    class Layer(torch.nn.Linear):
        def __init__(self):
            super().__init__(2, 2)
            self.active_adapters, self.scaling, self._disable_adapters, self.merged_adapters = ["a"], {"a": 2.0}, False, []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.merged_adapters = Layer(), []

        def active_adapters(self):  # diffusers' and transformers' mixins: methods, not layer state
            return ["a"]

        def disable_adapters(self):
            pass

    model = Model()
    assert adapter_state(model) == [["layer", ["a"], {"a": 2.0}, False, []]]
    model.layer.merged_adapters = ["a"]
    model.layer._disable_adapters = True
    assert adapter_state(model) == [["layer", ["a"], {"a": 2.0}, True, ["a"]]]
    assert adapter_state(torch.nn.Linear(2, 2)) == []
