"""The canary pick: which version of an alias serves one call. The one Python copy (the gateway's routing and
the registry's resolve); the native parts' one copy, which both fronts call, is fovea/canary.h."""

from __future__ import annotations

import random

from fovea.v1 import model_pb2


def pick_version(alias: model_pb2.Alias) -> int:
    """A version from the alias's targets, chosen at random by weight (a canary split). Weights are whole
    percentages summing to 100 (the registry's SetAlias refuses others), so a 0% target is never picked."""
    if len(alias.targets) == 1:
        return alias.targets[0].version
    return random.choices([t.version for t in alias.targets], [t.weight for t in alias.targets])[0]
