"""Find a checkpoint: a local directory, or a Hugging Face Hub model id fetched into (or read from) the Hub cache.

Only the files a checkpoint needs are fetched, never code. With `HF_HUB_OFFLINE=1` the id is looked up in the
cache alone (`$HF_HOME/hub/models--owner--name/snapshots/<commit>/`, the commit named by `refs/main`).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, snapshot_download

from .errors import CheckpointError
from .model import MODEL_CONFIG_NAME, WEIGHTS_NAME
from .processing import PROCESSOR_NAME, TOKENIZER_NAME

CHECKPOINT_FILES = [MODEL_CONFIG_NAME, WEIGHTS_NAME, PROCESSOR_NAME, TOKENIZER_NAME, "README.md"]


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local checkpoint directory as is; otherwise the snapshot directory of the Hub model `name_or_path`."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint {name_or_path!r} is a file; expected a checkpoint directory")
    if path.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") > 1:
        raise CheckpointError(f"checkpoint directory not found: {name_or_path}")  # a path, not an owner/name id
    try:
        return Path(snapshot_download(repo_id=name_or_path, allow_patterns=CHECKPOINT_FILES))
    except (OSError, ValueError) as error:  # not found, offline and not cached, or not a valid repo id
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"checkpoint {name_or_path!r} is neither a local directory nor a Hugging Face Hub model in the cache "
            f"({constants.HF_HUB_CACHE}): {reason}"
        ) from None
