"""The model card of a saved HyperLoRA adapter: PEFT's card, completed with the ``hyperlora`` tag, the base model and
how to load it (``import hyperlora`` first, or PEFT does not know the type)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .model import tuned_model

README_FILE = "README.md"

_ADAPTER_START, _ADAPTER_END = "<!-- hyperlora-adapter -->", "<!-- /hyperlora-adapter -->"


def write_adapter_card(model: nn.Module, folder: str | os.PathLike[str], source: str, fresh: bool) -> None:
    """Complete the card PEFT wrote into ``folder`` for a HyperLoRA adapter (a PeftModel): the ``hyperlora`` tag, the
    base model when known (``base_model_name_or_path``, a transformers model's name), and how to load it, from
    ``source``, with ``import hyperlora`` first.

    A ``fresh`` card (PEFT's empty template) becomes HyperLoRA's own; a card someone wrote keeps its text and gets
    the loading section, replaced on every save.
    """
    from huggingface_hub import ModelCard

    path = Path(folder) / README_FILE
    card = ModelCard.load(path)
    tuner = tuned_model(model)
    config = tuner.peft_config[tuner.active_adapters[0]]
    base = config.base_model_name_or_path or card.data.base_model  # PEFT's card knows a transformers model's
    tags = set(card.data.tags or []) | {"hyperlora", "continual-learning"}
    card.data.library_name = "peft"
    if base:
        card.data.base_model = base
        tags.add(f"base_model:adapter:{base}")
    card.data.tags = sorted(tags)
    targets = sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
    section = (
        f"{_ADAPTER_START}\n# HyperLoRA adapter\n\n"
        f"One hypernetwork that generates the LoRA weights (rank {config.r}) of every task, {tuner.hypernet.num_tasks} "
        f"so far, each from a small task embedding, for the modules {targets}. PEFT knows this adapter type only "
        "once `hyperlora` is imported; without it, `PeftModel.from_pretrained` raises `KeyError: 'HYPERLORA'`.\n\n"
        "```python\nimport hyperlora  # noqa: F401  (registers the HYPERLORA type with PEFT)\n"
        "from peft import PeftModel\n\n\n"
        "def load(base_model):\n"
        f'    """base_model: the model the adapter was trained on{f" ({base})" if base else ""}."""\n'
        f"    return PeftModel.from_pretrained(base_model, {source!r})\n```\n\n"
        "`model.set_task(i)` selects task i; `model(x, task_ids=ids)` runs one task per sample.\n"
        f"{_ADAPTER_END}"
    )
    heading = "### Framework versions"  # what PEFT's card adds to its template
    start, end = card.text.find(_ADAPTER_START), card.text.find(_ADAPTER_END)
    if fresh:
        card.text = f"{section}\n\n{card.text[card.text.index(heading) :] if heading in card.text else ''}"
    elif 0 <= start < end:
        card.text = card.text[:start] + section + card.text[end + len(_ADAPTER_END) :]
    else:
        card.text = f"{card.text.rstrip()}\n\n{section}\n"
    card.save(path)
