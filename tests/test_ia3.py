"""(IA)^3 specifics: the adapter_config written for HF PEFT reads back to the same modules and feed-forward set.
(Init, counts, round trip, merge, PEFT loading for every method: test_contract.py.)"""

from __future__ import annotations

import copy

import pytest
from conftest import make

from peftcli.methods import build_method
from peftcli.methods.ia3 import IA3


@pytest.mark.parametrize("arch,opts", [("gpt2", {}), ("llama", {"layers_to_transform": [1]}), ("bert", {})])
def test_ia3_from_adapter_config_round_trip(arch, opts):
    model = make(arch)
    method = build_method({"name": "ia3", **opts})
    method.apply(model)
    cfg = method.adapter_config(model, None)
    again = build_method(IA3.from_adapter_config(cfg))
    again.apply(copy.deepcopy(make(arch)))
    assert again.wrapped == method.wrapped and again.feedforward == method.feedforward
    assert method.feedforward and set(method.feedforward) < set(method.wrapped)  # both kinds of scaling present
