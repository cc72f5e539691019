"""Talking to the Hugging Face Hub: the client, and its errors turned into ones that say what went wrong here.

No message that leaves this module quotes the token, nor anything token-shaped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}|(?i:bearer)\s+\S+")

try:
    _VERSION: str | None = metadata.version("hyperlora")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    _VERSION = None


def _api(endpoint: str | None, token: str | bool | None) -> HfApi:
    return HfApi(endpoint=endpoint, token=token, library_name="hyperlora", library_version=_VERSION)


def _exists_as_other_type(api: HfApi, repo_id: str, token: str | bool | None) -> bool:
    for repo_type in ("dataset", "space"):
        try:
            if api.repo_exists(repo_id, repo_type=repo_type, token=token):
                return True
        except HfHubHTTPError:
            pass
    return False


def _scrub(text: str, token: str | bool | None) -> str:
    """Remove the token (and anything token-shaped) from a message that may end up in logs."""
    if isinstance(token, str) and token:
        text = text.replace(token, "***")
    return _TOKEN_PATTERN.sub("***", text)


@contextmanager
def _hub_errors(repo_id: str, token: str | bool | None, *, action: str) -> Iterator[None]:
    """Turn huggingface_hub's errors into ones that say what went wrong here, never quoting the token."""
    repo = repo_id
    try:
        yield
    except HFValidationError:
        raise ValueError(f"{repo!r} is neither an existing local folder nor a valid Hub repo id") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repository {repo!r} has no such revision") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"Hub model repository {repo!r} was not found, or it is private or gated and the token (if any) does "
            "not grant access"
        ) from None
    except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
        first_line = _scrub(str(exc), token).strip().splitlines()[0]
        raise FileNotFoundError(f"could not {action} the task-embedding files of {repo!r}: {first_line}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise PermissionError(
                f"the Hub refused to {action} {repo!r} (HTTP {status}): check that the token is valid and has "
                "access to that repository or namespace"
            ) from None
        raise OSError(f"Hub request to {action} {repo!r} failed: {_scrub(str(exc), token)}") from None
    except Exception as exc:
        transport = type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
        if not (transport or isinstance(exc, ConnectionError | TimeoutError)):
            raise
        raise OSError(
            f"could not {action} {repo!r}: the Hub is unreachable or offline mode is on "
            f"({type(exc).__name__}: {_scrub(str(exc), token)})"
        ) from None
