"""Push a compressed checkpoint folder (weights, config, tokenizer, card, figure, ``ctranslate2/``) to the Hub.

One commit: ``HfApi.create_repo(exist_ok=True)`` then ``HfApi.create_commit`` with one ``CommitOperationAdd`` per
file of :func:`files_to_upload` — an explicit list built from the folder, never a pattern the Hub expands. What is
left out: the teacher (a ``teacher*`` folder or file), training-only state (``optimizer.pt``, ``scheduler.pt``,
``rng_state*``, ``trainer_state.json``, ``training_args.bin``, ``checkpoint-*/``, ``runs/``, any ``*.pt``/``*.pth``/
``*.ckpt``), hidden files and folders (``.git``, ``.cache``, markers), caches, and links that lead outside the
folder. The folder is only read: a failed push leaves it exactly as it was.

The token comes from the argument or huggingface_hub's standard sources (``HF_TOKEN``, ``huggingface-cli login``);
it is passed to the client and never logged or put into an error message. What is written for the Hub (the card,
its figures) goes through :func:`public` and :func:`scrub`: tokens redacted, local paths reduced to basenames.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

logger = logging.getLogger(__name__)

# Matched against every path component (folders) or the file name (files).
EXCLUDED_DIRS = ("checkpoint-*", "runs", "teacher*", "__pycache__", "wandb", "logs")
EXCLUDED_FILES = (
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*",
    "trainer_state.json",
    "training_args.bin",
    "teacher*",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.pyc",
    "events.out.tfevents*",
)
_HINTS = {
    401: "the token is invalid or expired: run `huggingface-cli login` again or set a valid HF_TOKEN",
    403: "the token may not write to this repo or namespace: use a token with write access (a 'write' token, or a "
    "fine-grained token allowed to write to this repo), push under your own user name, or ask the namespace's "
    "owner for write permission",
    404: "the repo or revision does not exist (or the token cannot see it)",
    409: "the repo or branch changed concurrently, or a conflicting operation is running: retry",
    413: "a file is too large for a direct upload",
    429: "too many requests: wait and retry",
}


# ---- what may reach the Hub: no token, no local path (the card, its figures) ------------------------------------
_TOKEN = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{16,}")
_ABS_PATH = re.compile(r"(?<![\w.:/\\-])(?:~|[A-Za-z]:)?[/\\](?:[^\s/\\|`'\"()\[\]<>]+[/\\])+([^\s/\\|`'\"()\[\]<>]+)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(?:/[\w.-]{1,96})?$")


def _looks_local(text: str) -> bool:
    s = text.strip()
    return (
        s.startswith(("/", "~", "./", "../", "\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", s))
        or (("/" in s or "\\" in s) and Path(s).expanduser().exists())
    )


def public(value: Any) -> str:
    """A value as card text: tokens redacted, a local path reduced to its last component, pipes escaped."""
    text = _TOKEN.sub("<redacted>", str(value))
    if _looks_local(text):
        text = re.split(r"[/\\]", text.strip().rstrip("/\\"))[-1] or "(local)"
    return text.replace("|", "\\|").replace("\n", " ")


def scrub(text: str) -> str:
    """Last pass over rendered text: the home folder, absolute paths (→ basename) and tokens."""
    home = str(Path.home())
    if len(home) > 1:
        text = text.replace(home, "~")
    return _ABS_PATH.sub(lambda m: m.group(1), _TOKEN.sub("<redacted>", text))


def hub_model_id(name: str | None) -> str | None:
    """``name`` when it is a Hub model id (not a local folder), else None."""
    local = not name or not _HUB_ID.match(name) or ".." in name or Path(name).expanduser().exists()
    return None if local else name


class PushError(RuntimeError):
    """A push to the Hub that did not happen; the message says why (never the token)."""


class MissingTokenError(PushError):
    """No Hugging Face token in the argument, ``HF_TOKEN`` or the ``huggingface-cli login`` token file."""


def _excluded(relative: PurePosixPath, is_dir: bool) -> bool:
    if any(part.startswith(".") for part in relative.parts):
        return True
    dirs = relative.parts if is_dir else relative.parts[:-1]
    if any(fnmatch.fnmatch(part, pattern) for part in dirs for pattern in EXCLUDED_DIRS):
        return True
    return not is_dir and any(fnmatch.fnmatch(relative.name, pattern) for pattern in EXCLUDED_FILES)


def files_to_upload(folder: str | os.PathLike) -> list[str]:
    """The files of ``folder`` a push uploads, as sorted POSIX paths relative to it (see the module docstring)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{Path(folder).name!r} is not a folder")
    chosen = []
    for current, dirs, files in os.walk(root, followlinks=False):
        here = Path(current)
        kept = []
        for name in sorted(dirs):
            path = here / name
            relative = PurePosixPath(path.relative_to(root).as_posix())
            if _excluded(relative, True):
                continue
            if path.is_symlink():  # os.walk does not enter linked folders: refuse them explicitly
                logger.warning("Not uploading linked folder %s", relative)
                continue
            kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            path = here / name
            relative = PurePosixPath(path.relative_to(root).as_posix())
            if _excluded(relative, False):
                continue
            target = path.resolve()
            if not target.is_file() or (target != path and not target.is_relative_to(root)):
                logger.warning("Not uploading %s: it links outside the folder or is not a regular file", relative)
                continue
            chosen.append(str(relative))
    return sorted(chosen)


def _describe(err: HfHubHTTPError, repo_id: str, stage: str) -> str:
    status = getattr(err.response, "status_code", None)
    server = getattr(err, "server_message", None)
    message = f"pushing to {repo_id} failed while trying to {stage}: HTTP {status}"
    if status in _HINTS:
        message += f" ({_HINTS[status]})"
    elif status is not None and status >= 500:
        message += " (Hub server error: retry later)"
    if server:
        message += f". Server said: {server.strip()}"
    return message + ". Nothing was changed in the local folder."


def push_compressed(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    require_card: bool = True,
) -> CommitInfo:
    """Upload a compressed checkpoint folder to ``repo_id`` in one commit and return its ``CommitInfo``.

    Args:
        folder: the checkpoint folder (README.md from ``card.write_model_card`` included).
        private: create the repo private (ignored when it exists already).
        token: a Hub token; default: huggingface_hub's (``HF_TOKEN``, then the ``huggingface-cli login`` file).
        revision: branch to commit to (created from main when missing); default main.
        create_pr: open a pull request instead of committing to the branch.
        endpoint: Hub URL (default: ``HF_ENDPOINT`` or https://huggingface.co).
        require_card: refuse a folder without README.md.

    Raises:
        MissingTokenError: no token anywhere.
        PushError: the Hub refused (with the repo id, the HTTP status and why) or could not be reached.
    """
    root = Path(folder)
    files = files_to_upload(root)
    if require_card and "README.md" not in files:
        raise PushError(
            f"{root.name!r} has no README.md: write the model card first "
            "(hf_whisper_kdq.card.write_model_card(folder, ...)) or pass require_card=False"
        )
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise PushError(f"{root.name!r} holds no weights (*.safetensors / *.bin): nothing worth pushing")
    token = token or get_token()
    if not token:
        raise MissingTokenError(
            f"cannot push to {repo_id}: no Hugging Face token found. Fix: run `huggingface-cli "
            "login` (or `hf auth login`) with a token that has write access, set the HF_TOKEN "
            "environment variable, or pass token=..."
        )
    _refuse_leaked_token(root, files, token)
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token, library_name="hf-whisper-kdq")
    size = sum((root / f).stat().st_size for f in files)
    logger.info("Pushing %d files (%.1f MB) to %s", len(files), size / 1e6, repo_id)
    stage = "create the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not create_pr:
            stage = f"create branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        stage = "commit the files"
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(root / f)) for f in files]
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload Whisper-KDQ checkpoint ({len(files)} files)",
            revision=revision,
            create_pr=create_pr,
        )
    except HfHubHTTPError as err:
        raise PushError(_describe(err, repo_id, stage)) from err
    except ValueError as err:  # e.g. the Hub rejected README.md's metadata
        raise PushError(f"pushing to {repo_id} failed while trying to {stage}: {err}") from err
    except Exception as err:
        # Connection errors: OSError, or the HTTP client's own (httpx2.TransportError is not an OSError).
        if not isinstance(err, OSError) and type(err).__module__.split(".")[0] not in ("httpx", "httpx2"):
            raise
        raise PushError(
            f"pushing to {repo_id} failed while trying to {stage}: Hub unreachable at "
            f"{api.endpoint} ({type(err).__name__}: {err})"
        ) from err
    logger.info("Pushed to %s", info.pr_url or info.commit_url)
    return info


def _refuse_leaked_token(root: Path, files: list[str], token: str) -> None:
    """Refuse to upload a text file that contains the token itself; warn about local paths in one."""
    local = [p for p in {str(root.resolve()), str(Path.home())} if len(p) > 1]
    for name in files:
        if name.endswith((".md", ".json", ".txt", ".yaml", ".yml", ".jinja")) and (root / name).stat().st_size < 50e6:
            text = (root / name).read_text(encoding="utf-8", errors="ignore")
            if token in text:
                raise PushError(f"{name} contains your Hugging Face token: remove it before pushing")
            if any(path in text for path in local):
                logger.warning("%s mentions a local path (the folder or your home folder); it will be public", name)
