# -*- test-case-name: tests.test_files -*-
"""``/files``: a kernel's working directory over HTTP, and the notices of
the files its code writes.

    GET /files/<kernel id>/             -> {"files": [{"name", "size", "modified"}], ...}
    GET /files/<kernel id>/<name>       -> the bytes, as an attachment
    PUT /files/<kernel id>/<name>       (raw body) -> 201 {"name", "size"}

<name> is a relative path with ``/`` between components (percent-encoded
like any URL path). Names that are absolute or contain ``..``, ``.`` or
empty components are refused with 400, and names that lead outside the
directory through a symlink (which kernel code can make) with 403.

File system work runs in threads, never in the reactor. Uploads are copied
from twisted.web's temporary file, downloads are sent by a producer: no file
is ever held in memory whole. Files are never served as active content in
the server's origin: every download is ``Content-Disposition: attachment``
with ``X-Content-Type-Options: nosniff`` and a sandboxing CSP.

Hidden names (a component starting with ``.``, e.g. IPython's ``.ipython/``)
are left out of listings and notices, but can be fetched by name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import urllib.parse
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.web import server

from cellmux.protocol import Channel

from .kernels import AFTER_RESPONSE, Kernel, KernelManager, KernelNotRunning
from .remotefiles import RemoteFiles
from .webjson import NOT_DONE, HTTPError, JSONEndpoint, Route

__all__ = [
    "FileNotices",
    "FilesResource",
    "open_inside",
    "resolve_inside",
    "scan",
    "split_name",
]

#: Most files a listing, a notice or a one-shot result names; a kernel that
#: writes more gets the first ones and ``"truncated": true``.
MAX_SCAN_FILES = 10_000
#: Longest name accepted, as on Linux (PATH_MAX, NAME_MAX).
MAX_NAME = 4096
MAX_COMPONENT = 255
#: Bytes copied per step when storing an upload.
COPY_CHUNK = 1024 * 1024

Snapshot = dict[str, tuple[int, int]]


def split_name(name: str) -> list[str]:
    """The components of a file name from a URL, checked.

    @raise HTTPError: 400 for an empty, absolute, or climbing name.
    """
    if not name:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "a file name is required")
    if "\x00" in name:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "file names may not contain NUL")
    if name.startswith("/"):
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"absolute paths are refused: {name!r}")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise HTTPError(
            HTTPStatus.BAD_REQUEST,
            f"'..', '.' and empty path components are refused: {name!r}",
        )
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME or any(
        len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for p in parts
    ):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "file name too long")
    return parts


def resolve_inside(root: str, parts: list[str]) -> str:
    """The real path of C{parts} under C{root}, symlinks followed.

    @raise HTTPError: 403 if that is outside C{root}.
    """
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, *parts))
    if os.path.commonpath([real_root, target]) != real_root:
        raise HTTPError(
            HTTPStatus.FORBIDDEN,
            f"{'/'.join(parts)!r} leads outside the kernel's directory (a symlink)",
        )
    return target


#: Files deeper than this many directories are not announced (a kernel's
#: deep tree must not make every scan walk it, nor overflow a path).
MAX_SCAN_DEPTH = 32


def _walk(root: str, max_depth: int | None):
    """The entries of C{root} and of the directories under it and the directories under it,
    iteratively (a deep tree costs no recursion), hidden directories skipped,
    symlinks not followed, at most C{max_depth} levels down."""
    stack = [(root, 0)]
    while stack:
        path, depth = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # gone, or too deep a path to name
        yield entries
        if max_depth is not None and depth >= max_depth:
            continue
        for entry in reversed(entries):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                    stack.append((entry.path, depth + 1))


def scan(root: str, limit: int = MAX_SCAN_FILES) -> tuple[Snapshot, bool]:
    """Size and mtime of every regular, non-hidden file under C{root}.

    Symlinks are neither followed nor listed, nor is anything more than
    L{MAX_SCAN_DEPTH} directories down. Blocking: call it in a thread.

    @return: the snapshot by relative name, and whether C{limit} cut it short.
    """
    found: Snapshot = {}
    for entries in _walk(root, MAX_SCAN_DEPTH):
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone since the listing
            if not stat.S_ISREG(st.st_mode):
                continue
            found[os.path.relpath(entry.path, root)] = (st.st_size, st.st_mtime_ns)
            if len(found) >= limit:
                return found, True
    return found, False


def _usage(root: str) -> int:
    """Apparent bytes of every regular file under C{root}, hidden ones too
    (as deep as a path can name them: the nursery's disk limit, which
    counts blocks at any depth, is the hard bound)."""
    total = 0
    stack = [root]
    while stack:
        path = stack.pop()
        with contextlib.suppress(OSError), os.scandir(path) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        total += st.st_size
                    elif stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
    return total


def _give(fd: int, owner: os.stat_result, mode: int) -> None:
    """Hand a file the server made to the kernel's user: a kernel under its
    own uid (the server runs as root) must be able to read and replace it."""
    os.fchmod(fd, mode)
    if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
        os.fchown(fd, owner.st_uid, owner.st_gid)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(root: str, parts: list[str], *, create_as: os.stat_result | None = None) -> int:
    """A descriptor of the directory C{root/parts…}, opened one component at
    a time relative to the last and never through a symlink.

    C{resolve_inside} gives the clear error for a link out of the directory;
    this walk makes the check hold even if kernel code swaps a directory for
    a link between the check and the use (the server may run as root).

    @param create_as: create missing directories, owned like this.
    @raise HTTPError: 403 for a symlink on the way, 409 for a file in the way.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            created = False
            if create_as is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                    created = True
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no directory {part!r}") from None
            except OSError:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise HTTPError(
                        HTTPStatus.FORBIDDEN, f"{part!r} changed into a symlink; refused"
                    ) from None
                raise HTTPError(HTTPStatus.CONFLICT, f"a file is in the way: {part!r}") from None
            if created and create_as is not None:
                _give(child, create_as, 0o700)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_inside(root: str, parts: list[str]) -> int:
    """A read-only descriptor of the regular file C{root/parts…}, reached
    without following any symlink.

    @raise HTTPError: 404 if it is missing, 400 if it is not a regular file,
        403 for a symlink.
    """
    name = "/".join(parts)
    if not parts:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "that is the kernel's directory, not a file")
    dir_fd = _open_dir(root, parts[:-1])
    try:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no file {name!r}") from None
    except OSError as e:
        raise HTTPError(HTTPStatus.FORBIDDEN, f"cannot open {name!r}: {e.strerror}") from None
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{name!r} is not a regular file")
    return fd


def _inside_parts(root: str, parts: list[str]) -> list[str]:
    """C{parts} with symlinks inside the directory resolved (403 for outside)."""
    real_root = os.path.realpath(root)
    relative = os.path.relpath(resolve_inside(real_root, parts), real_root)
    return [] if relative == "." else relative.split("/")


def _store_upload(root: str, parts: list[str], content, quota: int) -> tuple[str, int, int]:
    """Copy an upload into place (blocking: runs in a thread).

    Written to a hidden temporary file next to the target and renamed over
    it, so the kernel never sees half a file, and a symlink at the target's
    name is replaced rather than followed.
    """
    real_root = os.path.realpath(root)
    owner = os.lstat(real_root)
    content.seek(0, os.SEEK_END)
    size = content.tell()
    content.seek(0)
    existing = 0
    with contextlib.suppress(OSError):
        st = os.lstat(os.path.join(real_root, *parts))
        if stat.S_ISDIR(st.st_mode):
            raise HTTPError(HTTPStatus.CONFLICT, f"{'/'.join(parts)!r} is a directory")
        if stat.S_ISREG(st.st_mode):
            existing = st.st_size
    used = _usage(real_root)
    if used - existing + size > quota:
        raise HTTPError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the kernel's directory would exceed its quota of {quota} bytes "
            f"({used} used, upload of {size})",
        )
    dir_parts = _inside_parts(real_root, parts[:-1])
    dir_fd = _open_dir(real_root, dir_parts, create_as=owner)
    try:
        temporary = f".cellmux-upload-{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(content, out, COPY_CHUNK)
                _give(out.fileno(), owner, 0o644)
            os.replace(temporary, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except IsADirectoryError:
            os.unlink(temporary, dir_fd=dir_fd)
            raise HTTPError(HTTPStatus.CONFLICT, f"{'/'.join(parts)!r} is a directory") from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
            raise
        st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.close(dir_fd)
    return "/".join([*dir_parts, parts[-1]]), st.st_size, st.st_mtime_ns


def _content_disposition(name: str) -> bytes:
    base = name.rsplit("/", 1)[-1]
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in base
    )
    quoted = urllib.parse.quote(base, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quoted}".encode()


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat()


def _where(kernel: Kernel) -> str | None:
    """What tells one process's directory from another's: its path here,
    or its host and link (None while no process runs)."""
    inc = kernel.incarnation
    if inc is None:
        return None
    if inc.host is not None:
        return f"{inc.host}:{inc.link}"
    return inc.workdir or None


def _remote_files(manager: KernelManager) -> RemoteFiles:
    """The relay of files on kernel hosts (a kernel runs on one only when
    the server has them)."""
    if manager.hosts is None:
        raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "this server has no kernel hosts")
    return manager.hosts.files


def _scan_of(manager: KernelManager, kernel: Kernel) -> Any:
    """A Deferred scan of the kernel's directory, here or on its host."""
    inc = kernel.incarnation
    if inc is not None and inc.host is not None:
        return defer.ensureDeferred(_remote_files(manager).listing(inc.host, inc.link))
    if inc is None or not inc.workdir:
        return defer.fail(RuntimeError("the kernel has no process"))
    return threads.deferToThread(scan, inc.workdir)


class FileNotices:
    """After each execution, tells a kernel's clients which files are new or
    changed, on the files channel.

    Called by the manager (an idle listener) with each kernel that went idle;
    scans its directory in a thread and compares with the last scan. One scan
    per kernel at a time; idles that arrive during a scan cause one more.
    """

    log = Logger()

    def __init__(self, manager: KernelManager) -> None:
        self.manager = manager
        # kernel id -> (working directory, last snapshot): a restart gives a
        # new directory, which starts from nothing.
        self._snapshots: dict[str, tuple[str, Snapshot]] = {}
        self._scanning: dict[str, bool] = {}  # kernel id -> another scan wanted

    def __call__(self, kernel: Kernel) -> None:
        if kernel.id in self._scanning:
            self._scanning[kernel.id] = True
            return
        if not _where(kernel):
            return
        self._scanning[kernel.id] = False
        # Not in this turn: the reply and the idle that came with it are
        # written to the clients on the reactor's next poll, and a scan
        # started now took the GIL and a core from them (its thread ran as
        # the reply of a new kernel's first cell went out).
        self.manager.clock.callLater(AFTER_RESPONSE, self._scan, kernel)

    def _scan(self, kernel: Kernel) -> None:
        workdir = _where(kernel)
        if not workdir or kernel.id not in self.manager.kernels:
            self._scanning.pop(kernel.id, None)
            return
        d = _scan_of(self.manager, kernel)
        d.addCallback(self._compare, kernel, workdir)
        d.addErrback(self._scan_failed, workdir)
        d.addBoth(self._scanned, kernel)

    def _scan_failed(self, failure: Any, workdir: str) -> None:
        if failure.check(HTTPError):  # a kernel host's answer: no traceback
            self.log.warn("scanning {dir} failed: {e}", dir=workdir, e=failure.value.message)
            return
        self.log.failure("scanning {dir} failed", failure, dir=workdir)

    def _scanned(self, _result: Any, kernel: Kernel) -> None:
        again = self._scanning.pop(kernel.id, False)
        if again and kernel.id in self.manager.kernels:
            self(kernel)

    def _compare(self, scanned: tuple[Snapshot, bool], kernel: Kernel, workdir: str) -> None:
        snapshot, truncated = scanned
        old_dir, old = self._snapshots.get(kernel.id, ("", {}))
        if old_dir != workdir:
            old = {}
        for gone in [k for k in self._snapshots if k not in self.manager.kernels]:
            del self._snapshots[gone]
        if kernel.id not in self.manager.kernels or _where(kernel) != workdir:
            return  # deleted or restarted while scanning
        self._snapshots[kernel.id] = (workdir, snapshot)
        new = [n for n in snapshot if n not in old]
        changed = [n for n in snapshot if n in old and old[n] != snapshot[n]]
        if not new and not changed:
            return

        def entry(name: str) -> dict[str, Any]:
            size, mtime = snapshot[name]
            url = f"/files/{kernel.id}/{urllib.parse.quote(name)}"
            return {"name": name, "size": size, "modified": _iso(mtime), "url": url}

        kernel.publish(
            Channel.FILES,
            "cellmux_files",
            {
                "new": [entry(n) for n in new],
                "changed": [entry(n) for n in changed],
                "truncated": truncated,
            },
        )

    def uploaded(self, kernel: Kernel, workdir: str, name: str, size: int, mtime: int) -> None:
        """An upload is not news about the kernel's code: remember it as seen."""
        old_dir, snapshot = self._snapshots.get(kernel.id, ("", {}))
        if old_dir != workdir:
            snapshot = {}
        snapshot = {**snapshot, name: (size, mtime)}
        self._snapshots[kernel.id] = (workdir, snapshot)


class FilesResource(JSONEndpoint):
    """Everything under ``/files``."""

    log = Logger()

    def __init__(self, manager: KernelManager, auth, notices: FileNotices) -> None:
        self.manager = manager
        self.notices = notices
        kid = r"(?P<kernel_id>[^/]+)"
        super().__init__(
            auth,
            [
                Route(b"GET", rf"/files/{kid}/?", self.list_files),
                Route(b"GET", rf"/files/{kid}/(?P<name>.+)", self.download),
                Route(b"HEAD", rf"/files/{kid}/(?P<name>.+)", self.download),
                Route(b"PUT", rf"/files/{kid}/(?P<name>.+)", self.upload),
            ],
        )

    def _remote(self, kernel_id: str) -> tuple[Kernel, str, str] | None:
        """(kernel, host, link) of a kernel running on a kernel host, whose
        directory is on that machine (docs/scaling.md, Kernel hosts)."""
        kernel = self.manager.get(kernel_id)
        inc = kernel.incarnation
        if inc is None or inc.host is None:
            if kernel.host is not None:
                raise KernelNotRunning(f"kernel is {kernel.state.value}: no working directory")
            return None
        if self.manager.hosts is None:
            raise KernelNotRunning(f"kernel runs on kernel host {inc.host}, unknown here")
        return kernel, inc.host, inc.link

    def _workdir(self, kernel_id: str) -> tuple[Kernel, str]:
        kernel = self.manager.get(kernel_id)
        workdir = kernel.workdir
        if not workdir or not os.path.isdir(workdir):
            raise KernelNotRunning(f"kernel is {kernel.state.value}: no working directory")
        return kernel, workdir

    @staticmethod
    def _name(raw: str) -> tuple[str, list[str]]:
        try:
            name = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "file names must be UTF-8") from None
        return name, split_name(name)

    async def list_files(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        remote = self._remote(kernel_id)
        if remote is not None:
            _kernel, host, link = remote
            snapshot, truncated = await _remote_files(self.manager).listing(host, link)
        else:
            _kernel, workdir = self._workdir(kernel_id)
            snapshot, truncated = await threads.deferToThread(scan, workdir)
        files = [
            {"name": name, "size": size, "modified": _iso(mtime)}
            for name, (size, mtime) in sorted(snapshot.items())
        ]
        return HTTPStatus.OK, {"files": files, "truncated": truncated}

    async def upload(self, request: server.Request, kernel_id: str, name: str) -> tuple[int, Any]:
        name, parts = self._name(name)
        quota = self.manager.config.kernel_quota
        remote = self._remote(kernel_id)
        if remote is not None:
            kernel, host, link = remote
            where = _where(kernel)
            content = request.content
            if content is None:  # twisted.web sets it for every request it hands on
                raise HTTPError(HTTPStatus.BAD_REQUEST, "the upload has no body")
            stored = await _remote_files(self.manager).upload(host, link, name, content, quota)
            if where is not None:
                self.notices.uploaded(kernel, where, stored.name, stored.size, stored.mtime)
            return HTTPStatus.CREATED, {"name": "/".join(parts), "size": stored.size}
        kernel, workdir = self._workdir(kernel_id)
        try:
            real_name, size, mtime = await threads.deferToThread(
                _store_upload, workdir, parts, request.content, quota
            )
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Nothing of it was kept (the partial file is removed).
            raise HTTPError(
                HTTPStatus.INSUFFICIENT_STORAGE,
                "no space left on the disk of kernel files; the upload was not stored",
            ) from None
        self.notices.uploaded(kernel, workdir, real_name, size, mtime)
        return HTTPStatus.CREATED, {"name": "/".join(parts), "size": size}

    @staticmethod
    def _download_headers(request: server.Request, name: str, size: int) -> None:
        request.setResponseCode(HTTPStatus.OK)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(size).encode())
        request.setHeader(b"content-disposition", _content_disposition(name))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", b"sandbox; default-src 'none'")
        request.setHeader(b"cache-control", b"no-store")

    async def _download_remote(
        self, request: server.Request, name: str, host: str, link: str
    ) -> Any:
        def start(size: int) -> server.Request | None:
            if request._disconnected:  # it left while the host answered
                return None
            self._download_headers(request, name, size)
            if request.method == b"HEAD":
                return None
            return request

        started = await _remote_files(self.manager).download(host, link, name, start)
        if started is None:  # HEAD, or nobody to send it to
            if not request._disconnected:
                request.finish()
            return NOT_DONE
        _transfer, complete = started
        try:
            await complete
        except Exception as e:
            # The status is out: cut the response short, so the client sees
            # fewer bytes than Content-Length rather than a whole file.
            self.log.warn(
                "download of {name} from {host} cut short: {e}", name=name, host=host, e=e
            )
            request.unregisterProducer()
            transport = request.channel.transport if request.channel is not None else None
            if not request._disconnected and transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]  # a TCP transport
            return NOT_DONE
        request.unregisterProducer()
        if not request._disconnected and not request.finished:
            request.finish()
        return NOT_DONE

    async def download(self, request: server.Request, kernel_id: str, name: str) -> Any:
        name, parts = self._name(name)
        remote = self._remote(kernel_id)
        if remote is not None:
            _kernel, host, link = remote
            return await self._download_remote(request, name, host, link)
        _kernel, workdir = self._workdir(kernel_id)
        fd = open_inside(workdir, _inside_parts(workdir, parts))
        st = os.fstat(fd)
        f = os.fdopen(fd, "rb")
        self._download_headers(request, name, st.st_size)
        if request.method == b"HEAD":
            f.close()
            request.finish()
            return NOT_DONE
        d = FileSender().beginFileTransfer(f, request)

        def sent(_ignored: Any) -> None:
            if not request._disconnected and not request.finished:
                request.finish()

        d.addCallbacks(sent, lambda _failure: None)  # an aborted download
        d.addBoth(lambda _: f.close())
        await d
        return NOT_DONE
