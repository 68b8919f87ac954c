"""Estimate what delta storage would save on a bucket of plain objects.

For each directory (deltaspace) with at least two candidate files, the oldest candidate
plays the reference and a spread-out sample of the others is encoded, by the writer's
rules: in deltafs's format (the default for new directories) each file against the one
before it (a chain, :mod:`deltafs.chain`) and a gzip file as a delta of its content; in
DeltaGlider's format against the reference. The sampled ratios are extrapolated to the
directory; small files and other compressed streams count as stored whole. Nothing is
written.
"""
from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import chain, codec, extension, gzrecipe
from .engine import Engine
from .format import DELTA_SUFFIX, REFERENCE_NAME, is_compressed_stream, is_zstd, split_key
from .store.base import ObjectInfo

log = logging.getLogger(__name__)


@dataclass
class Analysis:
    objects: int = 0
    logical_bytes: int = 0
    estimated_bytes: int = 0
    sampled: int = 0
    directories: list[dict[str, object]] = field(default_factory=list)

    @property
    def savings(self) -> float:
        return 1 - self.estimated_bytes / self.logical_bytes if self.logical_bytes else 0.0


def analyze(engine: Engine, prefix: str, sample: int = 4,
            progress: Callable[[str], None] | None = None) -> Analysis:
    """Sample-encode each deltaspace below ``prefix``; see the module docstring."""
    store = engine.store
    spaces: dict[str, list[ObjectInfo]] = defaultdict(list)
    result = Analysis()
    for o in store.iter_objects(prefix):
        if o.key.endswith("/") or chain.is_hidden_key(o.key):
            continue
        name = split_key(o.key)[1]
        result.objects += 1
        result.logical_bytes += o.size
        if name == REFERENCE_NAME or name.endswith(DELTA_SUFFIX):
            # already delta-stored: count as it is
            result.estimated_bytes += o.size
            continue
        spaces[split_key(o.key)[0]].append(o)

    policy = engine.policy
    with tempfile.TemporaryDirectory(dir=engine.tmp_dir) as tmp_name:
        tmp = Path(tmp_name)
        for space, objects in sorted(spaces.items()):
            big = [o for o in objects if o.size >= policy.min_delta_size]
            small_bytes = sum(o.size for o in objects if o.size < policy.min_delta_size)
            if len(big) < 2:
                result.estimated_bytes += sum(o.size for o in objects)
                continue
            big.sort(key=lambda o: (o.mtime, o.key))
            if progress:
                progress(space or "(root)")
            ref_obj = big[0]
            ref = tmp / "ref"
            store.get_file(ref_obj.key, ref)
            with open(ref, "rb") as f:
                ref_head = f.read(8)
            ref_compressed = is_compressed_stream(ref_head)
            rest = big[1:]
            # evenly spread over the whole series, both ends included: drift from the
            # reference grows with distance, so a sample of early files underestimates
            k = min(sample, len(rest))
            picks = [rest[round(i * (len(rest) - 1) / (k - 1))] for i in range(k)] \
                if k > 1 else rest[:k]
            chained = policy.format != "deltaglider" and policy.chains
            ratios: list[float] = []
            for o in picks:
                if chained:  # against its predecessor, as the writer's chain would
                    base_obj = big[big.index(o) - 1]
                    if base_obj is not ref_obj:
                        store.get_file(base_obj.key, tmp / "base")
                    ref = tmp / "base" if base_obj is not ref_obj else tmp / "ref"
                    with open(ref, "rb") as f:
                        ref_head = f.read(8)
                    ref_compressed = is_compressed_stream(ref_head)
                target = tmp / "target"
                store.get_file(o.key, target)
                with open(target, "rb") as f:
                    head = f.read(8)
                delta = tmp / "delta"
                # zstd streams delta byte for byte, in deltafs's format (format.is_zstd)
                zstd_pair = policy.format != "deltaglider" and \
                    (is_zstd(head) or not is_compressed_stream(head)) and \
                    (is_zstd(ref_head) or not ref_compressed)
                if (ref_compressed or is_compressed_stream(head)) and not zstd_pair:
                    # the writer's rules: a gzip file (or reference) is a delta of its
                    # content in deltafs's format; other compressed streams stay whole
                    ok = (policy.format != "deltaglider" and extension.wanted(ref_head, head)
                          and not (ref_compressed and not gzrecipe.is_gzip(ref_head))
                          and not (is_compressed_stream(head) and not gzrecipe.is_gzip(head)))
                    if not ok:
                        ratios.append(1.0)
                        continue
                    scratch = tmp / "scratch"
                    scratch.mkdir(exist_ok=True)
                    enc = extension.encode(ref, target, o.size, delta, scratch,
                                           policy.codec_limits())
                    size = enc.size if isinstance(enc, extension.Encoded) else None
                    for child in scratch.iterdir():
                        child.unlink()
                else:
                    res = codec.encode(ref, target, delta, limits=policy.codec_limits())
                    size = res.delta_size
                delta.unlink(missing_ok=True)
                ratios.append(size / o.size if size is not None else 1.0)
                result.sampled += 1
            mean = sum(ratios) / len(ratios) if ratios else 1.0
            rest_bytes = sum(o.size for o in rest)
            estimate = ref_obj.size + int(rest_bytes * mean) + small_bytes
            result.estimated_bytes += estimate
            logical = sum(o.size for o in objects)
            result.directories.append({
                "prefix": space, "files": len(objects), "logical_bytes": logical,
                "estimated_bytes": estimate, "sampled": len(picks),
                "mean_delta_ratio": round(mean, 4),
            })
            (tmp / "ref").unlink(missing_ok=True)
            (tmp / "base").unlink(missing_ok=True)
    return result
