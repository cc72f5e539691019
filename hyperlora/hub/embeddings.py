"""TaskEmbeddings: a set of task embeddings with their names, H-scores and config, moved between a model, a local
folder and a Hub model repository."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from torch import nn

from ..files import fsync_dir, staging_directory
from ..tuner.card import README_FILE
from ..tuner.config import PEFT_TYPE
from ..tuner.model import tuned_model
from .client import _VERSION, _api, _exists_as_other_type, _hub_errors
from .file_format import (
    _CARD_MARKER,
    _DOWNLOADED,
    CONFIG_FILE,
    EMBEDDINGS_FILE,
    FORMAT,
    FORMAT_VERSION,
    TENSOR_KEY,
    _check_h_scores,
    _json_safe,
    _read_bytes,
    _read_header,
    _write_file,
)

__all__ = ["TaskEmbeddings"]

logger = logging.getLogger(__name__)

# What must agree between the source's config and the target's for the same embedding to yield the same LoRA.
_MUST_MATCH = ("r", "task_embedding_dim", "module_embedding_dim", "hypernet_hidden_dim", "hypernet_num_layers")


@dataclass(eq=False)  # tensors have no single truth value: compare fields explicitly
class TaskEmbeddings:
    """The task embeddings of one HyperLoRA adapter, with what is needed to use and to trust them elsewhere.

    ``embeddings`` is (T, D) float32; ``task_names`` has T entries; ``h_scores`` is the T x T H-score matrix
    (``None`` where undefined, NaN is read as undefined); ``config`` is the adapter's ``HyperLoraConfig.to_dict()``,
    made JSON-safe. Everything is checked on construction, so a loaded object is always consistent.
    """

    embeddings: torch.Tensor
    task_names: list[str]
    h_scores: list[list[float | None]]
    config: dict[str, Any]

    def __post_init__(self) -> None:
        emb = self.embeddings
        if not isinstance(emb, torch.Tensor):
            raise ValueError(f"embeddings must be a torch.Tensor, got {type(emb).__name__}")
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (num_tasks, task_embedding_dim), got shape {tuple(emb.shape)}")
        if emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"embeddings must hold at least one task of size >= 1, got shape {tuple(emb.shape)}")
        if not emb.dtype.is_floating_point:
            raise ValueError(f"embeddings must be floating point, got {emb.dtype}")
        emb = emb.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not torch.isfinite(emb).all():
            raise ValueError("embeddings contain NaN or Inf")
        self.embeddings = emb
        num_tasks, dim = emb.shape

        names = list(self.task_names)
        if len(names) != num_tasks:
            raise ValueError(f"task_names has {len(names)} entries for {num_tasks} task embeddings")
        if not all(isinstance(name, str) for name in names):
            raise ValueError("task_names must all be strings")
        if len(set(names)) != len(names):
            raise ValueError(f"task_names must be unique, got {names}")
        self.task_names = names

        self.h_scores = _check_h_scores(self.h_scores, num_tasks)

        if not isinstance(self.config, Mapping):
            raise ValueError(f"config must be a dict (HyperLoraConfig.to_dict()), got {type(self.config).__name__}")
        config = _json_safe(dict(self.config))
        if config.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
            raise ValueError(f"config is for peft_type {config['peft_type']!r}, not {PEFT_TYPE!r}")
        if config.get("task_embedding_dim", dim) != dim:
            raise ValueError(
                f"embeddings have size {dim} but config.task_embedding_dim is {config['task_embedding_dim']}"
            )
        self.config = config

    @property
    def num_tasks(self) -> int:
        return self.embeddings.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.embeddings.shape[1]

    # --- model <-> embeddings ------------------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        task_names: list[str] | None = None,
        h_scores: Any = None,
    ) -> TaskEmbeddings:
        """Snapshot the active adapter's task embeddings and config (a PeftModel or the HyperLoraModel tuner).

        Names default to ``task_0 ..``; ``h_scores`` (nested lists, array or tensor) default to all undefined.
        """
        tuner = tuned_model(model)
        hypernet = tuner.hypernet
        if hypernet.num_tasks == 0:
            raise ValueError("the model has no tasks yet: call add_task() before exporting task embeddings")
        config = tuner.peft_config[tuner.active_adapters[0]]
        num_tasks = hypernet.num_tasks
        return cls(
            embeddings=hypernet.stacked_task_embeddings().detach().cpu().float().clone(),
            task_names=[f"task_{i}" for i in range(num_tasks)] if task_names is None else list(task_names),
            h_scores=[[None] * num_tasks for _ in range(num_tasks)] if h_scores is None else h_scores,
            config=config.to_dict(),
        )

    def apply_to(self, model: nn.Module) -> None:
        """Write these embeddings into ``model``'s active adapter, in place, growing its task list if needed.

        With the same hypernetwork weights the model then generates exactly the source's LoRA weights. Refused (before
        anything changes) when the model has more tasks than this set, or its r, embedding sizes, hypernetwork width /
        depth or target modules differ: the embeddings would mean something else there. A merged task is unmerged
        first, since its folded-in weights would no longer match.
        """
        tuner = tuned_model(model)
        hypernet = tuner.hypernet
        target = _json_safe(tuner.peft_config[tuner.active_adapters[0]].to_dict())
        if hypernet.task_embedding_dim != self.embedding_dim:
            raise ValueError(
                f"the model's task embeddings have size {hypernet.task_embedding_dim}, these have {self.embedding_dim}"
            )
        keys = [k for k in (*_MUST_MATCH, "target_modules") if k in self.config]
        diffs = [
            f"{k}: {self.config[k]!r} here vs {target.get(k)!r} in the model"
            for k in keys
            if self.config[k] != target.get(k)
        ]
        if diffs:
            raise ValueError("these task embeddings were made for a different HyperLoRA config: " + "; ".join(diffs))
        if hypernet.num_tasks > self.num_tasks:
            raise ValueError(
                f"the model has {hypernet.num_tasks} tasks but only {self.num_tasks} embeddings were given: "
                "refusing to leave its extra tasks with stale embeddings"
            )
        if "lora_alpha" in self.config and self.config["lora_alpha"] != target.get("lora_alpha"):
            logger.warning(
                "lora_alpha differs (%s here, %s in the model): same LoRA factors, differently scaled outputs",
                self.config["lora_alpha"],
                target.get("lora_alpha"),
            )
        tuner.unmerge()
        hypernet.resize_tasks(self.num_tasks)
        with torch.no_grad():
            for param, row in zip(hypernet.task_embeddings, self.embeddings, strict=True):
                param.copy_(row.to(device=param.device, dtype=param.dtype))
        if hypernet.active_task is None:
            hypernet.active_task = self.num_tasks - 1
        tuner._update_trainable()

    # --- local folder --------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike[str], *, repo_id: str | None = None) -> Path:
        """Write the three files into ``directory`` without ever leaving a half-written one behind.

        Everything is written and fsynced in a temporary sibling folder first. A new directory is then renamed into
        place whole; into an existing one (an adapter folder, say) each file is moved with an atomic rename, the JSON
        last since it is what loading reads first. An existing README.md that is not a HyperLoRA card is kept. The
        card's snippet loads from ``repo_id`` (where the folder will be pushed), else from ``directory``.
        """
        target = Path(directory)
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is not a directory")
        files = self._serialise(repo_id or str(directory))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_directory(target.parent, target.name)
        try:
            for name in (EMBEDDINGS_FILE, README_FILE, CONFIG_FILE):
                _write_file(staging / name, files[name])
            fsync_dir(staging)
            if not target.exists():
                try:
                    os.rename(staging, target)
                    fsync_dir(target.parent)
                    return target
                except OSError:
                    if not target.is_dir():  # not a lost race with another writer creating it: a real failure
                        raise
            readme = target / README_FILE
            keep_readme = readme.exists() and _CARD_MARKER not in readme.read_text(errors="replace")
            for name in (EMBEDDINGS_FILE, README_FILE, CONFIG_FILE):
                if not (name == README_FILE and keep_readme):
                    os.replace(staging / name, target / name)
            fsync_dir(target)
            return target
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(
        cls,
        directory_or_repo_id: str | os.PathLike[str],
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        endpoint: str | None = None,
    ) -> TaskEmbeddings:
        """Load from a local folder if one exists at that path (then the other arguments are unused), else from a Hub
        model repository.

        From the Hub, the repo's file list is read at ``revision`` (default ``main``) and both files are downloaded
        at that one commit into a private temporary folder, validated, and dropped: nothing is left on disk and the
        two files always come from the same push. ``endpoint`` overrides ``HF_ENDPOINT`` (a mirror or a test server).
        """
        path = Path(directory_or_repo_id)
        if path.is_dir():
            return cls._load(path, source=str(path))
        if path.exists():
            raise NotADirectoryError(f"{path} is a file: expected a folder written by save_pretrained or a repo id")
        repo_id = str(directory_or_repo_id)
        with tempfile.TemporaryDirectory(prefix="hyperlora-download-") as tmp:
            with _hub_errors(repo_id, token, action="download"):
                api = _api(endpoint, token)
                try:
                    info = api.model_info(repo_id, revision=revision, token=token)
                except RepositoryNotFoundError:
                    if _exists_as_other_type(api, repo_id, token):
                        raise ValueError(
                            f"{repo_id!r} is not a model repository, so it holds no HyperLoRA task embeddings "
                            "(they are pushed to model repositories)"
                        ) from None
                    raise
                present = {sibling.rfilename for sibling in info.siblings or []}
                where = f"Hub model repository {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
                if CONFIG_FILE not in present:
                    raise ValueError(f"{where} holds no HyperLoRA task embeddings: it has no {CONFIG_FILE}")
                if EMBEDDINGS_FILE not in present:
                    raise ValueError(f"{where} has {CONFIG_FILE} but no {EMBEDDINGS_FILE}: an incomplete upload")
                for name in _DOWNLOADED:
                    hf_hub_download(
                        repo_id,
                        name,
                        repo_type="model",
                        revision=info.sha or revision,
                        token=token,
                        endpoint=endpoint,
                        local_dir=tmp,
                        library_name="hyperlora",
                        library_version=_VERSION,
                    )
            return cls._load(Path(tmp), source=f"Hub repository {repo_id!r}")

    # --- Hub -----------------------------------------------------------------------------------------------------

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool = False,
        commit_message: str = "Upload HyperLoRA task embeddings",
        revision: str | None = None,
        endpoint: str | None = None,
    ) -> Any:
        """Create the model repo if needed and upload the three files in one commit; returns the ``CommitInfo``.

        Files are staged in a temporary folder, so only these three are uploaded, whatever else lies around.
        ``private`` applies only when the repo is created here.
        """
        with _hub_errors(repo_id, token, action="push"), tempfile.TemporaryDirectory(prefix="hyperlora-push-") as tmp:
            api = _api(endpoint, token)
            url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
            folder = self.save_pretrained(Path(tmp) / "upload", repo_id=url.repo_id)
            info = api.upload_folder(
                repo_id=url.repo_id,
                folder_path=folder,
                repo_type="model",
                token=token,
                revision=revision,
                commit_message=commit_message,
            )
        logger.info("pushed %d task embeddings to %s", self.num_tasks, url.repo_id)
        return info

    # --- serialisation -------------------------------------------------------------------------------------------

    def _serialise(self, source: str) -> dict[str, bytes]:
        tensors = safetensors.torch.save({TENSOR_KEY: self.embeddings}, metadata={"format": "pt"})
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_tasks": self.num_tasks,
            "task_embedding_dim": self.embedding_dim,
            "safetensors_sha256": hashlib.sha256(tensors).hexdigest(),
            "task_names": self.task_names,
            "h_scores": self.h_scores,
            "config": self.config,
        }
        text = json.dumps(header, indent=2, allow_nan=False) + "\n"
        return {EMBEDDINGS_FILE: tensors, CONFIG_FILE: text.encode(), README_FILE: self._model_card(source).encode()}

    def _model_card(self, source: str) -> str:
        shown = ", ".join(f"`{name}`" for name in self.task_names[:20])
        more = f" and {self.num_tasks - 20} more" if self.num_tasks > 20 else ""
        targets = self.config.get("target_modules")
        return (
            "---\nlibrary_name: hyperlora\ntags:\n- hyperlora\n- peft\n- continual-learning\n- task-embeddings\n---\n"
            f"{_CARD_MARKER}\n\n# HyperLoRA task embeddings\n\n"
            f"{self.num_tasks} task embeddings of size {self.embedding_dim} for a HyperLoRA hypernetwork "
            f"(r={self.config.get('r')}, target modules {targets}). Tasks: {shown}{more}.\n\n"
            "They are not a model on their own: they select LoRA weights from a hypernetwork with matching weights.\n\n"
            "```python\nfrom hyperlora.hub import TaskEmbeddings\n\n\n"
            "def apply_tasks(model):\n"
            '    """Give `model`, a PeftModel with the HyperLoRA adapter these embeddings belong to, these tasks."""\n'
            f"    TaskEmbeddings.from_pretrained({source!r}).apply_to(model)\n"
            "    return model\n```\n"
        )

    @classmethod
    def _load(cls, folder: Path, *, source: str) -> TaskEmbeddings:
        header = _read_header(folder / CONFIG_FILE, source)
        data = _read_bytes(folder / EMBEDDINGS_FILE, source)
        try:
            tensors = safetensors.torch.load(data)
        except Exception as exc:
            raise ValueError(f"{EMBEDDINGS_FILE} in {source} is corrupted or truncated: {exc}") from None
        if TENSOR_KEY not in tensors:
            raise ValueError(f"{EMBEDDINGS_FILE} in {source} has no {TENSOR_KEY!r} tensor (found {sorted(tensors)})")
        embeddings = tensors[TENSOR_KEY]
        expected = (header["num_tasks"], header["task_embedding_dim"])
        if tuple(embeddings.shape) != expected:
            raise ValueError(
                f"{EMBEDDINGS_FILE} in {source} holds shape {tuple(embeddings.shape)} but {CONFIG_FILE} describes "
                f"{expected}: the two files come from different saves"
            )
        checksum = header.get("safetensors_sha256")
        if checksum is not None and hashlib.sha256(data).hexdigest() != checksum:
            raise ValueError(
                f"{EMBEDDINGS_FILE} in {source} does not match the SHA-256 recorded in {CONFIG_FILE}: it is corrupted, "
                "or the two files come from different saves"
            )
        try:
            return cls(embeddings, header["task_names"], header["h_scores"], header["config"])
        except ValueError as exc:
            raise ValueError(f"{CONFIG_FILE} in {source} is invalid: {exc}") from None
