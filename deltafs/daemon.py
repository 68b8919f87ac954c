"""The mount daemon's life: checks before it backgrounds, the trio main loop, shutdown.

Everything that can make a mount fail (a missing bucket, bad credentials, a missing or
busy mountpoint, an unusable cache directory) is checked in the foreground, so that
``deltafs mount`` exits non-zero with the reason. Without ``--foreground`` the process
forks; the parent returns only once the child reports the mountpoint live (it answered a
``stat``), or relays the child's error.
"""
from __future__ import annotations

import errno
import faulthandler
import fcntl
import hashlib
import logging
import logging.handlers
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from .api import make_engine
from .engine import Policy
from .errors import ConfigError, DeltafsError
from .fs import DeltaFS, Options, recover
from .journal import Journal
from .locations import Location
from .store.base import ObjectStore

log = logging.getLogger(__name__)

EXIT_MOUNTPOINT = 10
EXIT_CACHE = 11
EXIT_FUSE = 12


class MountError(DeltafsError):
    """The mountpoint is missing, busy, stale, or FUSE refused."""

    exit_code = EXIT_MOUNTPOINT


class CacheError(DeltafsError):
    """The cache directory cannot be used."""

    exit_code = EXIT_CACHE


@dataclass
class MountConfig:
    """Everything a mount needs, after parsing (CLI, mount helper or config file)."""

    source: Location
    mountpoint: Path
    cache_dir: Path | None = None
    cache_size: int = 10 << 30
    foreground: bool = False
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    allow_other: bool = False
    read_only: bool = False
    log_file: str | None = None
    debug: bool = False
    upload_concurrency: int = 4
    max_ratio: float = 0.75
    min_delta_size: int = 64 << 10
    listing_ttl: float = 30.0
    drain_timeout: float = 60.0
    fuse_options: list[str] = field(default_factory=list)


def default_mount_cache(source: str) -> Path:
    """One cache directory per source, so remounts find their journal and index."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    if os.getuid() == 0:
        base = Path("/var/cache/deltafs")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltafs"
    return base / "mounts" / digest


def check_mountpoint(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MountError(f"mountpoint {path} does not exist (create it with mkdir)") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"{path} holds a stale mount (its daemon died): run `fusermount3 -u {path}` "
                "and mount again") from None
        raise MountError(f"mountpoint {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mountpoint (unmount it first)")


def open_store(cfg: MountConfig, create: bool = True) -> ObjectStore:
    if cfg.source.is_s3:
        from .store.s3 import S3Store

        return S3Store(cfg.source.bucket, endpoint_url=cfg.endpoint_url,  # type: ignore[arg-type]
                       region=cfg.region, profile=cfg.profile)
    from .store.local import LocalStore

    assert cfg.source.root is not None
    return LocalStore(cfg.source.root, create=create)


def lock_cache(cache_dir: Path) -> IO[str]:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(cache_dir, 0o700)
        lock = open(cache_dir / "lock", "a+")
    except OSError as exc:
        raise CacheError(f"cache directory {cache_dir} is not usable: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CacheError(f"cache directory {cache_dir} is in use by another deltafs mount "
                         "(give each mount its own --cache-dir)") from None
    return lock


def setup_daemon_logging(cfg: MountConfig, cache_dir: Path) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    target = cfg.log_file
    handler: logging.Handler
    if target == "syslog":
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("deltafs[%(process)d]: %(levelname)s %(message)s"))
    elif target == "stderr" or (target is None and cfg.foreground):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
    else:
        handler = logging.FileHandler(target or cache_dir / "deltafs.log")
        handler.setFormatter(fmt)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if cfg.debug else logging.WARNING)


def mount(cfg: MountConfig) -> int:
    """Check, (fork,) mount and serve until unmounted. Returns the exit code."""
    cfg.mountpoint = cfg.mountpoint.absolute()
    check_mountpoint(cfg.mountpoint)
    store = open_store(cfg)
    store.check()
    source = str(cfg.source)
    cache_dir = cfg.cache_dir or default_mount_cache(source)
    lock = lock_cache(cache_dir)
    Journal(cache_dir / "state.db", source).close()  # fails now if it belongs elsewhere
    if cfg.foreground:
        setup_daemon_logging(cfg, cache_dir)
        return serve(cfg, cache_dir, lock, ready_fd=None)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return _wait_for_child(read_fd, pid, cfg.mountpoint)
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    setup_daemon_logging(cfg, cache_dir)
    try:
        code = serve(cfg, cache_dir, lock, ready_fd=write_fd)
    except BaseException as exc:  # noqa: BLE001 - the parent must hear of it
        log.exception("mount failed")
        _report(write_fd, f"ERR {getattr(exc, 'exit_code', 1)} {exc}")
        code = getattr(exc, "exit_code", 1)
    os._exit(code)


def _wait_for_child(read_fd: int, pid: int, mountpoint: Path) -> int:
    with os.fdopen(read_fd) as r:
        line = r.readline().strip()
    if line == "OK":
        return 0
    if line.startswith("ERR "):
        _, code, msg = line.split(" ", 2)
        print(f"deltafs: {msg}", file=sys.stderr)
        return int(code)
    _, status = os.waitpid(pid, 0)
    print(f"deltafs: the mount daemon exited before the mount was live "
          f"(status {status}); see its log", file=sys.stderr)
    return EXIT_FUSE


def _report(fd: int | None, text: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (text + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def serve(cfg: MountConfig, cache_dir: Path, lock: IO[str], ready_fd: int | None) -> int:
    """Run the filesystem in this process until it is unmounted or signalled."""
    import pyfuse3

    faulthandler.register(signal.SIGUSR1, file=_log_stream(), all_threads=True)
    store = open_store(cfg)
    policy = Policy(min_delta_size=cfg.min_delta_size, max_ratio=cfg.max_ratio)
    engine = make_engine(store, cache_dir, cfg.cache_size, policy)
    journal = Journal(cache_dir / "state.db", str(cfg.source))
    files_dir = cache_dir / "files"
    files_dir.mkdir(exist_ok=True, mode=0o700)
    for stale in engine.tmp_dir.iterdir():
        _remove(stale)
    pending = recover(journal, files_dir)
    if pending:
        log.info("replaying %d pending changes from the journal", pending)
    options = Options(listing_ttl=cfg.listing_ttl, read_only=cfg.read_only)
    fs = DeltaFS(engine, journal, engine.cache, cfg.source.key.strip("/"), files_dir, options,
                 str(cfg.source))
    fs.writeback.limiter.total_tokens = cfg.upload_concurrency
    fuse_opts = set(pyfuse3.default_options)
    fuse_opts.add(f"fsname=deltafs:{cfg.source}"[:200])
    fuse_opts.add("subtype=deltafs")
    if cfg.allow_other:
        fuse_opts.add("allow_other")
    if cfg.read_only:
        fuse_opts.add("ro")
    fuse_opts.update(cfg.fuse_options)
    try:
        pyfuse3.init(fs, str(cfg.mountpoint), fuse_opts)
    except RuntimeError as exc:
        journal.close()
        raise MountError(f"cannot mount on {cfg.mountpoint}: {exc}") from None
    log.info("mounted %s on %s (cache %s)", cfg.source, cfg.mountpoint, cache_dir)
    code = 0
    try:
        trio.run(_main, fs, cfg, ready_fd)
    except BaseException:
        log.exception("the filesystem loop failed")
        code = 1
        raise
    finally:
        try:
            pyfuse3.close(unmount=True)
        except Exception:  # noqa: BLE001
            log.debug("close", exc_info=True)
        journal.close()
        lock.close()
        log.info("deltafs exited")
    return code


def _log_stream() -> Any:
    for h in logging.getLogger().handlers:
        stream = getattr(h, "stream", None)
        if stream is not None:
            return stream
    return sys.stderr


def _remove(p: Path) -> None:
    if p.is_dir():
        for c in p.iterdir():
            _remove(c)
        p.rmdir()
    else:
        p.unlink(missing_ok=True)


async def _main(fs: DeltaFS, cfg: MountConfig, ready_fd: int | None) -> None:
    import pyfuse3

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.writeback.run)
        nursery.start_soon(fs.committer)
        nursery.start_soon(_announce_ready, cfg.mountpoint, ready_fd)
        nursery.start_soon(_signals, fs, cfg)
        await pyfuse3.main()
        # unmounted (fusermount3 -u, or terminate() after a signal): finish uploads
        log.info("unmounted; finishing uploads (at most %.0f s)", cfg.drain_timeout)
        fs.options.read_only = True
        done = await fs.writeback.drain(cfg.drain_timeout)
        if not done:
            files, nbytes = fs.journal.pending()
            log.warning("%d changes (%d bytes) still pending; the next mount uploads them",
                        files, nbytes)
        nursery.cancel_scope.cancel()


async def _announce_ready(mountpoint: Path, ready_fd: int | None) -> None:
    """READY only once the kernel routes a stat of the mountpoint to us."""

    def probe() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if os.path.ismount(mountpoint):
                os.stat(mountpoint)
                return
            time.sleep(0.05)
        raise MountError(f"{mountpoint} did not become a mount within 30 s")

    try:
        await trio.to_thread.run_sync(probe)
    except (MountError, OSError) as exc:
        _report(ready_fd, f"ERR {EXIT_FUSE} {exc}")
        return
    _report(ready_fd, "OK")
    from .notify import notify

    notify("READY=1\nSTATUS=mounted")


async def _signals(fs: DeltaFS, cfg: MountConfig) -> None:
    """SIGTERM/SIGINT: stop taking writes, drain within the bound, unmount, exit 0."""
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: draining uploads (at most %.0f s), then unmounting",
                     signum, cfg.drain_timeout)
            fs.options.read_only = True
            from .notify import notify

            async def report() -> None:
                while True:
                    files, nbytes = fs.journal.pending()
                    notify(f"STATUS=draining: {files} pending ({nbytes} bytes)")
                    await trio.sleep(1)

            async with trio.open_nursery() as n:
                n.start_soon(report)
                await fs.writeback.drain(cfg.drain_timeout)
                n.cancel_scope.cancel()
            notify("STOPPING=1")
            threading.Thread(target=_lazy_unmount, args=(cfg.mountpoint,), daemon=True).start()
            return


def _lazy_unmount(mountpoint: Path) -> None:
    import subprocess

    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


__all__ = ["MountConfig", "mount", "ConfigError"]
