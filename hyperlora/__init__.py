"""HyperLoRA: continual learning on pretrained ViTs with one hypernetwork that emits every task's LoRA.

Importing this package registers the ``HYPERLORA`` PEFT type: a process that loads a saved HyperLoRA adapter with
``PeftModel.from_pretrained`` must ``import hyperlora`` first (otherwise peft raises ``KeyError: 'HYPERLORA'``).
"""

from ._peft_registration import register as _register
from .config import HyperLoraConfig
from .hypernet import HyperNetwork
from .layer import HyperLoraLayer
from .model import HyperLoraModel

_register()

__all__ = ["HyperLoraConfig", "HyperLoraLayer", "HyperLoraModel", "HyperNetwork"]
__version__ = "0.1.0"
