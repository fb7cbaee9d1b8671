"""BitFit specifics: bias_modules narrows the trained biases and names the stored tensors.
(Init, counts, round trip, merge, the refusal on bias-free Llama: test_contract.py.)"""

from __future__ import annotations

from conftest import make, n_trainable

from peftcli.methods import build_method


def test_bitfit_bias_modules_narrows_and_names_tensors():
    model = make("gpt2")
    method = build_method({"name": "bitfit", "bias_modules": ["c_attn", "c_fc"]})
    method.apply(model)
    keys = sorted(method.state_dict(model))
    assert keys == [f"base_model.model.transformer.h.{i}.{m}.bias" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    assert n_trainable(model) == 2 * (3 * 32 + 4 * 32)
