"""Share task embeddings on the Hugging Face Hub: a few kilobytes that turn a shared hypernetwork into new tasks' LoRAs.

A HyperLoRA adapter is a hypernetwork plus one small embedding per task. Once the hypernetwork is shared (for
instance with PEFT's own ``push_to_hub``), a set of tasks travels as its embeddings alone. :class:`TaskEmbeddings`
holds them with their task names, the H-score matrix they were guided by, and the config they belong to, and moves
them between a model, a local folder and a Hub model repository.

On disk and on the Hub a set is exactly three files: ``task_embeddings.safetensors`` (one float32 tensor under the
key ``task_embeddings``), ``task_embeddings.json`` (names, H-scores, config and the tensor file's SHA-256) and a
``README.md`` model card. Loading reads only those names, only safetensors and JSON: no pickle, no remote code.

``embeddings`` holds :class:`TaskEmbeddings`; ``file_format`` the file names, reading, validating and atomic writing
of the two data files; ``client`` the Hub client and the translation of its errors, which never quote the token.
"""

from ..tuner.card import README_FILE
from .embeddings import TaskEmbeddings
from .file_format import CONFIG_FILE, EMBEDDINGS_FILE, FORMAT_VERSION

__all__ = ["CONFIG_FILE", "EMBEDDINGS_FILE", "FORMAT_VERSION", "README_FILE", "TaskEmbeddings"]
