"""Never a half-written output: outputs are built under a temporary name, then renamed.

The temporary names sit beside the output and carry the writing process's id
(``.NAME.partial-PID-XXXX``): a run killed outright (SIGKILL, the OOM killer) cleans up nothing,
so the next run for the same output clears what a dead process left and puts back an earlier
output it had moved aside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import types
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


@contextlib.contextmanager
def staged_folder(out: str | Path, marker: str, inputs=()) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; on success it replaces ``out`` in one rename.

    ``out`` may already exist only if empty or a previous output of the same kind (it holds
    ``marker``, e.g. export.json), and must not hold any of the command's ``inputs``: nothing
    else is ever deleted. On any error the staging folder, and the parents made for it, are
    removed and ``out`` is left as it was.
    """
    out = _output_folder(out)
    try:
        _clear_stopped_runs(out)
        _check_replaceable(out, marker, inputs)
    except OSError as error:  # e.g. a folder we may not read
        raise _cannot_write(out, error) from None
    parent = out.parent
    made: list[Path] = []
    try:
        try:
            made = _make_parents(parent)
            staging = _temporary_folder(out, "partial")
        except OSError as error:
            raise _cannot_write(parent, error) from None
        yield staging
        _make_readable(staging)
        _replace_folder(staging, out)
    except BaseException as error:
        # By this process's names, not `staging`: a stop (SIGTERM, Ctrl-C) may come between
        # mkdtemp making the folder and the name being bound, or between the earlier output's
        # move aside and the rename that replaces it.
        _undo_own_runs(out)
        _remove_if_empty(made)
        _name_under_output(error, out)
        raise_naming(error, out)


LEFTOVER_KINDS = ("partial", "previous")  # being written, an earlier output moved aside
WRITING = ".mra-export-writing"  # in an output filled in place until it is whole: the writer's id


def _sibling_prefix(out: Path, kind: str) -> str:
    """The start of a temporary name beside ``out``, for mkdtemp/mkstemp: names this process."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def _temporary_folder(out: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, kind), dir=out.parent))


def _clear_stopped_runs(out: Path) -> None:
    """Clear what runs killed while writing ``out`` left: their temporary folders and files
    beside it, the remains of an output they were filling in place, and put back an earlier
    output they had moved aside (where nothing has replaced it). A live run's are left alone;
    one filling ``out`` in place stops this run with a one-line error."""
    writer = _in_place_writer(out)
    if writer is not None and _alive(writer):
        raise UserError(f"{out} is being written by another mra-export (process {writer}); wait "
                        "for it to finish or choose another output path")
    _undo_runs(out, lambda pid: not _alive(pid))


def _undo_runs(out: Path, ended) -> None:
    """Undo the runs for ``out`` of the processes ``ended(pid)`` picks: remove the output they
    were filling in place and their temporary folders and files beside it, and put back an
    earlier output they had moved aside (where nothing has replaced it). Each step leaves the
    folders as a later run can still undo: the half-made output is first renamed away whole (a
    removal stopped halfway would leave it unmarked, and the earlier output taken for litter),
    and an earlier output is put back before any removal."""
    writer = _in_place_writer(out)
    discarded = []
    if writer is not None and ended(writer):
        discarded.append(out.parent / f"{_sibling_prefix(out, 'partial')}{uuid.uuid4().hex[:8]}")
        os.rename(out, discarded[0])  # the remains of an in-place run (its marker says so)
    leftovers = [(kind, path) for pid, kind, path in _leftovers_of(out) if ended(pid)]
    for kind, path in sorted(leftovers, key=lambda leftover: leftover[0] != "previous"):
        if kind == "previous" and not os.path.lexists(out) and os.path.lexists(path / out.name):
            _put_back(path, out)
        elif path not in discarded:
            discarded.append(path)
    for path in discarded:
        _remove(path)


def _undo_own_runs(out: Path) -> None:
    """This process's run for ``out``, undone as it fails or stops: best effort, so that the
    error that stopped it is the one reported."""
    with contextlib.suppress(OSError):
        _undo_runs(out, _is_this_process)


def _in_place_writer(out: Path) -> int | None:
    """The process filling ``out`` in place, or that was when it was stopped; None if none."""
    if out.is_symlink() or not (out / WRITING).is_file():
        return None
    text = (out / WRITING).read_text().strip()
    return int(text) if text.isdigit() else None  # not ours: leave the folder alone


def _leftovers_of(out: Path) -> list[tuple[int, str, Path]]:
    """``(process id, kind, path)`` of every temporary sibling of ``out``."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({'|'.join(LEFTOVER_KINDS)})-(\d+)-[^/]+")
    siblings = sorted(os.listdir(out.parent)) if out.parent.is_dir() else []
    matches = (pattern.fullmatch(name) for name in siblings)
    return [(int(m[2]), m[1], out.parent / m[0]) for m in matches if m]


def _remove_own_leftovers(out: Path, kind: str) -> None:
    """This process's temporary siblings of ``out`` of ``kind``."""
    for pid, found, path in _leftovers_of(out):
        if _is_this_process(pid) and found == kind:
            shutil.rmtree(path, ignore_errors=True)


def _is_this_process(pid: int) -> bool:
    return pid == os.getpid()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _name_under_output(error: BaseException, out: Path) -> None:
    """Where an OSError names a file of this process's staging folder for ``out``, which is
    gone once the error is reported, name it as it would have been under ``out``."""
    if not isinstance(error, OSError):
        return
    staging = re.compile(rf"{re.escape(_sibling_prefix(out, 'partial'))}[^/]+")
    for attribute in ("filename", "filename2"):
        name = getattr(error, attribute)
        if not isinstance(name, (str, os.PathLike)):
            continue
        path = Path(name)
        if path != out.parent and path.is_relative_to(out.parent):
            first, *rest = path.relative_to(out.parent).parts
            if staging.fullmatch(first):
                setattr(error, attribute, str(out.joinpath(*rest)))


def raise_naming(error: BaseException, path: Path) -> None:
    """Re-raise ``error``; an OSError without a path (a failed write) as one naming ``path``,
    for the CLI's one line ``PATH: reason``."""
    if isinstance(error, OSError) and error.filename is None:
        raise OSError(error.errno, error.strerror, str(path)) from error
    raise error


def _cannot_write(path: Path, error: OSError) -> UserError:
    return UserError(f"cannot write to {path}: {error.strerror or error}; choose another output "
                     "path")


def absolute(path: str | Path) -> Path:
    """``path`` made absolute with ``..`` resolved (``sub/..`` is the folder itself, whose
    parent and name are what a staged replacement needs), links kept."""
    return Path(os.path.abspath(path))


def _make_parents(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; return those made, innermost last."""
    missing = [path for path in (folder, *folder.parents) if not os.path.lexists(path)]
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def folder_filled_in_place(out: str | Path, marker: str,
                           holds_only: frozenset[str] | None = None) -> Iterator[Path]:
    """As ``staged_folder``, for outputs that record their own paths (the demo's exports name
    their checkpoints, its engines their ONNX files), so cannot be made under another name:
    ``out`` is made empty, an earlier output moved aside; on any error or stop ``out`` is removed
    and the earlier output put back. ``holds_only``: the names an earlier output may hold, where
    ``marker`` alone does not tell it from a user's folder."""
    out = _output_folder(out)
    try:
        _clear_stopped_runs(out)
        _check_replaceable(out, marker, holds_only=holds_only)
    except OSError as error:
        raise _cannot_write(out, error) from None
    made: list[Path] = []
    try:
        try:
            made = _make_parents(out.parent)
            _move_aside(out)
            _make_marked(out)
        except OSError as error:
            raise _cannot_write(out, error) from None
        yield out
    except BaseException:
        # By this process's names, not bound variables: a stop (SIGTERM, Ctrl-C) may come
        # between a folder's making or moving and its name's binding.
        _undo_own_runs(out)
        _remove_if_empty(made)
        raise
    (out / WRITING).unlink()  # out is whole: from here no later run undoes it
    _remove_own_leftovers(out, "previous")


def _make_marked(out: Path) -> None:
    """Make ``out`` holding only the marker of this process's in-place run, in one rename, so
    that it never exists without the marker while the run lasts."""
    fresh = _temporary_folder(out, "partial")
    (fresh / WRITING).write_text(str(os.getpid()))
    fresh.chmod(0o777 & ~_umask())  # as mkdir would have made it (mkdtemp's is private)
    os.rename(fresh, out)


def _move_aside(out: Path) -> Path | None:
    """An existing ``out`` moved into a hidden folder beside it (returned), None if none."""
    if not out.exists():
        return None
    previous = _temporary_folder(out, "previous")
    os.rename(out, previous / out.name)
    return previous


def _put_back(previous: Path, out: Path) -> None:
    """Undo ``_move_aside``: the earlier output back at ``out`` (which must not exist)."""
    os.rename(previous / out.name, out)
    shutil.rmtree(previous, ignore_errors=True)


# The records of the outputs that other commands take as input, an export and an engine
# (ExportInfo.FILE_NAME, EngineManifest.FILE_NAME: named here, as those modules import this one):
# their folders are replaced whole when made again, with anything put inside them.
INPUT_RECORDS = ("export.json", "manifest.json")


def _replaced_whole(folder: Path) -> bool:
    return any((folder / record).is_file() for record in INPUT_RECORDS)


def _output_folder(out: str | Path) -> Path:
    """``out`` made absolute; where it is a link to a folder, that folder: the output replaces
    what the link points to, and the link stays."""
    out = absolute(out)
    return Path(os.path.realpath(out)) if out.is_symlink() and out.is_dir() else out


def _check_replaceable(out: Path, marker: str, inputs=(), holds_only=None) -> None:
    if os.path.lexists(out) and not out.is_dir():  # a file, or a link to nowhere
        raise UserError(f"{out} exists and is not a folder; choose another output path")
    if os.path.ismount(out):  # a volume's root: it cannot be renamed away or into place
        raise UserError(f"{out} is a mount point, which outputs cannot replace (they are written "
                        f"beside it and renamed into place); pass a folder inside it, e.g. "
                        f"{out / 'out'}")
    check_writable_folder(out.parent)
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise UserError(f"{out} already holds other files (no {marker}: not an earlier output to "
                        "replace); choose a new or empty folder")
    foreign = sorted(set(os.listdir(out)) - holds_only) if holds_only and out.is_dir() else []
    if foreign:
        raise UserError(f"{out} holds {', '.join(foreign[:3])}, which an earlier output of this "
                        "command does not (not one to replace); choose a new or empty folder")
    for given in inputs:  # in an earlier output, which the new one replaces
        resolved = Path(given).resolve()
        if out.resolve() in (resolved, *resolved.parents):
            raise UserError(f"{given} is inside {out}, which this command would replace; "
                            "choose another output folder")
        if resolved in out.resolve().parents and _replaced_whole(resolved):
            raise UserError(f"{out} is inside {given}, which the command that made it replaces "
                            "whole when run again; choose an output folder outside it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_readable(folder: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give them the usual permissions."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _replace_folder(staging: Path, out: Path) -> None:
    previous = _move_aside(out)
    os.rename(staging, out)
    if previous:
        shutil.rmtree(previous, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    check_writable_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stopped_runs(path)
    handle, temporary = tempfile.mkstemp(prefix=_sibling_prefix(path, "partial"), dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise_naming(error, path)


def check_writable_file(path: str | Path) -> None:
    """A one-line error unless ``path`` can be written as a file (checked before long work)."""
    if Path(path).is_dir():
        raise UserError(f"{path} is a folder; pass a file name")
    check_writable_folder(Path(path).parent)


def check_writable_folder(folder: str | Path) -> None:
    """A one-line error unless ``folder`` exists or can be made, and takes files; checked before
    long work so that it does not fail at the end. Leaves nothing behind."""
    folder = absolute(folder)
    existing = next(path for path in (folder, *folder.parents) if os.path.lexists(path))
    if not os.path.isdir(existing) or not _can_make_folders_in(existing):
        raise UserError(f"cannot write to {folder}: {existing} is not a writable folder; choose "
                        "another output path")


def _can_make_folders_in(folder: Path) -> bool:
    """Tried, not asked: os.access grants root write access to folders that take no new
    entries (/proc, some network and FUSE mounts)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mra-export-check-", dir=folder))
    except OSError:
        return False
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class JsonRecord:
    """A dataclass saved as ``FILE_NAME`` in a folder (atomically) and loaded back with one-line
    errors; subclasses say what made the folder (``MADE_BY``) and how to redo it (``REDO``)."""

    FILE_NAME: str
    MADE_BY: str  # e.g. "mra-export build"
    REDO: str  # e.g. "rebuild the engine"

    def save(self, folder: str | Path) -> None:
        atomic_write_text(Path(folder) / self.FILE_NAME,
                          json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path):
        path = Path(folder) / cls.FILE_NAME
        if not path.is_file():
            raise UserError(f"{folder} has no {cls.FILE_NAME}; pass a folder made by "
                            f"'{cls.MADE_BY}'")
        try:
            data = json.loads(path.read_text())
        except ValueError as error:  # not JSON, or not text at all
            raise UserError(f"{path} is corrupt ({error}); {cls.REDO}") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data, where: str | Path):
        """The record of ``data`` (as read from ``where``), its fields' types and values checked."""
        record, problem = cls._checked(data)
        if problem:
            raise UserError(f"{where} is corrupt ({problem}); {cls.REDO}")
        return record

    @classmethod
    def problem_of(cls, data) -> str | None:
        """What is wrong with ``data`` as this record, if anything."""
        return cls._checked(data)[1]

    @classmethod
    def _checked(cls, data):
        """``(record, None)``, or ``(None, what is wrong)``."""
        try:
            record = cls(**data)
        except TypeError as error:  # not a mapping, or fields missing or unknown
            return None, str(error)
        problem = record._type_problem() or record.problem()
        return (None, problem) if problem else (record, None)

    def _type_problem(self) -> str | None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _has_type(value, hints[field.name]):
                expected = _type_name(hints[field.name])
                return f"{field.name} is {json.dumps(value)[:40]}, not {expected}"
        return None

    def problem(self) -> str | None:
        """What is wrong with the loaded values, if anything (subclasses check theirs)."""
        return None


def _has_type(value, hint) -> bool:
    """Whether a JSON value fits a field's annotation (``int``, ``str | None``,
    ``dict[str, str]``, ``list[dict]`` ...); a whole number passes for a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return is_json_int(value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    return isinstance(value, hint)


def is_json_int(value) -> bool:
    """An integer as JSON has it: Python's bool is an int, JSON's true is no number."""
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(hint) -> str:
    # Python 3.10 takes dict[str, str] for a type, whose __name__ is then plain "dict"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "")
