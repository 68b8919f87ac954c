"""``mount.deltafs``: the helper ``mount(8)`` runs for ``mount -t deltafs`` and for fstab
lines of type ``deltafs``.

mount(8) calls it as::

    mount.deltafs SOURCE MOUNTPOINT [-o OPTS] [-f] [-n] [-s] [-v]

- ``SOURCE``: ``s3://bucket[/prefix]``, a local store directory, or the NAME of a config
  file ``/etc/deltafs/NAME.toml`` that holds the source (and anything else).
- ``-o OPTS``: comma-separated options. ``key=value`` deltafs settings (``cache_dir``,
  ``cache_size``, ``endpoint_url``, ``region``, ``profile``, ``credentials_file``,
  ``config``, ``upload_concurrency``, ``max_ratio``, ``min_delta_size``, ``log_file``,
  ``listing_ttl``, ``drain_timeout``, ``debug``, ``read_only``/``ro``) are mapped; generic
  ones (``defaults``, ``_netdev``, ``nofail``, ``auto``/``noauto``, ``user``, ``users``,
  ``x-systemd.*``, ``comment=``, …) are dropped; kernel flags (``nosuid``, ``nodev``,
  ``noexec``, …) and FUSE options (``allow_other``, ``allow_root``, ``auto_unmount``)
  go to the kernel. Unknown options, secrets and contradictions (``ro`` with ``rw``, one
  setting with two values) exit 2.
- ``-f`` fake: check everything that needs no network, mount nothing. ``-n``: no mtab
  (there is none to write: /etc/mtab is /proc/mounts). ``-s`` sloppy: ignore unknown
  options. ``-v``: say what is done.

It exits 0 only once the mount is live (the mountpoint answered a ``stat``); otherwise
non-zero with the reason on stderr (exit codes: README, TROUBLESHOOTING.md). Install:
``ln -s "$(command -v mount.deltafs)" /sbin/mount.deltafs``.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

from .errors import DeltafsError, UsageError

log = logging.getLogger(__name__)

USAGE = "usage: mount.deltafs SOURCE MOUNTPOINT [-o OPTIONS] [-f] [-n] [-s] [-v]"
EXIT_USAGE = 2
EXIT_INTERNAL = 70
ACCEPTED_TYPES = ("deltafs", "fuse.deltafs")


@dataclass
class Invocation:
    source: str
    mountpoint: str
    options: list[str] = field(default_factory=list)
    fake: bool = False
    no_mtab: bool = False
    sloppy: bool = False
    verbose: bool = False


def parse_argv(argv: Sequence[str]) -> Invocation | None:
    """mount(8)'s calling convention -> an Invocation (None: help was printed)."""
    positional: list[str] = []
    options: list[str] = []
    flags = {"f": False, "n": False, "s": False, "v": False}
    i = 0
    args = list(argv)
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            positional.extend(args[i:])
            break
        if a in ("-h", "--help"):
            print(USAGE)
            print(__doc__ or "")
            return None
        if a.startswith("-o") or a.startswith("-t") or a.startswith("-N"):
            value = a[2:]
            if not value:
                if i >= len(args):
                    raise UsageError(f"{a} needs a value\n{USAGE}")
                value = args[i]
                i += 1
            if a.startswith("-o"):
                options.append(value)
            elif a.startswith("-t"):
                if value not in ACCEPTED_TYPES:
                    raise UsageError(f"mount.deltafs cannot mount type {value!r}")
            else:
                raise UsageError("mount.deltafs does not support mount namespaces (-N)")
            continue
        if a.startswith("-") and len(a) > 1:
            for letter in a[1:]:
                if letter not in flags:
                    raise UsageError(f"unknown flag -{letter}\n{USAGE}")
                flags[letter] = True
            continue
        positional.append(a)
    if len(positional) != 2:
        raise UsageError(f"expected SOURCE and MOUNTPOINT, got {len(positional)} "
                         f"argument(s)\n{USAGE}")
    return Invocation(positional[0], positional[1], options, fake=flags["f"],
                      no_mtab=flags["n"], sloppy=flags["s"], verbose=flags["v"])


def resolve(inv: Invocation):  # type: ignore[no-untyped-def]
    """The MountConfig this invocation asks for (config file < SOURCE/-o), and what the
    option string dropped or ignored."""
    from .config import (build_mount_config, config_path, load_file, merge, parse_options)

    opts = parse_options(inv.options, sloppy=inv.sloppy)
    config_ref = opts.settings.pop("config", None)
    source: str | None = inv.source
    if "://" not in inv.source and "/" not in inv.source and not os.path.exists(inv.source):
        # a bare NAME: /etc/deltafs/NAME.toml holds the source
        if config_ref is not None and config_path(config_ref) != config_path(inv.source):
            raise UsageError(f"SOURCE {inv.source!r} names a config and so does "
                             f"config={config_ref}: give one")
        if not config_path(inv.source).exists():
            raise UsageError(
                f"SOURCE {inv.source!r} is neither s3://BUCKET[/PREFIX], a store directory, "
                f"nor a config file ({config_path(inv.source)} does not exist)")
        config_ref, source = inv.source, None
    file_settings = load_file(config_ref) if config_ref else {}
    settings = merge(file_settings, {"source": source, "mountpoint": inv.mountpoint},
                     opts.settings)
    cfg = build_mount_config(settings, foreground=False, extra_fuse=opts.fuse,
                             create=not inv.fake)
    return cfg, opts, config_ref


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the program itself: the daemon's allocator (see memtrim)
        from .memtrim import use_c_allocator

        use_c_allocator()
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = any(a.startswith("-") and not a.startswith(("-o", "-t", "-N")) and "v" in a
                  for a in argv)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="mount.deltafs: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        inv = parse_argv(argv)
        if inv is None:
            return 0
        cfg, opts, config_ref = resolve(inv)
        if inv.verbose:
            say = lambda text: print(f"mount.deltafs: {text}", file=sys.stderr)  # noqa: E731
            say(f"{'would mount' if inv.fake else 'mounting'} {cfg.source} on "
                f"{cfg.mountpoint}" + (f" (config {config_ref})" if config_ref else ""))
            say(f"cache {cfg.cache_dir or 'default'}, endpoint {cfg.endpoint_url or 'default'}"
                f", read-only {cfg.read_only}, allow_other {cfg.allow_other}")
            if cfg.fuse_options:
                say(f"kernel/FUSE options: {','.join(cfg.fuse_options)}")
            if opts.dropped:
                say(f"dropped (for mount/systemd only): {','.join(opts.dropped)}")
            if opts.ignored:
                say(f"ignored (unknown, -s): {','.join(opts.ignored)}")
        if inv.fake:
            from .daemon import check_log_target

            check_log_target(cfg)
            if cfg.credentials_file:
                from .config import use_credentials_file

                use_credentials_file(cfg.credentials_file, cfg.profile)
            return 0
        from .daemon import mount

        code = mount(cfg)
        if inv.verbose and code == 0:
            print(f"mount.deltafs: {cfg.mountpoint} is live", file=sys.stderr)
        return code
    except DeltafsError as exc:
        print(f"deltafs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("deltafs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"deltafs: {exc.filename or ''}{': ' if exc.filename else ''}"
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for mount(8)
        log.debug("internal error", exc_info=True)
        print(f"deltafs: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
