"""The canary pick: which version of an alias serves one call, for the registry's resolve (the registry has no
native part). The gateway and the worker pick with fovea/canary.h, through their fronts (the gateway's Python
too: gateway/fast_port.py canary_pick); tests/gateway/test_native_binding.py checks the two agree."""

from __future__ import annotations

import random

from fovea.v1 import model_pb2


def pick_version(alias: model_pb2.Alias) -> int:
    """A version from the alias's targets, chosen at random by weight (a canary split). Weights are whole
    percentages summing to 100 (the registry's SetAlias refuses others), so a 0% target is never picked."""
    if len(alias.targets) == 1:
        return alias.targets[0].version
    return random.choices([t.version for t in alias.targets], [t.weight for t in alias.targets])[0]
