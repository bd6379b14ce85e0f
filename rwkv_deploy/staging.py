"""Writing a folder as one step, for `export` and `triton`: build it under a temporary name beside OUT, then swap
it in atomically; nothing half-written is ever left at OUT, and what a killed process leaves is swept by the next
run into the same parent folder. No torch, no onnx: the serving side uses it too.

    with staged(out, "export") as tmp:   # tmp: an empty folder beside out
        ...write into tmp...             # on success tmp becomes out; on any failure it is removed
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import RWKVDeployError
from .runtime.manifest import current_umask

log = logging.getLogger(__name__)


@contextmanager
def staged(out: Path, what: str):
    """A fresh temporary folder beside `out` (an absolute path from destination()) that replaces `out` when the
    block completes, and is removed if it raises; an OSError (disk full, read-only, permission) becomes one
    RWKVDeployError naming `what`. Stale temporary folders of dead runs in the same parent are swept first."""
    sweep_stale(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{owner()}-"))
    except OSError as e:
        raise RWKVDeployError(f"cannot write to {out.parent} ({e.strerror}); choose another -o")
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        yield tmp
        commit(tmp, out)
    except BaseException as e:
        remove(tmp)  # after a swap this is the old folder, so it goes either way
        if isinstance(e, OSError):  # disk full, read-only, permission denied: the user's to fix, not a bug
            where = f" ({e.filename})" if e.filename else ""
            raise RWKVDeployError(f"writing the {what} to {out} failed: {e.strerror or e}{where}") from e
        raise


def sigterm_raises_exit(fn):
    """While `fn` runs in the main thread, SIGTERM raises SystemExit(143) instead of killing the process on the
    spot, so that the half-written temporary folder is removed on the way out. Only when SIGTERM has its default
    action: a handler the application installed itself is left alone. SIGKILL cannot be caught; the sweep at the
    start of the next export removes what it leaves."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
            return fn(*args, **kwargs)
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return wrapper


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut short the cleanup of the first
    raise SystemExit(128 + signum)



def destination(out) -> Path:
    """Absolute, with the parent's symlinks and a trailing '..' resolved, but a symlinked OUT itself kept: replacing
    such an OUT replaces the link, never the folder it points to."""
    out = Path(out).absolute()
    if out.name == "..":
        out = out.resolve()
    return out.parent.resolve() / out.name



def check_destination(out: Path, force: bool, source, source_what: str, ours, ours_what: str) -> None:
    """Refuse an OUT that must not be written, before any work: a file; a folder that is protected() (it holds
    `source`, `source_what` in words, or is /, the current folder or one above it); a non-empty folder without
    `force`, or with it one that ours(OUT) says this tool did not write (`ours_what`: how such a folder is told);
    a parent that is missing or not writable."""
    if out.exists() and not out.is_dir():
        raise RWKVDeployError(f"{out} exists and is a file; choose a folder name for -o")
    if out.exists():
        why = protected(out, source, source_what)
        if why:
            raise RWKVDeployError(f"will not replace {out}: {why}; choose another -o (or remove it by hand)")
        if any(out.iterdir()):
            if not force:
                raise RWKVDeployError(f"{out} already exists and is not empty; pass --force to replace it")
            if not ours(out):
                raise RWKVDeployError(f"{out} is not {ours_what}, and --force replaces only those; remove it by "
                                      "hand or choose another -o")
    parent = out.parent
    if not parent.is_dir():
        raise RWKVDeployError(f"{parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RWKVDeployError(f"cannot write to {parent} (permission denied); choose another -o")


def protected(out: Path, source, what: str) -> str | None:
    """Why an existing OUT must never be replaced, or None: replacing deletes everything inside it. `source` is
    what is being read (`what`, in words: a checkpoint, an export folder), which OUT must not hold."""
    real = out.resolve()
    if real == Path(real.anchor):
        return "it is the root folder"
    try:
        cwd = Path.cwd().resolve()
        if real == cwd or real in cwd.parents:
            return "it is the current folder or one of its parents"
    except OSError:  # the current folder was deleted: nothing of it to protect
        pass
    for src in source_paths(source):
        if src == real or real in src.parents:
            return f"it holds {what} ({src})"
    return None


def source_paths(source) -> set[Path]:
    """The source as given and as resolved, and for a folder each file in it resolved too (in the HF cache an HF
    folder's files are links into a blobs folder elsewhere)."""
    src = Path(source).absolute()
    paths = {src.parent.resolve() / src.name}
    try:
        paths.add(src.resolve())
        if src.is_dir():
            paths.update(p.resolve() for p in src.iterdir())
    except (OSError, RuntimeError):  # unreadable folder, symlink loop: what we could resolve is checked
        pass
    return paths



# Temporary folders are named .{OUT}.tmp-{pid}-{host}-{random} (.old- for the fallback swap) so that a later export
# can tell whether their owner still runs. The host tag keeps one machine (or container, with its own pid space) from
# sweeping another's folders in a shared parent.
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_STALE = re.compile(r"^\..+\.(?:tmp|old)-(\d{1,10})-([0-9a-f]{8})-[A-Za-z0-9_]+$")


def owner() -> str:
    return f"{os.getpid()}-{HOST}"


def sweep_stale(parent: Path) -> None:
    """Remove temporary folders of runs into `parent` whose process is gone (SIGKILL, power loss)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or m.group(2) != HOST or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _running(pid):
            continue
        log.info("removing %s, left by a run (pid %d) that did not finish", entry.path, pid)
        shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would address our own process group
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid at all: leave it alone
        return True
    return True


def commit(tmp: Path, out: Path) -> None:
    """Put the finished folder at OUT. An existing OUT is exchanged with it in one atomic step, so that OUT always
    exists and is complete; the old contents, now at the temporary name, are deleted after."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    if exchange(tmp, out):
        remove(tmp)
        return
    # no renameat2 (old kernel, non-Linux, a filesystem without RENAME_EXCHANGE): two renames, with a short
    # moment in which OUT does not exist
    old = out.parent / f".{out.name}.old-{owner()}-{secrets.token_hex(4)}"
    with _signals_held():  # a signal between the renames would leave the old folder aside, to be swept
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
    remove(old)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE). False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # libc without it (glibc < 2.28, musl, macOS)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # kernel < 3.15, or the filesystem does not support exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def _signals_held():
    """Delay SIGINT/SIGTERM (they are delivered when the block ends)."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def remove(path: Path) -> None:
    """Delete a folder we wrote, best effort (what stays is swept later); a symlink (a replaced OUT that was one)
    is unlinked, never followed."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        with suppress(OSError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)
