"""HyperLoraConfig: the adapter's shape and every switch of the continual-learning method."""

from __future__ import annotations

import json
import math
import re
from dataclasses import InitVar, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import safetensors
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from ..files import check_sha256, sha256, umask

PEFT_TYPE = "HYPERLORA"

Normalisation = Literal["ahp", "minmax", "none"]
EmbeddingInit = Literal["h_embedding", "random"]
Router = Literal["gaussian", "entropy"]
HScoreFeatures = Literal["lda", "head", "pooled"]
InheritFrom = Literal["related", "best"]

_CHOICES = {
    "h_score_features": get_args(HScoreFeatures),
    "normalisation": get_args(Normalisation),
    "embedding_init": get_args(EmbeddingInit),
    "router": get_args(Router),
    "inherit_from": get_args(InheritFrom),
}
_POSITIVE_INTS = (
    "r",
    "task_embedding_dim",
    "module_embedding_dim",
    "hypernet_hidden_dim",
    "hypernet_num_layers",
    "h_score_samples",
    "h_score_adapted_samples",
    "h_score_finalists",
    "h_score_screen_samples",
    "reg_max_tasks",
    "relatedness_pooled_dims",
)
_NON_NEGATIVE_FLOATS = ("beta_reg", "beta_emb_slope", "router_shrinkage", "relatedness_confidence")
_NUMBERS = ("lora_alpha", "lora_dropout", *_NON_NEGATIVE_FLOATS)
_BOOLS = (
    "h_score_shrinkage",
    "relatedness_pooled",
    "head_projection",
    "free_pace",
    "inherit_in_free_part",
    "inference_mode",
)
_MODULE_LISTS = ("target_modules", "exclude_modules", "modules_to_save")
# adapter_config.json key (not a field) with the SHA-256 of the weights file(s) saved next to it.
CHECKSUM_KEY = "weights_sha256"


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
    hypernet_hidden_dim: int = field(default=64, metadata={"help": "Width of the hypernetwork trunk."})
    hypernet_num_layers: int = field(default=2, metadata={"help": "Depth of the hypernetwork trunk."})

    # Continual-learning method (read by hyperlora.ContinualTrainer).
    h_score_features: HScoreFeatures = field(
        default="head",
        metadata={
            "help": "What each old task's H-score reads: head (its head's logits under its adapter), lda (frozen "
            "features times its LDA directions: cheaper, blind to the old tasks' models) or pooled (pooled features "
            "under its adapter; saturates)."
        },
    )
    h_score_samples: int = field(default=1000, metadata={"help": "n_max samples used for the H-scores."})
    h_score_adapted_samples: int = field(
        default=128,
        metadata={
            "help": "Of those, the samples run through every old task's adapter (head, pooled): their cost is this "
            "times the old tasks, through the adapted blocks only."
        },
    )
    h_score_finalists: int = field(
        default=8,
        metadata={
            "help": "With more old tasks than this, head and pooled screen them all on h_score_screen_samples images "
            "and read only this many, the best screened, on the rest: the others count as the frozen backbone in their "
            "place (unrelated). Bounds the estimator's cost, as reg_max_tasks bounds the regulariser's."
        },
    )
    h_score_screen_samples: int = field(
        default=32, metadata={"help": "The images every old task is screened on (h_score_finalists)."}
    )
    h_score_shrinkage: bool = field(default=True, metadata={"help": "Ledoit-Wolf H_alpha (True) or plain."})
    h_score_resamples: int = field(
        default=50, metadata={"help": "Bootstrap resamples that tell AHP which H-score gaps are noise (0: none)."}
    )
    relatedness_confidence: float = field(
        default=0.95,
        metadata={
            "help": "An old task is related to the new one, and its target distance halves so that the new task "
            "starts near it, when it beats the frozen backbone's score beyond the noise, with this confidence for "
            "all m old tasks together: in 1 - (1 - confidence) / m of the resamples (h_score_features head or "
            "pooled; lda has no such reference). Above 1: never."
        },
    )
    relatedness_pooled: bool = field(
        default=True,
        metadata={
            "help": "With h_score_features head, an old task counts as related only where its adapted pooled "
            "features also beat the frozen backbone's pooled features (their H-scores, with the same confidence): "
            "the question that starting from it answers. The old head's read of the frozen features, the head's own "
            "reference, is easy to beat: old heads that transfer nothing beat it in every resample."
        },
    )
    relatedness_pooled_dims: int = field(
        default=16,
        metadata={
            "help": "relatedness_pooled compares the pooled features in this many leading principal directions of "
            "the frozen features (all of them where they have fewer): on h_score_adapted_samples images, enough "
            "samples per dimension for the comparison to have power; in all 768-1280 dimensions Ledoit-Wolf "
            "shrinks both sides alike and a helpful adapter rarely wins every resample."
        },
    )
    normalisation: Normalisation = field(default="ahp", metadata={"help": "ahp | minmax | none."})
    h_embedding_steps: int = field(default=500, metadata={"help": "Adam steps of the H-embedding fit."})
    embedding_init: EmbeddingInit = field(
        default="h_embedding", metadata={"help": "Start e_t at the H-embedding or at random."}
    )
    head_projection: bool = field(
        default=True,
        metadata={
            "help": "Project every update of the hypernet's heads onto the null space of the old tasks' hidden "
            "activations, so that training a task leaves the old tasks' generated weights as they were."
        },
    )
    free_pace: bool = field(
        default=False,
        metadata={
            "help": "Scale each head's free part so that the new task's weights move at a LoRA's pace however much of "
            "its activation lies in the protected directions (a task started near an old one overlaps them most)."
        },
    )
    inherit_from: InheritFrom = field(
        default="best",
        metadata={
            "help": "Start near the top-ranked related old task only (best) or near every related one (related): "
            "where related scores tie within the noise, 'related' starts among them and inherits their average."
        },
    )
    inherit_in_free_part: bool = field(
        default=True,
        metadata={
            "help": "A task that starts near a related old task trains only its embedding and the heads' free part, at "
            "a LoRA's pace, with the hypernet's trunk and module embeddings fixed: the old tasks it inherits from "
            "cannot move."
        },
    )
    beta_reg: float = field(default=0.05, metadata={"help": "Weight of the hypernet output regulariser."})
    reg_max_tasks: int = field(default=8, metadata={"help": "Old tasks sampled per step by the regulariser."})
    beta_emb_slope: float = field(default=0.05, metadata={"help": "beta_emb(t) = min(1, slope * t)."})
    router: Router = field(default="gaussian", metadata={"help": "Class-incremental router: gaussian | entropy."})
    router_shrinkage: float = field(default=0.1, metadata={"help": "Shrinkage of the router's covariance."})
    # Read from adapter_config.json by from_pretrained and checked there; an InitVar, so never part of to_dict().
    weights_sha256: InitVar[dict[str, str] | None] = None

    def __post_init__(self, weights_sha256: dict[str, str] | None) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        sums_ok = isinstance(weights_sha256, dict) and all(
            name in _WEIGHTS_FILES and isinstance(digest, str) for name, digest in weights_sha256.items()
        )
        if not (weights_sha256 is None or sums_ok):  # only PEFT's own file names: nothing else is ever opened
            raise ValueError(f"{CHECKSUM_KEY} must map {_WEIGHTS_FILES} to SHA-256 digests, got {weights_sha256!r}")
        self._weights_sha256 = weights_sha256
        # Types first, each naming the field: values often come from a hand-edited adapter_config.json.
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"HyperLoraConfig.{name} must be a positive integer, got {value!r}")
        for name in ("h_embedding_steps", "h_score_resamples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"HyperLoraConfig.{name} must be an integer >= 0, got {value!r}")
        for name in _NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"HyperLoraConfig.{name} must be a finite number, got {value!r}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HyperLoraConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in _MODULE_LISTS:
            value = getattr(self, name)
            names_ok = isinstance(value, list | tuple | set) and all(isinstance(v, str) for v in value)
            if not (value is None or names_ok or (isinstance(value, str) and name != "modules_to_save")):
                raise ValueError(f"HyperLoraConfig.{name} must be None or a list of module names, got {value!r}")
            if isinstance(value, str):  # one string is a regex (PEFT's reading): a broken one fails here, by name
                try:
                    re.compile(value)
                except re.error as error:
                    raise ValueError(f"HyperLoraConfig.{name} {value!r} is not a valid regex: {error}") from None
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

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Refuse unknown adapter_config.json keys: PEFT warns and drops them, which would load an adapter that
        behaves differently from the one that was saved."""
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)} - {CHECKSUM_KEY})
        if unknown:
            raise ValueError(
                f"{CONFIG_NAME} has keys HyperLoraConfig does not know: {unknown} "
                "(written by a newer hyperlora, or edited by hand)"
            )
        return kwargs

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's, plus the SHA-256 of the weights file that PeftModel.save_pretrained wrote just before, so that
        from_pretrained refuses a truncated or altered file by name instead of loading different weights."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        for name in _WEIGHTS_FILES:  # safetensors writes 0600: the umask's permissions, as for the other files
            if (folder / name).is_file():
                (folder / name).chmod(0o666 & ~umask())
        digests = {name: sha256(folder / name) for name in _WEIGHTS_FILES if (folder / name).is_file()}
        if digests:
            saved = json.loads((folder / CONFIG_NAME).read_text())
            saved[CHECKSUM_KEY] = digests
            (folder / CONFIG_NAME).write_text(json.dumps(saved, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> HyperLoraConfig:
        """PEFT's, plus a check of the weights file (PeftModel.from_pretrained reads the config first, and injects
        nothing before): against the recorded SHA-256, or, for a local adapter saved without one, that its
        safetensors header is whole. From the Hub, the recorded files are downloaded first, into the cache that
        PeftModel.from_pretrained then loads them from."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        digests = config._weights_sha256 or {}
        if not folder.is_dir() and digests:
            download_kwargs, _, _ = cls._split_kwargs(kwargs)
            for name in digests:
                try:
                    path = hf_hub_download(
                        str(pretrained_model_name_or_path), name, subfolder=subfolder, **download_kwargs
                    )
                except EntryNotFoundError:
                    raise FileNotFoundError(
                        f"{pretrained_model_name_or_path} has no {name}: its {CONFIG_NAME} was saved together with it"
                    ) from None
                folder = Path(path).parent
        if folder.is_dir():
            _check_weights(folder, digests)
        return config


_WEIGHTS_FILES = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)


def _check_weights(folder: Path, digests: dict[str, str]) -> None:
    check_sha256(folder, digests, CONFIG_NAME)
    path = folder / SAFETENSORS_WEIGHTS_NAME
    if SAFETENSORS_WEIGHTS_NAME not in digests and path.is_file():
        try:
            with safetensors.safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ValueError(f"{path} is truncated or corrupted: {exc}") from None


def differing_fields(saved: dict, config: HyperLoraConfig) -> list[str]:
    """HyperLoRA's own fields whose saved value (an adapter_config.json dict) differs from ``config``."""
    own = {f.name for f in fields(HyperLoraConfig)} - {f.name for f in fields(PeftConfig)}
    own |= {"target_modules", "exclude_modules", "modules_to_save"}

    def normalise(value):
        return sorted(value) if isinstance(value, list | set | tuple) else value

    return sorted(name for name in own if normalise(saved.get(name)) != normalise(getattr(config, name)))
