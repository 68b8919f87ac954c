"""The ``deltafs`` command: put, get, ls, rm, stats, verify, analyze, init (and mount).

Every failure a user can cause or meet prints one line, ``deltafs: <what and why>``, and
exits with the code of its error class (see :mod:`deltafs.errors`); a traceback appears
only with ``--debug``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .version import __version__
from . import options, wiring
from .engine import Engine, Entry, part_path
from .errors import DeltafsError, NotFound, UsageError
from .format import check_logical_key, split_key
from .locations import Location, parse
from .store.base import ObjectStore
from .units import human, parse_size  # noqa: F401  (parse_size: callers' name)

log = logging.getLogger(__name__)

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------ formatting


class Progress:
    """One status line per step on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)


def _bar_wanted(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not args.quiet and not getattr(args, "json", False) \
        and os.environ.get("TERM") != "dumb"


def progress_bar(args: argparse.Namespace, total: int, what: str) -> Any:
    """A progress bar over bytes on stderr, only on a terminal (none on a pipe, with
    --quiet or --json). Files advance it as each one is done."""
    if not _bar_wanted(args):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                file=sys.stderr, dynamic_ncols=True, leave=False)


class _Ticker:
    """Keeps a bar alive while one long step runs (a 2 GB put is one call): redraws it
    twice a second, so its clock moves, and with ``poll`` (bytes of the current file
    done so far, read from the file system) moves it too. The thread only reads a file's
    size and calls the bar (tqdm locks its own state)."""

    def __init__(self, bar: Any, poll: Callable[[], int] | None = None) -> None:
        self.bar, self.poll = bar, poll
        self.base = bar.n if bar is not None else 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Ticker":
        if self.bar is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        if self.bar is not None and self.poll is not None:
            self.bar.n = self.base  # the caller adds the file's true size

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            if self.poll is not None:
                try:
                    self.bar.n = self.base + self.poll()
                except OSError:
                    pass
            self.bar.refresh()


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------- context


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command's settings: its flags over the options table's defaults."""
    return options.effective(options.from_args(args, "cli"), "cli")


def open_store(loc: Location, args: argparse.Namespace, create: bool = False) -> ObjectStore:
    return wiring.open_store(loc, settings(args), create=create)


def engine_for(loc: Location, args: argparse.Namespace) -> Engine:
    s = settings(args)
    return wiring.engine(wiring.open_store(loc, s), s)


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        text()


# -------------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace) -> int:
    from .store.local import LocalStore

    root = Path(args.dir).absolute()
    LocalStore(root, create=True)
    print(f"deltafs store ready at {root}")
    return 0


def _put_sources(paths: Sequence[str], recursive: bool) -> list[tuple[Path, str]]:
    """(file, relative name) pairs; directories only with -r."""
    out: list[tuple[Path, str]] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            if not recursive:
                raise UsageError(f"{p}: is a directory (use -r to put a tree)")
            base = path.name if not p.endswith("/") else ""
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for f in sorted(filenames):
                    full = Path(dirpath) / f
                    if full.is_file() and not full.is_symlink():
                        rel = full.relative_to(path).as_posix()
                        out.append((full, f"{base}/{rel}" if base else rel))
        elif path.is_file():
            out.append((path, path.name))
        elif not path.exists():
            raise UsageError(f"{p}: no such file")
        else:
            raise UsageError(f"{p}: not a regular file")
    return out


def cmd_put(args: argparse.Namespace) -> int:
    dest = parse(args.dest)
    sources = _put_sources(args.files, args.recursive)
    into = dest.is_prefix or len(sources) > 1 or args.recursive
    if into and not dest.is_prefix:
        dest = Location(dest.bucket, dest.root, dest.key + "/")
    for _, rel in sources:  # refuse bad names before anything is written
        check_logical_key(dest.key + rel if into else dest.key)
    engine = engine_for(dest, args)
    results = []
    total = len(sources)
    bar = progress_bar(args, sum(_size_of(src) for src, _ in sources), "put")
    try:
        for i, (src, rel) in enumerate(sources, 1):
            key = dest.key + rel if into else dest.key
            if bar is not None:
                bar.set_postfix_str(f"[{i}/{total}] {src.name}", refresh=True)
            with _Ticker(bar):
                r = engine.put(src, key)
            results.append(r)
            if bar is not None:
                bar.update(r.original_size)
                bar.refresh()
            if not args.json and not args.quiet:
                detail = f" ({r.reason})" if r.reason else ""
                line = (f"{r.kind:9} {human(r.original_size):>8} -> "
                        f"{human(r.stored_size):>8} {r.ratio:6.1%}  {_url(dest, key)}{detail}")
                if bar is not None:
                    bar.write(line, file=sys.stdout)
                else:
                    print(line)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        json.dump([{"key": r.key, "kind": r.kind, "original_size": r.original_size,
                    "stored_size": r.stored_size, "sha256": r.sha256, "reason": r.reason}
                   for r in results], sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


def _url(loc: Location, key: str) -> str:
    return str(Location(loc.bucket, loc.root, key))


def cmd_get(args: argparse.Namespace) -> int:
    src = parse(args.src)
    if src.is_prefix:
        raise UsageError(f"{args.src}: names a prefix, not a file")
    engine = engine_for(src, args)
    name = split_key(src.key)[1]
    if args.dest == "-":
        return _get_stdout(engine, src.key)
    dest = Path(args.dest) if args.dest else Path(name)
    if dest.is_dir() or (args.dest or "").endswith("/"):
        if not dest.is_dir():
            raise UsageError(f"{args.dest}: no such directory")
        dest = dest / name
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent}: no such directory")
    known = engine.stat(src.key) if _bar_wanted(args) else None  # the get reuses it
    bar = progress_bar(args, (known.size or 0) if known else 0, "get")
    try:
        if bar is not None:
            bar.set_postfix_str(name, refresh=True)
        part = part_path(dest)
        with _Ticker(bar, lambda: part.stat().st_size):
            stored = engine.get(src.key, dest, known)
        if bar is not None:
            bar.update(dest.stat().st_size)
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print(f"{stored.kind.value:9} {human(dest.stat().st_size):>8}  {dest}", file=sys.stderr)
    return 0


def _get_stdout(engine: Engine, key: str) -> int:
    with engine._scratch() as scratch:  # noqa: SLF001 - same package
        out = scratch / "out"
        engine.materialize(engine.stat(key), out)
        with open(out, "rb") as f:
            while chunk := f.read(1 << 20):
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    loc = parse(args.url)
    engine = engine_for(loc, args)
    # streamed: a tree of any size is printed as it is listed (a LIST page and a batch
    # of HEADs in memory); sorted within each batch, nearly sorted overall
    stream = _batches(engine.iter_entries(loc.key, recursive=args.recursive,
                                          sizes=args.long or args.json))
    first = next(stream, [])
    if not first and loc.key and not loc.key.endswith("/"):
        try:
            f = engine.stat(loc.key)
            first = [e for e in engine.list(split_key(loc.key)[0]) if e.key == f.logical_key]
        except NotFound:
            raise NotFound(f"{loc}: no such file or prefix") from None
    base = loc.key if loc.key.endswith("/") or not loc.key else loc.key + "/"
    n = 0
    if args.json:
        sys.stdout.write("[")
    for batch in itertools.chain([first], stream):
        for e in batch:
            if args.json:
                sys.stdout.write(("," if n else "") + "\n  " + json.dumps(_entry_json(e)))
            else:
                _print_entry(e, base, args.long)
            n += 1
    if args.json:
        sys.stdout.write("\n]\n" if n else "]\n")
    return 0


def _batches(entries: Iterator[Entry], size: int = 1000) -> Iterator[list[Entry]]:
    batch: list[Entry] = []
    for e in entries:
        batch.append(e)
        if len(batch) >= size:
            yield sorted(batch, key=lambda x: x.key)
            batch = []
    if batch:
        yield sorted(batch, key=lambda x: x.key)


def _print_entry(e: Entry, base: str, long: bool) -> None:
    shown = e.key[len(base):] if e.key.startswith(base) else e.key
    if not long:
        print(shown)
    elif e.is_dir:
        print(f"{'DIR':>12}  {'':16}  {'':9}  {shown}")
    else:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime_ns / 1e9))
        print(f"{e.size:>12}  {when:16}  {e.kind:9}  {shown}")


def _entry_json(e: Entry) -> dict[str, Any]:
    if e.is_dir:
        return {"key": e.key, "type": "dir"}
    return {"key": e.key, "type": "file", "size": e.size, "stored_size": e.stored_size,
            "kind": e.kind, "mtime_ns": e.mtime_ns, "sha256": e.sha256}


def cmd_rm(args: argparse.Namespace) -> int:
    loc = parse(args.url)
    engine = engine_for(loc, args)
    if args.recursive:
        if not loc.key and not args.force:
            raise UsageError(f"{args.url}: refusing to remove a whole store without --force")
        n = engine.delete_tree(loc.key, Progress())
        if not args.quiet:
            print(f"removed {n} files under {loc}")
        return 0
    if loc.is_prefix:
        raise UsageError(f"{args.url}: is a prefix (use -r)")
    engine.delete(loc.key)
    if not args.quiet:
        print(f"removed {loc}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    loc = parse(args.url)
    engine = engine_for(loc, args)
    grace = parse_duration(args.grace)
    removed = engine.gc(loc.key, grace=grace, dry_run=args.dry_run)
    if args.json:
        json.dump({"removed": removed, "dry_run": args.dry_run}, sys.stdout)
        sys.stdout.write("\n")
    elif not args.quiet:
        verb = "would remove" if args.dry_run else "removed"
        for key in removed:
            print(f"{verb} {key}")
        print(f"{verb} {len(removed)} unused references under {loc}")
    return 0


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise UsageError(f"'{text}': not a duration (e.g. 90s, 15m, 1h, 2d)") from None


def cmd_stats(args: argparse.Namespace) -> int:
    loc = parse(args.url)
    engine = engine_for(loc, args)
    s = engine.stats(loc.key)
    data = {"prefix": str(loc), "files": s.files, "logical_bytes": s.logical_bytes,
            "stored_bytes": s.stored_bytes, "references": s.references,
            "reference_bytes": s.reference_bytes, "by_kind": s.by_kind,
            "by_form": s.by_form,
            "savings": round(s.savings, 4)}

    def text() -> None:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(s.by_kind.items())) or "none"
        print(f"{loc}")
        print(f"  files:    {s.files} ({kinds})")
        print(f"  logical:  {human(s.logical_bytes)} ({s.logical_bytes} bytes)")
        print(f"  stored:   {human(s.stored_bytes)} ({s.stored_bytes} bytes, "
              f"{s.references} reference{'s' if s.references != 1 else ''})")
        print(f"  savings:  {s.savings:.1%}")
        if s.by_form:
            print("  by form:  files      logical       stored  stored/logical")
            for form, d in sorted(s.by_form.items(), key=lambda kv: -kv[1]["stored_bytes"]):
                ratio = (f"{d['stored_bytes'] / d['logical_bytes']:.3f}"
                         if d["logical_bytes"] else "-")
                print(f"    {form:<18} {d['files']:>6} {human(d['logical_bytes']):>12} "
                      f"{human(d['stored_bytes']):>12}  {ratio}")

    _emit(args, data, text)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    loc = parse(args.url)
    engine = engine_for(loc, args)
    progress = Progress()

    def each(key: str, error: str | None) -> None:
        progress(f"{'FAILED' if error else 'ok'}  {key}")

    # streamed: only the failures are kept for the summary
    bad: list[tuple[str, str]] = []
    total = 0
    for k, e in engine.iter_verify(loc.key):
        each(k, e)
        if args.json:
            sys.stdout.write(("," if total else "[") + "\n  " +
                             json.dumps({"key": k, "ok": e is None, "error": e}))
        if e:
            bad.append((k, e))
        total += 1
    if args.json:
        sys.stdout.write("\n]\n")  # (nothing to verify raised before any output)
    else:
        for k, e in bad:
            print(f"FAILED {k}: {e}")
        print(f"{total - len(bad)} of {total} files verified"
              + (f", {len(bad)} FAILED" if bad else ""))
    return 1 if bad else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze

    loc = parse(args.url)
    engine = engine_for(loc, args)
    a = analyze(engine, loc.key, sample=args.sample, progress=Progress())
    data = {"prefix": str(loc), "objects": a.objects, "logical_bytes": a.logical_bytes,
            "estimated_bytes": a.estimated_bytes, "savings": round(a.savings, 4),
            "sampled": a.sampled, "directories": a.directories}

    def text() -> None:
        print(f"{loc}: {a.objects} objects, {human(a.logical_bytes)}; "
              f"{a.sampled} sampled encodes")
        for d in a.directories:
            print(f"  {d['prefix'] or '(root)'}: {d['files']} files, mean delta "
                  f"{float(d['mean_delta_ratio']):.1%}")  # type: ignore[arg-type]
        print(f"Potential savings: {a.savings:.1%} "
              f"({human(a.logical_bytes)} → {human(a.estimated_bytes)})")

    _emit(args, data, text)
    return 0


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    options.add_arguments(common, "cli")

    p = argparse.ArgumentParser(
        prog="deltafs",
        description="Versioned files in S3 as binary deltas (DeltaGlider's bucket format).",
    )
    p.add_argument("--version", action="version", version=f"deltafs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
            json_: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_)
        sp.set_defaults(func=func)
        if json_:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            sp.set_defaults(json=False)
        return sp

    sp = add("init", cmd_init, "create a local store directory")
    sp.add_argument("dir")

    sp = add("put", cmd_put, "store files (DEST ending in / means into that prefix)", True)
    sp.add_argument("-r", "--recursive", action="store_true", help="put directory trees")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("dest", metavar="DEST")

    sp = add("get", cmd_get, "rebuild a file, SHA-256-verified (DEST '-' is stdout)")
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("dest", nargs="?", metavar="DEST")

    sp = add("ls", cmd_ls, "list files with their true sizes", True)
    sp.add_argument("-l", "--long", action="store_true")
    sp.add_argument("-R", "--recursive", action="store_true")
    sp.add_argument("url", metavar="URL")

    sp = add("rm", cmd_rm, "remove a file, or a prefix with -r")
    sp.add_argument("-r", "--recursive", action="store_true")
    sp.add_argument("--force", action="store_true", help="allow rm -r of a whole store")
    sp.add_argument("url", metavar="URL")

    sp = add("gc", cmd_gc, "remove references no delta uses any more, older than a grace "
             "period (left by a crash, a failed check or another tool; a mount removes "
             "its own unused references as it goes)",
             True)
    sp.add_argument("--grace", default="1h",
                    help="only references older than this (default 1h; e.g. 0, 15m, 2d)")
    sp.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    sp.add_argument("url", metavar="URL")

    sp = add("stats", cmd_stats, "logical against stored bytes", True)
    sp.add_argument("url", metavar="URL")

    sp = add("verify", cmd_verify, "rebuild every file and check its SHA-256", True)
    sp.add_argument("url", metavar="URL")

    sp = add("analyze", cmd_analyze,
             "estimate the savings of delta storage for a prefix of plain objects", True)
    sp.add_argument("--sample", type=int, default=4, help="encodes per directory (default 4)")
    sp.add_argument("url", metavar="URL")

    try:
        from .mountcli import add_mount_commands
    except ImportError:
        pass
    else:
        add_mount_commands(sub, common)
    return p


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else (logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING if not args.debug else level))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if argv is None and getattr(args, "command", None) == "mount":
        from .memtrim import use_c_allocator

        use_c_allocator()  # the daemon's allocator (see memtrim); returns if not needed
    setup_logging(args)
    if getattr(args, "command", None) != "mount":  # a mount sets its own, from its config
        from . import membudget

        limit = getattr(args, "memory_limit", None)
        membudget.configure(membudget.DEFAULT_LIMIT if limit is None else (limit or None))
    try:
        return args.func(args)
    except DeltafsError as exc:
        if args.debug:
            log.exception("failed")
        print(f"deltafs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("deltafs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except OSError as exc:
        if args.debug:
            log.exception("failed")
        print(f"deltafs: {exc.filename or ''}{': ' if exc.filename else ''}"
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place a surprise is turned into a line
        log.debug("internal error", exc_info=True)
        print(f"deltafs: internal error: {type(exc).__name__}: {exc} "
              "(run with --debug for details)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
