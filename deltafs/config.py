"""Mount settings from three places, merged: a TOML file, option strings, command-line flags.

A config file (``/etc/deltafs/NAME.toml``; ``deltafs mount --config NAME`` or the mount
option ``config=NAME``) holds flat ``key = value`` settings::

    source = "s3://my-bucket/releases"
    mountpoint = "/mnt/releases"
    endpoint_url = "https://s3.eu-central-1.amazonaws.com"
    region = "eu-central-1"
    credentials_file = "/etc/deltafs/releases.credentials"   # mode 0600, AWS format
    cache_dir = "/var/cache/deltafs/releases"
    cache_size = "20G"
    upload_concurrency = 8
    memory_limit = "144M"        # the daemon and its xdelta3 children ("0": no limit)
    max_ratio = 0.75
    format = "auto"              # or "deltaglider" (what its CLI reads), "deltafs"
    log_file = "syslog"          # a path, "stderr", or "syslog"/"journal"

Secrets never go in the file or on a command line (both are visible: ``ps`` shows option
strings, config files get shared): ``credentials_file`` names an AWS shared-credentials
file (``[default]`` or ``[PROFILE]`` with ``aws_access_key_id``/``aws_secret_access_key``),
or ``profile`` names a profile of the usual AWS files.

Option strings are what ``mount(8)`` hands its helper (``-o a,b=c,...``): deltafs settings
as ``key=value``, generic mount options (``_netdev``, ``nofail``, ``x-systemd.*``, …) that
only mean something to ``mount``/systemd and are dropped here, kernel mount flags
(``nosuid``, ``nodev``, ``noexec``, …) and FUSE options (``allow_other``, …) that go to
the kernel. Settings given on the command line win over the file.
"""
from __future__ import annotations

import configparser
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import options
from .errors import ConfigError, UsageError
from .locations import Location

#: where ``config=NAME`` (a bare name) is looked up; tests point it elsewhere
CONFIG_DIR_ENV = "DELTAFS_CONFIG_DIR"
DEFAULT_CONFIG_DIR = Path("/etc/deltafs")

#: mount(8)/fstab/systemd options with no meaning to the filesystem itself
GENERIC_OPTIONS = frozenset({
    "defaults", "_netdev", "nofail", "auto", "noauto", "user", "nouser", "users", "owner",
    "group", "nocomment", "loud", "silent", "relatime", "norelatime", "atime", "strictatime",
    "nostrictatime", "lazytime", "nolazytime", "iversion", "noiversion", "mand", "nomand",
    "_rnetdev", "nosymfollow", "symfollow", "nodiratime", "diratime",
})
#: prefixes of generic options (``x-systemd.automount``, ``comment=systemd.automount``)
GENERIC_PREFIXES = ("x-", "comment=", "X-mount.", "user=", "uhelper=", "helper=")
#: kernel mount flags libfuse applies to the mount (``user`` in fstab makes mount(8) add
#: ``noexec,nosuid,nodev``: they are honoured, not dropped)
KERNEL_FLAGS = frozenset({
    "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "sync", "noatime",
    "dirsync",
})
#: FUSE mount options passed to libfuse as they are
FUSE_FLAGS = frozenset({"allow_root", "auto_unmount", "default_permissions"})
FUSE_VALUED: frozenset[str] = frozenset()  # max_read= breaks pyfuse3's init: none yet
#: option (or config key) names that would carry a secret
SECRET_NAMES = frozenset({
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "access_key",
    "access_key_id", "secret_key", "secret_access_key", "session_token", "password",
    "secret", "token",
})


# ---------------------------------------------------------------------- settings


def _default(name: str) -> Any:
    return options.BY_NAME[name].default


@dataclass
class MountConfig:
    """Everything a mount needs, after merging (flags, option strings, config file);
    every field but the first three is a setting of :mod:`deltafs.options`, with its
    default from there."""

    source: Location
    mountpoint: Path
    foreground: bool = False
    cache_dir: Path | None = None
    cache_size: int = _default("cache_size")
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    credentials_file: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None
    storage_class: str | None = None
    allow_other: bool = False
    read_only: bool = False
    log_file: str | None = None
    debug: bool = False
    upload_concurrency: int = _default("upload_concurrency")
    #: S3 requests at once, fixed (None: sized from the loop's lag, gatecontrol.py)
    s3_requests: int | None = None
    max_ratio: float = _default("max_ratio")
    level: int | None = None
    format: str = _default("format")
    min_delta_size: int = _default("min_delta_size")
    listing_ttl: float = _default("listing_ttl")
    drain_timeout: float = _default("drain_timeout")
    #: RAM for the daemon and its xdelta3 children together (0: no limit)
    memory_limit: int = _default("memory_limit")
    kernel_read_ahead: int = _default("kernel_read_ahead")
    metrics_port: int | None = None
    metrics_address: str = _default("metrics_address")
    metrics_textfile: str | None = None
    fuse_options: list[str] = field(default_factory=list)


def _fuse_options(value: Any) -> list[str]:
    items = options.fuse_options(value)
    for item in items:
        name, eq, _ = item.partition("=")
        if not (item in KERNEL_FLAGS or item in FUSE_FLAGS or item == "allow_other"
                or (eq and name in FUSE_VALUED)):
            known = sorted(KERNEL_FLAGS | FUSE_FLAGS | {"allow_other"}) + \
                [f"{v}=" for v in sorted(FUSE_VALUED)]
            raise ValueError(f"{item!r} is not a FUSE option deltafs passes on (known: "
                             f"{', '.join(known)})")
    return items


#: setting -> converter; every setting a file or an option string may carry (the table
#: in :mod:`deltafs.options`; ``fuse_options`` checked against what libfuse takes)
SETTINGS: dict[str, Callable[[Any], Any]] = {
    **{o.name: o.convert for o in options.OPTIONS if o.config and "mount" in o.scopes},
    "fuse_options": _fuse_options,
}
#: other spellings accepted for a setting
ALIASES = {
    "endpoint": "endpoint_url",
    "log": "log_file",
    "readonly": "read_only",
    "concurrency": "upload_concurrency",
}
#: settings that are paths: relative ones are refused in a file (relative to what?)
PATH_SETTINGS = ("mountpoint", "credentials_file", "cache_dir", "metrics_textfile")


def canonical(name: str) -> str:
    key = name.strip().replace("-", "_")
    return ALIASES.get(key, key)


def convert(name: str, value: Any, origin: str) -> Any:
    """One setting, checked and converted; ConfigError names where it came from."""
    if name in SECRET_NAMES:
        raise ConfigError(
            f"{origin}: {name!r} is a secret and does not belong there; put the keys in a "
            "credentials_file (AWS shared-credentials format, mode 0600) or an AWS profile")
    try:
        conv = SETTINGS[name]
    except KeyError:
        raise ConfigError(f"{origin}: unknown setting {name!r} (known: "
                          f"{', '.join(sorted(SETTINGS))})") from None
    try:
        return conv(value)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {name}: {exc}") from None


# ---------------------------------------------------------------------- config files


def config_dir() -> Path:
    return Path(os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR)


def config_path(ref: str) -> Path:
    """``releases`` -> ``/etc/deltafs/releases.toml``; a path stays a path."""
    if "/" in ref or ref.endswith(".toml"):
        return Path(ref).expanduser().absolute()
    return config_dir() / f"{ref}.toml"


def load_file(ref: str | Path) -> dict[str, Any]:
    """Read and check a config file; returns canonical setting -> converted value."""
    path = config_path(str(ref))
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    origin = f"config file {path}"
    for key, value in raw.items():
        name = canonical(key)
        if isinstance(value, dict):
            raise ConfigError(f"{origin}: [{key}] tables are not supported; write the "
                              "settings as plain `key = value` lines")
        out[name] = convert(name, value, origin)
        if name in PATH_SETTINGS and not os.path.isabs(out[name]):
            raise ConfigError(f"{origin}: {name} must be an absolute path, not {value!r}")
        if name == "log_file" and out[name] not in ("stderr", "syslog") \
                and not os.path.isabs(out[name]):
            raise ConfigError(f"{origin}: log_file must be an absolute path, 'stderr' or "
                              f"'syslog', not {value!r}")
    return out


# ------------------------------------------------------------------ option strings


@dataclass
class Options:
    """An option string, sorted: deltafs settings, and what goes to the kernel."""

    settings: dict[str, Any] = field(default_factory=dict)
    fuse: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # unknown, with sloppy


def split_options(texts: Iterable[str]) -> list[str]:
    out: list[str] = []
    for text in texts:
        out.extend(part.strip() for part in text.split(",") if part.strip())
    return out


def parse_options(texts: Iterable[str], *, sloppy: bool = False,
                  origin: str = "mount option") -> Options:
    """``-o`` strings -> settings and kernel options; UsageError (exit 2) on unknown
    options (unless ``sloppy``), secrets and contradictions."""
    opts = Options()
    seen_rw: set[str] = set()
    flags: dict[str, str] = {}
    for item in split_options(texts):
        name, eq, value = item.partition("=")
        if item in GENERIC_OPTIONS or item.startswith(GENERIC_PREFIXES):
            opts.dropped.append(item)
            continue
        if item in ("ro", "rw"):
            seen_rw.add(item)
            continue
        if item in KERNEL_FLAGS:
            base = item[2:] if item.startswith("no") and item[2:] in KERNEL_FLAGS else item
            other = flags.get(base)
            if other is not None and other != item:
                raise UsageError(f"contradictory mount options {other!r} and {item!r}")
            flags[base] = item
            if item not in opts.fuse:
                opts.fuse.append(item)
            continue
        if not eq and item in FUSE_FLAGS:
            if item not in opts.fuse:
                opts.fuse.append(item)
            continue
        if eq and name in FUSE_VALUED:
            opts.fuse.append(item)
            continue
        key = canonical(name)
        if key in SECRET_NAMES:
            raise UsageError(
                f"{origin} {name!r} would put a secret on the command line (visible in ps); "
                "use credentials_file=FILE or profile=NAME")
        if key == "config":
            if not value:
                raise UsageError(f"{origin} 'config' needs a value: config=NAME or a path")
            key = "config"
            converted: Any = value
        elif key in SETTINGS and key not in ("fuse_options",):
            if not eq:
                if SETTINGS[key] is options.boolean:
                    value = "true"
                else:
                    raise UsageError(f"{origin} {name!r} needs a value ({name}=...)")
            try:
                converted = SETTINGS[key](value)
            except ValueError as exc:
                raise UsageError(f"{origin} {name}: {exc}") from None
        else:
            if sloppy:
                opts.ignored.append(item)
                continue
            raise UsageError(f"unknown {origin} {item!r} (use -s to ignore unknown options)")
        old = opts.settings.get(key)
        if key in opts.settings and old != converted:
            raise UsageError(f"contradictory mount options: {name} given as {old!r} "
                             f"and {converted!r}")
        opts.settings[key] = converted
    if seen_rw == {"ro", "rw"}:
        raise UsageError("contradictory mount options 'ro' and 'rw'")
    if "ro" in seen_rw:
        if opts.settings.get("read_only") is False:
            raise UsageError("contradictory mount options 'ro' and 'read_only=false'")
        opts.settings["read_only"] = True
    # 'rw' is what mount(8) adds when nothing says ro: an explicit read_only wins over it
    return opts


# ------------------------------------------------------------------------- credentials


def use_credentials_file(path: str, profile: str | None) -> str:
    """Point boto3 at an AWS shared-credentials file (via ``AWS_SHARED_CREDENTIALS_FILE``
    in this process and the daemon it forks) and return the profile to use.

    The profile is named explicitly (``default`` if none was given), so keys in the
    environment do not silently win over the file the configuration asked for."""
    p = Path(path).expanduser().absolute()
    profile = profile or "default"
    parser = configparser.ConfigParser()
    try:
        with open(p, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        raise ConfigError(f"credentials_file {p} does not exist") from None
    except PermissionError:
        raise ConfigError(f"credentials_file {p} is not readable (permission denied)") from None
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError(f"credentials_file {p} is not an AWS credentials file: "
                          f"{' '.join(str(exc).split())}") from None
    if not parser.has_section(profile):
        have = ", ".join(f"[{s}]" for s in parser.sections()) or "no sections"
        raise ConfigError(f"credentials_file {p} has no [{profile}] section (it has {have})")
    section = parser[profile]
    missing = [k for k in ("aws_access_key_id", "aws_secret_access_key") if not section.get(k)]
    if missing and not any(section.get(k) for k in ("credential_process", "role_arn",
                                                     "sso_session", "sso_start_url")):
        raise ConfigError(f"credentials_file {p}: [{profile}] lacks {' and '.join(missing)}")
    try:
        mode = p.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        import logging

        logging.getLogger(__name__).warning(
            "credentials_file %s is readable by other users (mode %o); chmod 600 it",
            p, stat.S_IMODE(mode))
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(p)
    return profile


# ------------------------------------------------------------------------- merging


def source_location(text: str, create: bool = True):  # type: ignore[no-untyped-def]
    """``s3://bucket/prefix`` or a local store directory (an empty or new one becomes a
    store, unless ``create`` is false) as a mount source."""
    from .locations import find_store_root, parse
    from .store.local import LocalStore

    if text.startswith("s3://") or "://" in text:
        loc = parse(text)
        return loc
    path = Path(text).expanduser().absolute()
    root = find_store_root(path)
    if root is None:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UsageError(f"{path} is neither a deltafs store nor empty "
                             "(create a store with `deltafs init DIR`)")
        if create:
            LocalStore(path, create=True)
        root = path
    key = path.relative_to(root).as_posix()
    key = "" if key == "." else key + "/"
    return Location(None, root, key)


def merge(file_settings: Mapping[str, Any], *layers: Mapping[str, Any]) -> dict[str, Any]:
    """The file's settings, overridden by each later layer's (None means "not given")."""
    out = dict(file_settings)
    for layer in layers:
        for k, v in layer.items():
            if v is not None:
                out[k] = v
    return out


def build_mount_config(settings: Mapping[str, Any], *, foreground: bool = False,
                       extra_fuse: Iterable[str] = (),
                       create: bool = True):  # type: ignore[no-untyped-def]
    """Merged settings -> a :class:`MountConfig` (needs source and mountpoint)."""
    s = dict(settings)
    if not s.get("source"):
        raise UsageError("no source: give SOURCE (s3://BUCKET/PREFIX or a store directory) "
                         "or `source = ...` in the config file")
    if not s.get("mountpoint"):
        raise UsageError("no mountpoint: give MOUNTPOINT or `mountpoint = ...` in the "
                         "config file")
    problem = options.kms_key_problem(s.get("sse"), s.get("sse_kms_key_id"))
    if problem:
        raise ConfigError(problem)
    fuse = list(s.get("fuse_options") or [])
    for opt in extra_fuse:
        if opt not in fuse:
            fuse.append(opt)
    if "allow_other" in fuse:
        fuse.remove("allow_other")
        s["allow_other"] = True
    cfg = MountConfig(
        source=source_location(str(s["source"]), create),
        mountpoint=Path(s["mountpoint"]).absolute(),
        cache_dir=Path(s["cache_dir"]).absolute() if s.get("cache_dir") else None,
        foreground=foreground,
        fuse_options=fuse,
    )
    for name in options.names("mount", config=True):
        if name not in ("source", "mountpoint", "cache_dir", "fuse_options") \
                and s.get(name) is not None:
            setattr(cfg, name, s[name])
    if cfg.log_file not in (None, "stderr", "syslog"):
        cfg.log_file = str(Path(cfg.log_file).absolute())
    return cfg


__all__ = ["MountConfig", "load_file", "parse_options", "merge", "build_mount_config", "config_path",
           "use_credentials_file", "source_location", "Options", "SETTINGS"]
