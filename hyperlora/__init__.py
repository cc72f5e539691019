"""HyperLoRA: continual learning on pretrained ViTs with one hypernetwork that emits every task's LoRA.

Importing this package registers the ``HYPERLORA`` PEFT type: a process that loads a saved HyperLoRA adapter with
``PeftModel.from_pretrained`` must ``import hyperlora`` first (otherwise peft raises ``KeyError: 'HYPERLORA'``).

Layout: ``tuner`` is the PEFT adapter alone; ``method`` the continual-learning method (transferability, H-embedding,
losses, router); ``training`` the trainer that runs it over a task sequence; ``evaluation`` metrics, frozen baselines
and plots; ``data`` tasks, the benchmark protocol and the structured sequences; ``hub`` task embeddings on the Hub.
"""

from .tuner import HyperLoraConfig, HyperLoraLayer, HyperLoraModel, HyperNetwork

__all__ = ["HyperLoraConfig", "HyperLoraLayer", "HyperLoraModel", "HyperNetwork"]
__version__ = "0.1.0"
