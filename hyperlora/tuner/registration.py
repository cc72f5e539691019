"""Registers HYPERLORA as a PEFT type, names bad adapter_config.json files, and gives HyperLoRA adapters a card.

peft 0.21's ``register_peft_method`` accepts only members of its closed ``PeftType`` enum, so the three lookup tables
it would fill are filled here with the plain string key (``PeftType`` is a ``str`` enum, so string lookups of built-in
types are unaffected). PEFT reads every ``adapter_config.json`` with ``PeftConfigMixin.from_json_file`` before it
knows the type: that is wrapped so that a file that is not JSON is named in the error. ``PeftModel`` writes its card
in ``create_or_update_model_card`` (from ``save_pretrained``), and transformers' ``push_to_hub`` replaces it by a
generic transformers card before ``_upload_modified_files``: both are wrapped to complete the card of a HyperLoRA
adapter, and do what they did for any other. This touches peft internals: ``tests/test_peft_integration.py`` fails
loudly if they move.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from peft import PeftModel
from peft.config import PeftConfigMixin
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .card import README_FILE, write_adapter_card
from .config import PEFT_TYPE, HyperLoraConfig
from .model import HyperLoraModel


def register() -> None:
    # peft looks a type up in these three tables only; register_peft_method would refuse a type outside its enum
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = HyperLoraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = HyperLoraModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = HyperLoraModel.prefix
    if hasattr(PeftModel.create_or_update_model_card, "__wrapped__"):  # once, even if hyperlora is reloaded
        return
    # A saved adapter loads only in a process that imported hyperlora, so its card must say so; PeftModel writes
    # the card itself, with no hook for its tuner, in these two methods (save_pretrained and push_to_hub).
    PeftModel.create_or_update_model_card = _card_on_save(PeftModel.create_or_update_model_card)
    PeftModel._upload_modified_files = _card_on_push(PeftModel._upload_modified_files)
    # PeftModel.from_pretrained reads adapter_config.json here before it knows the type, so no tuner code runs
    # before a corrupt file fails: only this wrapper can name the file (the error type is unchanged for every type).
    PeftConfigMixin.from_json_file = classmethod(_named_json_errors(PeftConfigMixin.from_json_file.__func__))


def _named_json_errors(from_json_file):
    @functools.wraps(from_json_file)
    def wrapper(cls, path_json_file: str, **kwargs):
        try:
            return from_json_file(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as error:  # the same type, with the file's name: json's own message has none
            message = f"{path_json_file} is not valid JSON: {error.msg}"
            raise json.JSONDecodeError(message, error.doc, error.pos) from None
        except UnicodeDecodeError:
            raise ValueError(f"{path_json_file} is not valid JSON: it is not UTF-8 text") from None

    return wrapper


def _is_hyperlora(model: PeftModel) -> bool:
    return isinstance(getattr(model, "base_model", None), HyperLoraModel)


def _card_on_save(create_or_update_model_card):
    @functools.wraps(create_or_update_model_card)
    def wrapper(self: PeftModel, output_dir: str) -> None:
        fresh = not (Path(output_dir) / README_FILE).exists()
        create_or_update_model_card(self, output_dir)
        if _is_hyperlora(self):
            write_adapter_card(self, output_dir, source=str(output_dir), fresh=fresh)

    return wrapper


def _card_on_push(upload_modified_files):
    @functools.wraps(upload_modified_files)
    def wrapper(self: PeftModel, working_dir: str, repo_id: str, *args, **kwargs):
        if _is_hyperlora(self):
            from huggingface_hub import ModelCard

            # push_to_hub put the repo's own card here or, for a repo without one, a generic transformers card
            readme = Path(working_dir) / README_FILE
            fresh = not readme.exists() or ModelCard.load(readme).data.library_name == "transformers"
            if fresh:
                readme.unlink(missing_ok=True)
            PeftModel.create_or_update_model_card.__wrapped__(self, working_dir)
            write_adapter_card(self, working_dir, source=repo_id, fresh=fresh)
        return upload_modified_files(self, working_dir, repo_id, *args, **kwargs)

    return wrapper
