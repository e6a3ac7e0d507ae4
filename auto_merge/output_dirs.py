"""Output folders the project writes (run folders, merged checkpoints, zoo builds): the one place that creates,
locks, replaces and cleans them, so that nothing a user owns is ever deleted.

Rules, enforced here for every writer:
- a name given by the user for a folder inside another (``run_name``, ``--run-name``) is one plain path component:
  never ``..``, ``.``, a separator or a hidden name, so the result stays inside its parent;
- a folder is built in a temporary sibling (``.<name>.tmp-<pid>-<token>``, with a held lock file beside it) and
  renamed into place only when complete;
- an existing folder is replaced only with ``overwrite``, and only when auto-merge wrote it (it holds
  :data:`OWNER_MARKER`, or a run folder's manifest) or it is empty; never a folder that is, holds or lies inside a
  source model, nor the working directory or one above it;
- a run folder is held by one process at a time (an exclusive, non-blocking lock beside it);
- temporaries left by a killed writer (its lock no longer held) are removed by the next writer of the same folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from auto_merge.errors import AutoMergeError

OWNER_MARKER = ".auto-merge-output.json"
RUN_MANIFEST = "run.json"
_TEMP_TAG = ".tmp-"
_RETIRED_TAG = ".old-"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class OutputDirError(AutoMergeError, ValueError):
    """An output folder that cannot be used: the message names the folder (and the key that named it) and the fix."""


def check_folder_name(name: str, key: str) -> str:
    """``name`` as one safe path component, or an error naming ``key`` and what is allowed."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name.endswith(_TEMP_TAG.rstrip("-")):
        raise OutputDirError(
            f"{key}: {name!r} is not a plain folder name; allowed: letters, digits and . _ + - (at most 128, "
            f"starting with a letter or digit; no '/', no '..')")
    return name


def child_folder(parent: str | os.PathLike, name: str, key: str, *, parent_key: str = "output path") -> Path:
    """``parent/name`` for a user-given ``name`` that is checked to stay inside ``parent``."""
    parent = Path(parent)
    if parent.exists() and not parent.is_dir():
        raise OutputDirError(f"{parent_key}: {parent} is a file, not a folder; allowed: a folder (existing or new)")
    return parent / check_folder_name(name, key)


def is_owned(folder: Path) -> bool:
    """Whether auto-merge wrote ``folder`` (a merge output, a zoo build or a run folder)."""
    return (folder / OWNER_MARKER).is_file() or (folder / RUN_MANIFEST).is_file()


def mark_owned(folder: Path, kind: str) -> None:
    (folder / OWNER_MARKER).write_text(json.dumps({"written_by": "auto-merge", "kind": kind}) + "\n")


def check_replaceable(out_dir: str | os.PathLike, *, overwrite: bool, protected: Iterable[str | os.PathLike] = (),
                      what: str = "output folder") -> None:
    """Raise unless ``out_dir`` may be written: absent, or (with ``overwrite``) empty or written by auto-merge, and
    never one of the ``protected`` folders (source models), a folder holding one, or one inside one."""
    out_dir = Path(out_dir)
    _check_location(out_dir, protected, what)
    if not out_dir.exists():
        return
    if not overwrite:
        raise OutputDirError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another folder")
    if any(out_dir.iterdir()) and not is_owned(out_dir):
        raise OutputDirError(
            f"{out_dir} was not written by auto-merge (no {OWNER_MARKER} or {RUN_MANIFEST} in it), so --overwrite "
            f"does not replace it; remove it yourself or choose another folder")


def _check_location(out_dir: Path, protected: Iterable, what: str) -> None:
    """Never the working directory or above it, never a source model's folder, never a file or a link."""
    target = out_dir.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputDirError(f"{out_dir}: the {what} would replace the working directory or a folder holding it; "
                             f"give a new folder")
    for source in protected:
        source = Path(source).resolve()
        if target == source or target in source.parents or source in target.parents:
            relation = ("is" if target == source else "holds" if target in source.parents else "lies inside")
            raise OutputDirError(f"{out_dir}: the {what} {relation} the source model folder {source}; "
                                 f"write the output elsewhere (sources are never replaced)")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputDirError(f"{out_dir} exists and is not a folder; give a new {what}")


def _make_parent(folder: Path, what: str) -> None:
    """Create ``folder``'s parent, or say in one line why it cannot be written (a read-only or missing place)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        probe = folder.parent / f".{folder.name}{_TEMP_TAG}probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise OutputDirError(f"cannot write the {what} {folder}: {error.strerror or error} "
                             f"({error.filename or folder.parent}); allowed: a folder you can write to") from None


@contextlib.contextmanager
def _held_lock(path: Path, *, blocking: bool, busy: str) -> Iterator[None]:
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            raise OutputDirError(busy + (f" (process {holder})" if holder else "")) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def run_folder_busy(run_dir: str | os.PathLike) -> bool:
    """Whether a process holds the run folder now (a search running in it); only looks, never takes the lock."""
    lock = Path(run_dir).with_name(f".{Path(run_dir).name}.lock")
    return lock.is_file() and not _lock_is_free(lock)


def _lock_is_free(path: Path) -> bool:
    try:
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except BlockingIOError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove what killed writers of ``out_dir`` left beside it: temporary and retired copies whose writer's lock
    is free (or, for names without a lock file, whose process is gone). Returns what was removed."""
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    removed = []
    for tag in (_TEMP_TAG, _RETIRED_TAG):
        for prefix in (f".{out_dir.name}{tag}", f"{out_dir.name}{tag}"):  # the second: folders of older versions
            for leftover in parent.glob(prefix + "*"):
                if leftover.name.endswith(".lock"):
                    continue
                lock = leftover.with_name(leftover.name + ".lock")
                if lock.exists():
                    stale = _lock_is_free(lock)
                else:
                    pid = leftover.name[len(prefix):].split("-")[0]
                    stale = not (pid.isdigit() and _pid_alive(int(pid)))
                if not stale:
                    continue
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                lock.unlink(missing_ok=True)
                removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, overwrite: bool = False, protected: Iterable = (),
                  kind: str = "merge", what: str = "output folder") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out_dir``; when the block succeeds it becomes ``out_dir`` (marked as
    auto-merge's), replacing an earlier one only under :func:`check_replaceable`'s rules. On any error the
    temporary is removed and ``out_dir`` is untouched; after a kill, the next writer removes the temporary."""
    out_dir = Path(out_dir).absolute()
    protected = list(protected)
    check_replaceable(out_dir, overwrite=overwrite, protected=protected, what=what)
    _make_parent(out_dir, what)
    clean_stale_temporaries(out_dir)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temporary = out_dir.with_name(f".{out_dir.name}{_TEMP_TAG}{token}")
    lock = temporary.with_name(temporary.name + ".lock")
    with _held_lock(lock, blocking=True, busy=""):
        try:
            temporary.mkdir()
            yield temporary
            mark_owned(temporary, kind)
            # Checked again: the folder may have appeared (or changed) while we wrote.
            check_replaceable(out_dir, overwrite=overwrite, protected=protected, what=what)
            if out_dir.exists():
                retired = out_dir.with_name(f".{out_dir.name}{_RETIRED_TAG}{token}")
                os.replace(out_dir, retired)
                os.replace(temporary, out_dir)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(temporary, out_dir)
        finally:
            if temporary.exists():
                shutil.rmtree(temporary, ignore_errors=True)
            lock.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}{_TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


class RunFolder:
    """A run folder held by this process: ``path``, the run's ``fingerprint``, and whether an earlier run of the same
    fingerprint is resumed."""

    def __init__(self, path: Path, fingerprint: str, resumed: bool):
        self.path = path
        self.fingerprint = fingerprint
        self.resumed = resumed


@contextlib.contextmanager
def claim_run_folder(output_path: str | os.PathLike, name: str, *, name_key: str, fingerprint: str,
                     manifest: dict, overwrite: bool, output_key: str = "output path") -> Iterator[RunFolder]:
    """Hold the run folder ``output_path/name`` for the duration of the block.

    Another process holding it is an error (never two writers). A folder with the same fingerprint is resumed; one
    of another run is refused unless ``overwrite``, which retires it (renamed, then deleted) only when it is an
    auto-merge run folder. Temporaries left in or beside it by a killed run are removed.
    """
    run_dir = child_folder(output_path, name, name_key, parent_key=output_key)
    _check_location(run_dir, (), "run folder")
    _make_parent(run_dir, "run folder")
    lock = run_dir.with_name(f".{run_dir.name}.lock")
    with _held_lock(lock, blocking=False,
                    busy=f"{run_dir} is in use by another auto-merge search or merge; wait for it to finish, "
                         f"or give another --run-name"):
        clean_stale_temporaries(run_dir)
        manifest_path = run_dir / RUN_MANIFEST
        resumed = False
        if run_dir.exists() and any(run_dir.iterdir()):
            previous = _read_fingerprint(manifest_path)
            if previous == fingerprint and not overwrite:
                resumed = True
            elif not manifest_path.is_file():
                raise OutputDirError(
                    f"{run_dir} is not an auto-merge run folder (no {RUN_MANIFEST}), so it is never replaced, even "
                    f"with --overwrite; give a new --run-name (or global_params.output_path / run_name)")
            elif not overwrite:
                what = _what_changed(manifest_path, manifest) or "a run of a different config"
                raise OutputDirError(
                    f"{run_dir} holds {what}; rerun with --overwrite to replace it, or give a "
                    f"new --run-name (or global_params.output_path / run_name in the config)")
            else:
                retired = run_dir.with_name(f".{run_dir.name}{_RETIRED_TAG}{os.getpid()}-{secrets.token_hex(4)}")
                os.replace(run_dir, retired)
                shutil.rmtree(retired, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        for leftover in run_dir.glob(f".*{_TEMP_TAG}*"):  # torn atomic writes of a killed run (we hold the lock)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        if not resumed:
            write_json_atomic(manifest_path, {"fingerprint": fingerprint, **manifest})
        yield RunFolder(run_dir, fingerprint, resumed)


def _what_changed(manifest_path: Path, manifest: dict) -> str | None:
    """Names the source models whose files changed since the earlier run, when that is the difference."""
    try:
        earlier = json.loads(manifest_path.read_text()).get("sources") or {}
    except (OSError, ValueError, AttributeError):
        return None
    changed = sorted(ref for ref, identity in (manifest.get("sources") or {}).items()
                     if ref in earlier and earlier[ref] != identity)
    if not changed:
        return None
    return (f"a run of the same config whose source model files have changed since ({', '.join(changed)}): its "
            f"scores are for the old files")


def _read_fingerprint(manifest: Path) -> str | None:
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
