"""The HYPERLORA PEFT tuner: a config, a layer that applies generated LoRA factors, the hypernetwork that generates
them, and the BaseTuner that wires them into a model. It knows nothing of the continual-learning method that trains
it (``hyperlora.method``, ``hyperlora.training``); importing it registers the type with PEFT."""

from .config import HyperLoraConfig
from .hypernet import HyperNetwork
from .layer import HyperLoraLayer
from .model import HyperLoraModel
from .registration import register

register()

__all__ = ["HyperLoraConfig", "HyperLoraLayer", "HyperLoraModel", "HyperNetwork"]
