"""The series the benchmark copies: real release data and a synthetic series."""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltafs-bench"
FETCH = Path(__file__).resolve().parents[1] / "scripts" / "fetch-release-series"


@dataclass
class Series:
    name: str
    label: str
    files: list[Path]
    #: sha256 hex of each file, by name
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def logical(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def describe(self) -> str:
        n = len(self.files)
        return f"{self.label}: {n} files, {self.logical / 1e6:.0f} MB"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def release_series(kind: str, count: int, cache: Path = CACHE) -> Series:
    """The first ``count`` botocore wheels (``kind='wheels'``) or tars (``'tars'``)."""
    d = cache / kind
    files = sorted(p for p in d.glob("*") if p.is_file() and not p.name.endswith(".part"))
    if len(files) < count:
        raise FileNotFoundError(
            f"{d} has {len(files)} files, {count} needed: run "
            f"{FETCH} first")
    label = {"wheels": "botocore wheels", "tars": "botocore tars"}[kind]
    return Series(kind, label, files[:count])


def tgz_series(maker: str, count: int, cache: Path = CACHE) -> Series:
    """The botocore tars compressed two ways, made once into the cache: ``python`` as
    Python's ``tarfile``/``gzip`` writes (zlib level 9, name and mtime in the header:
    PyPI sdists, build tools) and ``gnu`` as ``tar -czf`` does (GNU gzip -6 on a pipe:
    no name, mtime 0). The first ``count``."""
    import gzip
    import shutil
    import subprocess

    tars = release_series("tars", count, cache).files
    d = cache / f"tgz-{maker}"
    d.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for t in tars:
        dest = d / (t.name + ".gz")
        if not dest.exists():
            tmp = dest.with_name(dest.name + ".part")
            with open(t, "rb") as src, open(tmp, "wb") as raw:
                if maker == "python":
                    with gzip.GzipFile(t.name, "wb", 9, raw, mtime=int(t.stat().st_mtime)) as g:
                        shutil.copyfileobj(src, g, 1 << 20)
                else:
                    subprocess.run(["gzip", "-c", "-6"], stdin=src, stdout=raw, check=True)
            tmp.rename(dest)
        out.append(dest)
    label = {"python": "botocore .tar.gz (Python tarfile/gzip)",
             "gnu": "botocore .tar.gz (GNU tar -czf)"}[maker]
    return Series(f"tgz-{maker}", label, out)


def _mutate(data: bytearray, rng: random.Random) -> bytearray:
    """The next version: ~1 % of the bytes rewritten in scattered blocks, one 256 KiB
    insertion, one 128 KiB deletion and 64 KiB appended (a growing image or backup)."""
    n = len(data)
    budget = n // 100
    while budget > 0:
        size = min(budget, rng.randrange(4 << 10, 64 << 10))
        at = rng.randrange(0, max(1, len(data) - size))
        data[at:at + size] = rng.randbytes(size)
        budget -= size
    at = rng.randrange(0, len(data))
    data[at:at] = rng.randbytes(256 << 10)
    at = rng.randrange(0, len(data) - (128 << 10))
    del data[at:at + (128 << 10)]
    data += rng.randbytes(64 << 10)
    return data


def synthetic_series(count: int, size: int, cache: Path = CACHE) -> Series:
    """``count`` versions of a ``size``-byte binary image (seeded, so every run and
    machine gets the same bytes), generated once into the cache."""
    mb = size // 1_000_000
    d = cache / f"synthetic-{count}x{mb}MB"
    names = [f"image-v{i + 1:02d}.iso" for i in range(count)]
    stamp = d / ".complete"
    if not stamp.exists():
        d.mkdir(parents=True, exist_ok=True)
        rng = random.Random(20240611 + size)
        data = bytearray(rng.randbytes(size))
        for name in names:
            tmp = d / (name + ".part")
            tmp.write_bytes(data)
            tmp.rename(d / name)
            data = _mutate(data, rng)
        stamp.write_text("ok\n")
    # .iso is on DeltaGlider's list of delta candidates: it gets its fair try here
    return Series("synthetic", f"synthetic {mb} MB image", [d / n for n in names])


def small_files(root: Path, count: int, seed: int = 7) -> Path:
    """``count`` small files (0.5-8 KB) in one directory, for the metadata tests."""
    d = root / "small"
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        (d / f"file-{i:05d}.txt").write_bytes(rng.randbytes(rng.randrange(512, 8192)))
    return d
