"""Registers HYPERLORA as a PEFT type.

peft 0.21's ``register_peft_method`` accepts only members of its closed ``PeftType`` enum, so the three lookup tables
it would fill are filled here with the plain string key (``PeftType`` is a ``str`` enum, so string lookups of built-in
types are unaffected). This touches peft internals: ``tests/test_peft_integration.py`` fails loudly if they move.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import PEFT_TYPE, HyperLoraConfig
from .model import HyperLoraModel


def register() -> None:
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = HyperLoraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = HyperLoraModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = HyperLoraModel.prefix
