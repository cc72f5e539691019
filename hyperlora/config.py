"""HyperLoraConfig: the adapter's shape and every switch of the continual-learning method."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from peft import PeftConfig

PEFT_TYPE = "HYPERLORA"

Normalisation = Literal["ahp", "minmax", "none"]
EmbeddingInit = Literal["h_embedding", "random"]
Router = Literal["gaussian", "entropy"]

_CHOICES = {
    "normalisation": ("ahp", "minmax", "none"),
    "embedding_init": ("h_embedding", "random"),
    "router": ("gaussian", "entropy"),
}
_POSITIVE_INTS = (
    "r",
    "task_embedding_dim",
    "module_embedding_dim",
    "hypernet_hidden_dim",
    "hypernet_num_layers",
    "h_score_samples",
    "reg_max_tasks",
    "decoder_hidden_dim",
)
_NON_NEGATIVE_FLOATS = ("beta_reg", "beta_emb_slope", "router_shrinkage")


@dataclass
class HyperLoraConfig(PeftConfig):
    """Configuration of a HyperLoRA adapter.

    The first group of fields fixes what the hypernetwork emits (LoRA rank, scaling, embedding sizes); the second
    group fixes how the continual-learning trainer builds and uses task embeddings (ALGORITHM.md). Both are saved in
    ``adapter_config.json`` so that a set of task embeddings can be reproduced from its adapter alone.
    """

    r: int = field(default=8, metadata={"help": "Rank of every generated LoRA delta."})
    lora_alpha: float = field(default=16, metadata={"help": "Deltas are scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (suffixes) or a regex of the nn.Linear / 1x1 nn.Conv2d modules to adapt. "
            "None picks the ViT defaults for timm and transformers models."
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full (PEFT semantics)."}
    )
    task_embedding_dim: int = field(default=32, metadata={"help": "Size of each task embedding e_t."})
    module_embedding_dim: int = field(default=32, metadata={"help": "Size of each module embedding c_m."})
    hypernet_hidden_dim: int = field(default=256, metadata={"help": "Width of the hypernetwork trunk."})
    hypernet_num_layers: int = field(default=2, metadata={"help": "Depth of the hypernetwork trunk."})

    # Continual-learning method (read by hyperlora.ContinualTrainer).
    h_score_samples: int = field(default=1000, metadata={"help": "n_max samples used for the H-scores."})
    h_score_shrinkage: bool = field(default=True, metadata={"help": "Ledoit-Wolf H_alpha (True) or plain."})
    normalisation: Normalisation = field(default="ahp", metadata={"help": "ahp | minmax | none."})
    h_embedding_steps: int = field(default=2000, metadata={"help": "Adam steps of the H-embedding fit."})
    embedding_init: EmbeddingInit = field(
        default="h_embedding", metadata={"help": "Start e_t at the H-embedding or at random."}
    )
    beta_reg: float = field(default=0.05, metadata={"help": "Weight of the hypernet output regulariser."})
    reg_max_tasks: int = field(default=8, metadata={"help": "Old tasks sampled per step by the regulariser."})
    beta_emb_slope: float = field(default=0.05, metadata={"help": "beta_emb(t) = min(1, slope * t)."})
    decoder_hidden_dim: int = field(default=64, metadata={"help": "Width of the guidance decoder D."})
    router: Router = field(default="gaussian", metadata={"help": "Class-incremental router: gaussian | entropy."})
    router_shrinkage: float = field(default=0.1, metadata={"help": "Shrinkage of the router's covariance."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"HyperLoraConfig.{name} must be a positive integer, got {value!r}")
        if self.h_embedding_steps < 0:
            raise ValueError(f"HyperLoraConfig.h_embedding_steps must be >= 0, got {self.h_embedding_steps}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"HyperLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in _NON_NEGATIVE_FLOATS:
            if not getattr(self, name) >= 0:
                raise ValueError(f"HyperLoraConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.router_shrinkage <= 1.0:
            raise ValueError(f"HyperLoraConfig.router_shrinkage must be in [0, 1], got {self.router_shrinkage}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"HyperLoraConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if isinstance(self.target_modules, list | tuple):
            self.target_modules = set(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def differing_fields(saved: dict, config: HyperLoraConfig) -> list[str]:
    """HyperLoRA's own fields whose saved value (an adapter_config.json dict) differs from ``config``."""
    own = {f.name for f in fields(HyperLoraConfig)} - {f.name for f in fields(PeftConfig)}
    own |= {"target_modules", "exclude_modules", "modules_to_save"}

    def normalise(value):
        return sorted(value) if isinstance(value, list | set | tuple) else value

    return sorted(name for name in own if normalise(saved.get(name)) != normalise(getattr(config, name)))
