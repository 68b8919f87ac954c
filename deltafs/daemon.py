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
import gc
import hashlib
import logging
import logging.handlers
import os
import shutil
import signal
import sqlite3
import stat
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import trio

from .config import MountConfig
from .errors import ConfigError, DeltafsError
from .content import recover
from .fs import DeltaFS, Options
from .journal import Journal
from . import membudget, memtrim, priority, wiring
from .gatecontrol import GateControl
from .loopstall import SlowSteps
from .store.base import ObjectStore

log = logging.getLogger(__name__)
#: the GIL switch interval of the daemon (seconds; see ``serve``)
SWITCH_INTERVAL = 0.001

#: exit codes of a mount (README "exit" table, TROUBLESHOOTING.md): 2 bad usage or config,
#: 5 no bucket, 6 bad credentials, 7 endpoint unreachable (deltafs.errors), and these
EXIT_MOUNTPOINT = 10
EXIT_CACHE = 11
EXIT_FUSE = 12
EXIT_STALE = 13
#: after the drain bound, seconds before a daemon stuck in an upload exits anyway
STOP_GRACE = 2.0


class MountError(DeltafsError):
    """The mountpoint is missing, busy, stale, or FUSE refused."""

    exit_code = EXIT_MOUNTPOINT


class StaleMount(MountError):
    """A dead FUSE mount (its daemon died) sits on the mountpoint."""

    exit_code = EXIT_STALE


class FuseRefused(MountError):
    """libfuse or the kernel refused the mount (options, /dev/fuse, permissions)."""

    exit_code = EXIT_FUSE


class CacheError(DeltafsError):
    """The cache directory cannot be used."""

    exit_code = EXIT_CACHE


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
            raise StaleMount(
                f"{path} holds a stale mount (its daemon died): run `fusermount3 -u {path}` "
                "and mount again") from None
        raise MountError(f"mountpoint {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mountpoint (unmount it first)")


#: attempts of the mount-time bucket check: enough for a blip, few enough that a dead
#: endpoint fails the mount in seconds (the daemon's own store keeps the full retries)
CHECK_ATTEMPTS = 2
#: the start's bucket check waits this long for an answer (per attempt; botocore makes
#: CHECK_ATTEMPTS + 1 of them): an endpoint that takes the connection and never answers
#: fails the start with exit 7 after ~31 s (measured), well inside systemd's 90 s start
#: timeout (deltafs@.service); with the daemon's own 60 s it took 241 s (issue 13)
CHECK_READ_TIMEOUT = 10.0


def open_store(cfg: MountConfig, create: bool = True,
               max_attempts: int | None = None,
               read_timeout: float | None = None) -> ObjectStore:
    """The mount's store (``mount`` has applied ``credentials_file`` to the profile)."""
    settings = {k: getattr(cfg, k) for k in wiring.STORE_SETTINGS if k != "credentials_file"}
    return wiring.open_store(cfg.source, settings, create=create, max_attempts=max_attempts,
                             read_timeout=read_timeout)


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
    target = "syslog" if cfg.log_file == "journal" else cfg.log_file
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


def check_log_target(cfg: MountConfig) -> None:
    """Fail before forking when the log cannot be written (the daemon would be mute)."""
    target = cfg.log_file
    if target in ("syslog", "journal"):
        if not os.path.exists("/dev/log"):
            raise ConfigError("log target syslog: /dev/log does not exist (no syslog or "
                              "journald socket); use a file or stderr")
    elif target not in (None, "stderr"):
        try:
            with open(target, "a"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot write the log file {target}: {exc.strerror}") from None


def mount(cfg: MountConfig) -> int:
    """Check, (fork,) mount and serve until unmounted. Returns the exit code."""
    cfg.mountpoint = cfg.mountpoint.absolute()
    if cfg.metrics_textfile:  # the daemon runs in /
        cfg.metrics_textfile = os.path.abspath(cfg.metrics_textfile)
    check_log_target(cfg)
    if cfg.credentials_file:
        from .config import use_credentials_file

        cfg.profile = use_credentials_file(cfg.credentials_file, cfg.profile)
    check_mountpoint(cfg.mountpoint)
    from .codec import xdelta3_path

    xdelta3_path()  # exit 9 now rather than failed uploads later
    store = open_store(cfg, max_attempts=CHECK_ATTEMPTS, read_timeout=CHECK_READ_TIMEOUT)
    store.check()
    source = str(cfg.source)
    cache_dir = (cfg.cache_dir or default_mount_cache(source)).absolute()
    lock = lock_cache(cache_dir)
    try:
        Journal(cache_dir / "state.db", source).close()  # fails now if it belongs elsewhere
    except ConfigError as exc:
        raise CacheError(str(exc)) from None
    except sqlite3.Error as exc:
        raise CacheError(f"cache directory {cache_dir}: the journal state.db is unusable: "
                         f"{exc}") from None
    if cfg.foreground:
        setup_daemon_logging(cfg, cache_dir)
        return serve(cfg, cache_dir, lock, ready_fd=None)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return _wait_for_child(read_fd, pid)
    os.close(read_fd)
    os.setsid()
    os.chdir("/")  # hold no directory busy
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        setup_daemon_logging(cfg, cache_dir)
        stream = _log_stream()
        if stream is not sys.stderr:  # libfuse and C-level messages go to the log too
            os.dup2(stream.fileno(), 2)
        code = serve(cfg, cache_dir, lock, ready_fd=write_fd)
    except BaseException as exc:  # noqa: BLE001 - the parent must hear of it
        if isinstance(exc, DeltafsError):
            log.error("mount failed: %s", exc)
        else:
            log.exception("mount failed")
        _report(write_fd, f"ERR {getattr(exc, 'exit_code', 1)} {exc}")
        code = getattr(exc, "exit_code", 1)
    os._exit(code)


def _wait_for_child(read_fd: int, pid: int) -> int:
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

    memtrim.fix_mmap_threshold()
    # Every journal query on the trio thread gives the GIL up (sqlite3 releases it around
    # each step) and, while a worker thread runs Python (boto3, a manifest being built),
    # waits up to a switch interval to get it back: at the default 5 ms, a create of ~30
    # queries took 100-140 ms while a 100,000-entry manifest was encoded; at 1 ms none
    # went over 73 ms (issue 11). The workers pay a few more switches.
    sys.setswitchinterval(SWITCH_INTERVAL)
    stacks = _stack_stream(cfg, cache_dir)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    log.info("pid %d; `kill -USR1 %d` dumps every stack to %s", os.getpid(), os.getpid(),
             getattr(stacks, "name", "the log"))
    budget = membudget.configure(cfg.memory_limit or None)
    log.info("memory limit %s (the daemon and its xdelta3 children)",
             f"{cfg.memory_limit >> 20} MiB" if budget.limit else "off")
    store = open_store(cfg)
    engine = wiring.engine(store, vars(cfg), cache_dir)
    journal = Journal(cache_dir / "state.db", str(cfg.source))
    files_dir = cache_dir / "files"
    files_dir.mkdir(exist_ok=True, mode=0o700)
    for stale in engine.tmp_dir.iterdir():
        _remove(stale)
    engine.cache.keep_reserve()
    pending = recover(journal, files_dir)
    if pending:
        log.info("replaying %d pending changes from the journal", pending)
    # strict mode writes nothing DeltaGlider's `ls` would show as a file (manifests are
    # still read where other mounts wrote them)
    options = Options(listing_ttl=cfg.listing_ttl, read_only=cfg.read_only,
                      write_manifests=cfg.format != "deltaglider")
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
        where = "on stderr" if _log_stream() is sys.stderr else "in the daemon log"
        raise FuseRefused(f"cannot mount on {cfg.mountpoint}: {exc} (FUSE refused; libfuse "
                          f"said why {where}: /dev/fuse missing? a bad FUSE option?)"
                          ) from None
    log.info("mounted %s on %s (cache %s)", cfg.source, cfg.mountpoint, cache_dir)
    stop = _Stop(cfg.mountpoint, journal)
    code = 0
    # What exists now (boto3's service models, every imported module: ~10^5 objects)
    # lives as long as the mount: out of the collector's sight, a full collection on the
    # event-loop thread scans only what the mount made since (measured: 60-100 ms pauses
    # every few seconds during a 100,000-file copy without this).
    gc.collect()
    gc.freeze()
    try:
        instruments = SlowSteps.from_env()
        for inst in instruments:
            inst.name_ops(fs, [n for n in dir(pyfuse3.Operations) if not n.startswith("_")])
            inst.journal_timing = journal.timing
            journal.slow_hold = inst.limit  # and slow commits by the same measure
        # the loop's thread (this one) first for a core; the threads it starts are not
        fs.loop_nice = priority.raise_this_thread()
        trio.run(_main, fs, cfg, ready_fd, stop, instruments=instruments)
    except DeltafsError as exc:
        # a start check that failed inside the loop (a metrics port in use): one line,
        # the caller reports it with its exit code
        log.debug("the filesystem loop ended: %s", exc, exc_info=True)
        code = exc.exit_code
        raise
    except BaseException:
        log.exception("the filesystem loop failed")
        code = 1
        raise
    finally:
        priority.restore()  # what this thread starts from here (fusermount3) is not boosted
        try:
            pyfuse3.close(unmount=True)
        except Exception:  # noqa: BLE001
            log.debug("close", exc_info=True)
        journal.close()
        lock.close()
        stop.finished.set()
        log.info("deltafs exited")
    return code or stop.exit_code


def _log_stream() -> Any:
    for h in logging.getLogger().handlers:
        stream = getattr(h, "stream", None)
        if stream is not None:
            return stream
    return sys.stderr


def _stack_stream(cfg: MountConfig, cache_dir: Path) -> Any:
    """Where SIGUSR1 writes the stacks: the log file or stderr; with syslog (no stream),
    stderr in the foreground (systemd's journal), else ``CACHE_DIR/stacks.log``."""
    stream = _log_stream()
    if stream is sys.stderr and not cfg.foreground and cfg.log_file == "syslog":
        return open(cache_dir / "stacks.log", "a")  # noqa: SIM115 - held for the process
    return stream


def _remove(p: Path) -> None:
    if p.is_dir():
        for c in p.iterdir():
            _remove(c)
        p.rmdir()
    else:
        p.unlink(missing_ok=True)


class _Stop:
    """The shutdown bound: once a stop begins (a signal, or an unmount), the daemon is
    gone ``drain_timeout`` seconds later, whatever it was doing. A watchdog thread makes
    it so even when an upload thread is stuck in a network call: the journal keeps every
    closed file, so exiting then loses nothing that was not also safe from ``kill -9``."""

    def __init__(self, mountpoint: Path, journal: Journal) -> None:
        self.mountpoint = mountpoint
        self.journal = journal
        self.deadline: float | None = None  # time.monotonic()
        self.hurry = False
        self.finished = threading.Event()
        self.gone = threading.Event()  # the FUSE loop ended (seen from threads)
        self.exit_code = 0
        self.unmounted = trio.Event()
        self.drain_scope: trio.CancelScope | None = None

    @property
    def begun(self) -> bool:
        return self.deadline is not None

    def begin(self, timeout: float) -> None:
        if self.deadline is not None:
            return
        self.deadline = time.monotonic() + timeout
        threading.Thread(target=self._watchdog, args=(timeout + STOP_GRACE,),
                         name="deltafs-stop-watchdog", daemon=True).start()

    def hurry_now(self) -> None:
        """Stop waiting for uploads (``deltafs umount --timeout`` ran out): the daemon is
        gone within a few seconds even if an upload thread is stuck in a network call."""
        self.hurry = True
        if self.drain_scope is not None:
            self.drain_scope.cancel()
        threading.Thread(target=self._watchdog, args=(STOP_GRACE + 3,),
                         name="deltafs-hurry-watchdog", daemon=True).start()

    def remaining(self) -> float:
        if self.deadline is None or self.hurry:
            return 0.0
        return max(0.0, self.deadline - time.monotonic())

    def _watchdog(self, delay: float) -> None:
        if self.finished.wait(delay):
            return
        log.warning("still running %.0f s after the stop began (an upload is stuck in a "
                    "network call?): exiting now; the journal keeps what is pending", delay)
        try:
            self.journal.commit()
        except Exception:  # noqa: BLE001
            log.debug("final commit", exc_info=True)
        if _in_mount_table(self.mountpoint):
            _lazy_unmount(self.mountpoint)
        from .notify import notify

        notify("STATUS=exited after the drain bound; pending uploads wait in the journal")
        logging.shutdown()
        os._exit(0)


async def _main(fs: DeltaFS, cfg: MountConfig, ready_fd: int | None, stop: _Stop) -> None:
    import pyfuse3

    from .metrics import start_metrics

    # before the mount answers: a metrics port in use fails the start (exit 14)
    exporter = await start_metrics(fs, port=cfg.metrics_port, address=cfg.metrics_address,
                                   textfile=cfg.metrics_textfile)
    async with trio.open_nursery() as nursery:
        if exporter is not None:
            nursery.start_soon(exporter.run)  # to the end: it serves during the drain
        nursery.start_soon(fs.writeback.run)
        nursery.start_soon(fs.read_ahead.run)
        nursery.start_soon(fs.committer)
        nursery.start_soon(fs.loop_stall.run)
        nursery.start_soon(fs.gc_pace.run)  # collections on this thread, not in workers
        gate = getattr(fs.engine.store, "gate", None)
        if gate is not None:
            # S3 requests at once follow the loop's lag (deltafs.gatecontrol)
            fs.gate_control = GateControl(gate, fs.loop_stall, fixed=cfg.s3_requests)
            nursery.start_soon(fs.gate_control.run)
        nursery.start_soon(memtrim.run)
        nursery.start_soon(fs.manifests.run)
        nursery.start_soon(fs.dirsync.run)
        nursery.start_soon(_announce_ready, cfg.mountpoint, ready_fd, fs, stop,
                           cfg.kernel_read_ahead)
        nursery.start_soon(_signals, fs, cfg, stop, nursery)
        nursery.start_soon(_report_status, fs, stop)
        try:
            await pyfuse3.main()
        finally:
            stop.gone.set()
            fs.read_ahead.stopped = True  # the drain is for uploads
        stop.unmounted.set()
        fs.options.read_only = True
        if not stop.begun:
            # unmounted (fusermount3 -u, umount, deltafs umount): the bound starts now
            stop.begin(cfg.drain_timeout)
            log.info("unmounted; finishing uploads (at most %.0f s)", cfg.drain_timeout)
            from .notify import notify

            notify("STOPPING=1")
        done = await _drain(fs, stop)
        if done and not fs.writeback.stopping:
            # the directories changed since their manifest was written: a fresh mount
            # elsewhere lists them without a HEAD per file
            with trio.move_on_after(max(1.0, stop.remaining())):
                await fs.contents.commit()
                await fs.manifests.flush()
        if not done:
            fs.writeback.stopping = True
            files, nbytes = fs.journal.pending()
            log.warning("%d changes (%d bytes) still pending; the next mount uploads them",
                        files, nbytes)
        nursery.cancel_scope.cancel()


async def _drain(fs: DeltaFS, stop: _Stop) -> bool:
    """Wait for the uploads until the stop deadline, telling the supervisor how many are
    left (``STATUS=``) every second."""
    from .notify import notify

    async def report() -> None:
        while True:
            files, nbytes = fs.journal.pending()
            notify(f"STATUS=draining: {files} pending ({nbytes} bytes), "
                   f"{stop.remaining():.0f} s left")
            await trio.sleep(1)

    files, _ = fs.journal.pending()
    if files == 0 and not fs.writeback.busy():
        return True
    done = False
    async with trio.open_nursery() as n:
        n.start_soon(report)
        with trio.CancelScope() as scope:
            stop.drain_scope = scope
            done = await fs.writeback.drain(stop.remaining())
        stop.drain_scope = None
        n.cancel_scope.cancel()
    files, nbytes = fs.journal.pending()
    notify(f"STATUS=drained: {files} pending ({nbytes} bytes)" if files
           else "STATUS=drained: all uploaded")
    return done and files == 0


async def _announce_ready(mountpoint: Path, ready_fd: int | None, fs: DeltaFS,
                          stop: _Stop, read_ahead: int) -> None:
    """READY only once the kernel routes a stat of the mountpoint to us; if it never
    does, the daemon reports why and goes (exit 12), leaving nothing mounted."""
    import pyfuse3

    def probe() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if stop.gone.is_set():
                raise FuseRefused(f"FUSE ended the mount on {mountpoint} before it answered "
                                  "(libfuse said why in the daemon log, or on stderr)")
            if os.path.ismount(mountpoint):
                os.stat(mountpoint)
                return
            time.sleep(0.05)
        raise FuseRefused(f"{mountpoint} did not become a mount within 30 s")

    try:
        await trio.to_thread.run_sync(probe)
    except (MountError, OSError) as exc:
        log.error("the mount did not come up: %s", exc)
        _report(ready_fd, f"ERR {EXIT_FUSE} {exc}")
        stop.exit_code = EXIT_FUSE
        if not stop.gone.is_set():
            stop.begin(0)
            threading.Thread(target=_lazy_unmount, args=(mountpoint,), daemon=True).start()
            pyfuse3.terminate()
        return
    from . import kernelra

    fs.kernel_read_ahead = await trio.to_thread.run_sync(kernelra.apply, mountpoint,
                                                         read_ahead)
    _report(ready_fd, "OK")
    from .notify import notify

    notify(f"READY=1\nSTATUS={_mounted_status(fs)}\nMAINPID={os.getpid()}")


def _mounted_status(fs: DeltaFS) -> str:
    files, nbytes = fs.journal.pending()
    if files:
        return f"mounted: {files} uploads pending ({nbytes} bytes)"
    return "mounted: all uploaded"


async def _report_status(fs: DeltaFS, stop: _Stop) -> None:
    """While mounted, ``STATUS=`` with the pending uploads (what `systemctl status`
    shows), sent when it changes."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from .notify import notify

    last = None
    while not stop.begun:
        text = _mounted_status(fs)
        if text != last:
            notify(f"STATUS={text}")
            last = text
        await trio.sleep(2)


async def _signals(fs: DeltaFS, cfg: MountConfig, stop: _Stop, nursery: trio.Nursery) -> None:
    """SIGTERM/SIGINT: stop taking writes, drain within the bound, unmount, exit 0.
    A second SIGINT (Ctrl-C) stops waiting for uploads (they stay in the journal)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR2:
                # `deltafs umount --timeout` ran out: exit without waiting for uploads
                log.warning("SIGUSR2: not waiting for uploads; pending changes stay in "
                            "the journal for the next mount")
                stop.hurry_now()
                continue
            if not stop.begun:
                log.info("signal %d: draining uploads (at most %.0f s), then unmounting",
                         signum, cfg.drain_timeout)
                stop.begin(cfg.drain_timeout)
                nursery.start_soon(_stop_on_signal, fs, cfg, stop)
            elif signum == signal.SIGINT:
                log.warning("interrupted again: unmounting now; pending uploads stay in "
                            "the journal for the next mount")
                stop.hurry = True
                if stop.drain_scope is not None:
                    stop.drain_scope.cancel()
            else:
                # systemd, shutdown scripts: a repeated SIGTERM does not cut the drain
                # short; its bound holds
                log.info("signal %d: already stopping (%.0f s left)", signum,
                         stop.remaining())


async def _stop_on_signal(fs: DeltaFS, cfg: MountConfig, stop: _Stop) -> None:
    import pyfuse3

    from .notify import notify

    fs.options.read_only = True
    files, nbytes = fs.journal.pending()
    notify(f"STOPPING=1\nSTATUS=draining: {files} pending ({nbytes} bytes)")
    await _drain(fs, stop)
    # detach the mount (no new opens); the loop ends once open files are closed ...
    await trio.to_thread.run_sync(_lazy_unmount, cfg.mountpoint)
    with trio.move_on_after(max(stop.remaining(), 0.5)):
        await stop.unmounted.wait()
        return
    # ... or now, at the bound: writers still holding files open get ENOTCONN
    log.warning("files still open on %s at the drain bound: closing the mount under them",
                cfg.mountpoint)
    pyfuse3.terminate()


def _in_mount_table(mountpoint: Path) -> bool:
    target = str(mountpoint)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1 and parts[1].replace("\\040", " ") == target:
                    return True
    except OSError:
        pass
    return False


def _lazy_unmount(mountpoint: Path) -> None:
    import subprocess

    exe = shutil.which("fusermount3") or "/usr/bin/fusermount3"
    try:
        subprocess.run([exe, "-u", "-z", str(mountpoint)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("fusermount3 -u -z %s: %s", mountpoint, exc)


__all__ = ["MountConfig", "mount", "ConfigError", "MountError", "StaleMount", "CacheError",
           "FuseRefused",
           "EXIT_MOUNTPOINT", "EXIT_CACHE", "EXIT_FUSE", "EXIT_STALE"]
