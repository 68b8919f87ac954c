"""Every setting, defined once: its name, type, default, help, and who takes it.

One table serves the ``deltafs`` commands (``put``, ``get``, ``ls``, …: scope ``cli``),
``deltafs mount`` (scope ``mount``), the ``mount.deltafs`` option strings (``-o
key=value``) and the TOML config files (both: the settings with ``config=True``). A
setting's flag is its name with dashes (``cache_size`` -> ``--cache-size``), its config
key is the name itself. Flags default to None, so that a config file can fill what the
command line leaves out; :func:`effective` applies the table's defaults last.

The converters take what a person writes on a command line (text) or in TOML (text,
number, boolean) and raise ValueError with a message that says what is wrong.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .units import parse_size

log = logging.getLogger(__name__)

#: log targets besides a path
LOG_WORDS = {"stderr": "stderr", "syslog": "syslog", "journal": "syslog"}
#: what the converters below accept for ``format``
FORMATS = ("auto", "deltafs", "deltaglider")
#: server-side encryption (``sse``) as S3 spells it: SSE-S3 and SSE-KMS
SSE_MODES = ("AES256", "aws:kms")
#: storage classes deltafs writes in: an object in any of them can be read at once
STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
                   "GLACIER_IR", "REDUCED_REDUNDANCY", "EXPRESS_ONEZONE")
#: archive classes: an object must be restored (minutes to hours) before a GET
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# ---------------------------------------------------------------------- converters


def size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    return parse_size(str(value))


def int_pos(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not a whole number")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a whole number: {value!r}") from None
    if n < 1 or n != float(value):
        raise ValueError(f"must be a whole number of at least 1, not {value!r}")
    return n


def port(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not a port number")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a port number: {value!r}") from None
    if not 1 <= n <= 65535 or n != float(value):
        raise ValueError(f"a port is a whole number from 1 to 65535, not {value!r}")
    return n


def level(value: Any) -> int:
    if isinstance(value, bool) or str(value).strip() not in tuple("0123456789"):
        raise ValueError(f"the level is a digit from 0 to 9, not {value!r}")
    return int(str(value).strip())


def seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number of seconds")
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a number of seconds: {value!r}") from None
    if n < 0 or n != n:
        raise ValueError(f"must be 0 or more seconds, not {value!r}")
    return n


def ratio(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a ratio")
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a ratio: {value!r}") from None
    if not 0 < n <= 1:
        raise ValueError(f"must be in (0, 1], not {value!r}")
    return n


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", ""):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not true/false: {value!r}")


def text(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or value == "":
        raise ValueError(f"expected a non-empty string, not {value!r}")
    return str(value)


def path(value: Any) -> str:
    return os.path.expanduser(text(value))


def log_target(value: Any) -> str:
    t = text(value)
    return LOG_WORDS.get(t.lower(), os.path.expanduser(t))


def fmt(value: Any) -> str:
    t = text(value)
    if t not in FORMATS:
        raise ValueError(f"must be auto, deltafs or deltaglider, not {value!r}")
    return t


def sse(value: Any) -> str:
    t = text(value).strip()
    for mode in SSE_MODES:
        if t.lower() == mode.lower():
            return mode
    raise ValueError(f"unknown server-side encryption {value!r}: use AES256 (SSE-S3, keys "
                     "managed by S3) or aws:kms (SSE-KMS)")


def storage_class(value: Any) -> str:
    t = text(value).strip().upper().replace("-", "_")
    if t in ARCHIVE_CLASSES:
        raise ValueError(
            f"storage class {t} cannot be used: its objects must be restored (minutes to"
            " hours) before they can be read, and reading a file needs its delta and its"
            " directory's reference at once; GLACIER_IR (instant retrieval) or STANDARD_IA"
            " can be read at once")
    if t not in STORAGE_CLASSES:
        raise ValueError(f"unknown storage class {value!r}: use one of "
                         f"{', '.join(STORAGE_CLASSES)}")
    return t


def kms_key_problem(sse_mode: str | None, key_id: str | None) -> str | None:
    """Why a KMS key id cannot go with ``sse_mode`` (None when it can)."""
    if key_id and sse_mode != "aws:kms":
        return ("an SSE-KMS key id only applies with server-side encryption aws:kms"
                + (f", not {sse_mode}" if sse_mode else " (none is set)")
                + ": set the encryption to aws:kms, or drop the key id")
    return None


def fuse_options(value: Any) -> list[str]:
    """A list (TOML) or comma-separated text of kernel/FUSE flags; checked by config."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"expected a list of strings, not {value!r}")


def short_size(n: int) -> str:
    """10 GiB -> '10G' (as a size flag is written), 1000 -> '1000'."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


# ---------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    """One setting. ``scopes``: ``cli`` (put/get/ls/rm/gc/stats/verify/analyze),
    ``mount``. ``flag``: False for settings with no flag (positional arguments, and
    ``fuse_options``, which only a config file or ``-o`` sets). ``config``: whether a
    config file and ``-o`` take it."""

    name: str
    convert: Callable[[Any], Any]
    default: Any
    help: str
    scopes: frozenset[str]
    config: bool = True
    flag: bool = True
    short: str | None = None
    action: str | None = None  # "store_true", "count"
    metavar: str | None = None
    group: str = "store and cache"
    default_text: str | None = None  # the default as the help shows it

    @property
    def flags(self) -> list[str]:
        return ([self.short] if self.short else []) + ["--" + self.name.replace("_", "-")]

    def help_text(self) -> str:
        shown = self.default_text
        if shown is None and self.default not in (None, False, 0) and self.action is None:
            shown = short_size(self.default) if self.convert is size else str(self.default)
        return f"{self.help} (default {shown})" if shown else self.help


BOTH = frozenset({"cli", "mount"})
CLI = frozenset({"cli"})
MOUNT = frozenset({"mount"})

#: the xdelta3 children and the process together (membudget takes its default here)
DEFAULT_MEMORY_LIMIT = 144 * MiB

OPTIONS: tuple[Option, ...] = (
    Option("source", text, None, "s3://BUCKET[/PREFIX] or a store directory", MOUNT,
           flag=False),
    Option("mountpoint", path, None, "an existing empty directory", MOUNT, flag=False),
    Option("endpoint_url", text, None, "S3 endpoint", BOTH,
           default_text="AWS_ENDPOINT_URL, else AWS"),
    Option("region", text, None, "S3 region", BOTH, default_text="AWS_REGION or the profile's"),
    Option("profile", text, None, "AWS profile (credentials stay in its files)", BOTH),
    Option("credentials_file", path, None,
           "an AWS shared-credentials file to take the keys from (never pass keys on the "
           "command line)", BOTH, metavar="FILE"),
    Option("sse", sse, None, "server-side encryption of every object written: AES256 or "
           "aws:kms", BOTH, metavar="MODE", group="S3 objects"),
    Option("sse_kms_key_id", text, None, "the KMS key for --sse aws:kms (default: the "
           "bucket's or the account's)", BOTH, metavar="KEY", group="S3 objects"),
    Option("storage_class", storage_class, None,
           "storage class of file contents (deltas, chain blobs, files stored whole); "
           "references, directory markers, manifests and, for the IA classes, objects "
           "under 128 KiB stay STANDARD: every cold delta read needs its reference",
           BOTH, metavar="CLASS", group="S3 objects", default_text="STANDARD"),
    Option("cache_dir", path, None, "content cache (and, for a mount, its journal and log)",
           BOTH, metavar="DIR",
           default_text="~/.cache/deltafs; a mount: one per source under "
                        "/var/cache/deltafs/mounts (root) or ~/.cache/deltafs/mounts"),
    Option("cache_size", size, 10 * GiB, "bound of the content cache", BOTH,
           metavar="SIZE"),
    Option("max_ratio", ratio, 0.75, "keep a delta only below this share of the file",
           BOTH, metavar="RATIO"),
    Option("min_delta_size", size, 64 * KiB, "smaller files are stored whole", BOTH,
           metavar="SIZE"),
    Option("level", level, None, "xdelta3 level 0-9 (6 stores ~0.4%% less for 1.3x the "
           "encode time, 9 ~0.6%% less for 2.5x)", BOTH, metavar="0-9", default_text="3"),
    Option("format", fmt, "auto",
           "bucket format for new directories: auto (deltafs's extensions in new "
           "directories, DeltaGlider's where DeltaGlider wrote), deltaglider (only what "
           "the deltaglider CLI reads), deltafs", BOTH, metavar="{auto,deltafs,deltaglider}"),
    Option("memory_limit", size, DEFAULT_MEMORY_LIMIT,
           "RAM for deltafs and its xdelta3 children together; encodes and decodes that "
           "do not fit wait their turn ('0': no limit)", BOTH, metavar="SIZE"),
    Option("quiet", boolean, False, "print less", BOTH, config=False, short="-q",
           action="store_true", group="output"),
    Option("verbose", int, 0, "print more (repeat for more)", BOTH, config=False,
           short="-v", action="count", group="output"),
    Option("debug", boolean, False, "log everything; tracebacks on errors", BOTH,
           action="store_true", group="output"),
    Option("upload_concurrency", int_pos, 4, "uploads at once", MOUNT, metavar="N",
           group="mount"),
    Option("s3_requests", int_pos, None,
           "S3 requests in flight at once, fixed (by default up to 40, fewer while the "
           "daemon's event loop runs late: deltafs status, s3_requests_at_once)", MOUNT,
           metavar="N", group="mount", default_text="adaptive, at most 40"),
    Option("listing_ttl", seconds, 30.0, "seconds a directory listing is trusted", MOUNT,
           metavar="SECONDS", group="mount", default_text="30"),
    Option("drain_timeout", seconds, 60.0,
           "seconds to finish uploads at unmount/SIGTERM before exiting with the rest "
           "kept in the journal", MOUNT, metavar="SECONDS", group="mount", default_text="60"),
    Option("log_file", log_target, None, "a path, 'stderr', 'syslog' or 'journal'", MOUNT,
           metavar="TARGET", group="mount",
           default_text="stderr with --foreground, else CACHE_DIR/deltafs.log"),
    Option("kernel_read_ahead", size, MiB,
           "the kernel's read-ahead window for this mount: the largest read request it "
           "sends (0 keeps the kernel's 128 KiB; setting it needs root)", MOUNT,
           metavar="SIZE", group="mount", default_text="1M"),
    Option("allow_other", boolean, False, "let other users in (the kernel checks modes)",
           MOUNT, action="store_true", group="mount"),
    Option("read_only", boolean, False, "refuse every change (EROFS)", MOUNT,
           action="store_true", group="mount"),
    Option("metrics_port", port, None, "serve Prometheus metrics on this port", MOUNT,
           metavar="PORT", group="metrics", default_text="none"),
    Option("metrics_address", text, "127.0.0.1", "address the metrics port listens on",
           MOUNT, metavar="ADDR", group="metrics"),
    Option("metrics_textfile", path, None,
           "write the metrics to this file every few seconds (node_exporter's textfile "
           "collector)", MOUNT, metavar="FILE", group="metrics"),
    Option("fuse_options", fuse_options, None, "kernel and FUSE flags", MOUNT, flag=False),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def for_scope(scope: str) -> list[Option]:
    return [o for o in OPTIONS if scope in o.scopes]


# ---------------------------------------------------------------------- argparse


def _arg_type(opt: Option) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        try:
            return opt.convert(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = opt.name  # argparse names it in "invalid NAME value"
    return convert


def add_arguments(parser: argparse.ArgumentParser, scope: str) -> None:
    """The flags of every option of ``scope``, in their groups; all default to None."""
    groups: dict[str, Any] = {}
    for opt in for_scope(scope):
        if not opt.flag:
            continue
        g = groups.get(opt.group)
        if g is None:
            g = groups[opt.group] = parser.add_argument_group(opt.group)
        kw: dict[str, Any] = {"dest": opt.name, "default": None, "help": opt.help_text()}
        if opt.action:
            kw["action"] = opt.action
        else:
            kw["type"] = _arg_type(opt)
            if opt.metavar:
                kw["metavar"] = opt.metavar
        g.add_argument(*opt.flags, **kw)


def from_args(args: argparse.Namespace, scope: str) -> dict[str, Any]:
    """The settings given as flags (None where not given)."""
    return {o.name: getattr(args, o.name, None) for o in for_scope(scope) if o.flag}


def effective(settings: Mapping[str, Any], scope: str) -> dict[str, Any]:
    """``settings`` with the table's default for each setting not given."""
    out = {o.name: o.default for o in for_scope(scope)}
    out.update({k: v for k, v in settings.items() if v is not None})
    return out


def names(scope: str | None = None, *, config: bool | None = None) -> Iterable[str]:
    return [o.name for o in OPTIONS if (scope is None or scope in o.scopes)
            and (config is None or o.config == config)]
