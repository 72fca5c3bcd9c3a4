"""Files and folders this package writes: atomic writes, the guard on output folders, the cache root, checkpoints.

Every file a run writes goes through :func:`atomic_file` (or :func:`atomic_folder` for a whole folder), so a reader,
or a run killed mid-write, never sees a partial one; an output folder is only ever replaced when it is empty or
this package wrote it (:func:`check_output_folder`).
"""

from __future__ import annotations

import copyreg
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_WHISPER_KDQ_CACHE"
# Written last into a folder built by atomic_folder: its presence means the folder is complete and ours.
COMPLETE_MARKER = ".hf_whisper_kdq_complete"
# Written into a CTranslate2 export (which atomic_folder does not build), with what it was made from.
CT2_EXPORT_MARKER = ".hf_whisper_kdq_ct2_export"


def cache_root() -> Path:
    """``$HF_WHISPER_KDQ_CACHE``, else ``$XDG_CACHE_HOME/hf-whisper-kdq``, else ``~/.cache/hf-whisper-kdq``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hf-whisper-kdq"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _apply_umask(folder: Path) -> None:
    """mkdtemp creates 0700 folders: give the result the permissions an ordinary mkdir would."""
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write one file atomically: yields a temporary path beside ``path`` to write; on a clean exit it gets ordinary
    permissions and replaces ``path`` in one rename. On any exception it is removed and ``path`` is untouched, so a
    reader (or a run killed mid-write) never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text, encoding="utf-8")``, through :func:`atomic_file`."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


_OUR_MARKERS = (COMPLETE_MARKER, CT2_EXPORT_MARKER)


def written_by_us(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was written by this package: built by :func:`atomic_folder`, or a CTranslate2 export."""
    return any((Path(folder) / marker).is_file() for marker in _OUR_MARKERS)


def check_output_folder(
    output_dir: Path, *, kind: str | None = None, same_kind: bool = False, overwrite: bool = False
) -> None:
    """Refuse an output folder whose replacement could cost the user files, before any work.

    Missing or empty: fine. Not written by this package: never replaced, whatever ``overwrite`` says. For an export
    ``kind`` ("CTranslate2 export" ...): a previous one (``same_kind``) is replaced, another output of this package
    only with ``overwrite``. Without ``kind``, any output of this package is replaced.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder: choose another output folder")
    if not output_dir.is_dir() or not any(output_dir.iterdir()) or same_kind:
        return
    if not written_by_us(output_dir):
        raise FileExistsError(
            f"{output_dir} is not empty and was not written by hf_whisper_kdq (no {COMPLETE_MARKER} inside): "
            "nothing in it is replaced or deleted, even with overwrite=True. Fix: choose a new or empty output "
            "folder, or move its files away yourself"
        )
    if kind is not None and not overwrite:
        raise FileExistsError(
            f"{output_dir} holds another hf_whisper_kdq output, not a {kind}: pass overwrite=True to replace it, "
            "or choose another output folder"
        )


def replace_folder(staging: Path, output_dir: Path) -> None:
    """Move the finished folder ``staging`` to ``output_dir`` (beside it: renames only). A folder already there is
    renamed aside and deleted once the new one is in place; if the new one cannot be moved in, the old one is
    renamed back, so a failed replacement never costs the previous folder."""
    if not output_dir.exists():
        staging.rename(output_dir)
        return
    backup = output_dir.with_name(f".{output_dir.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    output_dir.rename(backup)
    try:
        staging.rename(output_dir)
    except BaseException:
        backup.rename(output_dir)
        raise
    shutil.rmtree(backup)


@contextmanager
def atomic_folder(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Build a folder atomically: yields an empty staging folder beside ``output_dir``; on a clean exit it gets
    ordinary permissions and the completion marker and replaces ``output_dir`` (:func:`replace_folder`). On any
    exception the staging folder is removed and ``output_dir`` is left as it was.

    Only an empty folder or one this package built (``written_by_us``) is ever replaced: anything else raises
    ``FileExistsError`` before any work, so a mistyped output folder never costs the user their files.
    """
    output_dir = Path(output_dir)
    check_output_folder(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        yield staging
        _apply_umask(staging)
        (staging / COMPLETE_MARKER).touch()
        replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` of ``folder`` whose trainer state is whole, or None.

    The Trainer writes a checkpoint in place, its ``trainer_state.json`` last (after weights, optimizer, scheduler
    and RNG states): a run killed while saving leaves a newer, partial folder that resuming must skip.
    """
    # transformers.trainer is heavy to import: only when a run resumes, so that importing files stays light.
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = {}
    for path in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if step.isdigit() and path.is_dir():
            steps[int(step)] = path
    for step in sorted(steps, reverse=True):
        try:
            json.loads((steps[step] / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning(
                "%s was not completely written (the run stopped while saving it): not resuming from it", steps[step]
            )
            continue
        return str(steps[step])
    return None


@contextmanager
def tokens_left_out_of_pickles(args):
    """While active, pickling ``args`` stores its ``*_token`` fields as None.

    The Trainer pickles its arguments into ``training_args.bin`` (every checkpoint and save, and the folder that its
    checkpoint pushes upload). ``to_dict`` redacts tokens, the pickle does not. Scoped to those writes so that deep
    copies of the arguments (which use the same reduction) keep their token.
    """
    kind = type(args)

    def reduce(instance):
        rebuild, arguments, state, *rest = object.__reduce_ex__(instance, 2)
        return (rebuild, arguments, {k: None if k.endswith("_token") else v for k, v in state.items()}, *rest)

    previous = copyreg.dispatch_table.get(kind)
    copyreg.dispatch_table[kind] = reduce
    try:
        yield
    finally:
        if previous is None:
            del copyreg.dispatch_table[kind]
        else:
            copyreg.dispatch_table[kind] = previous
