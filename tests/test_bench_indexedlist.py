"""The benchmark's indexed ListObjectsV2 (bench/indexedlist.py) answers exactly as moto's
own does: same keys, common prefixes, truncation and continuation, on random buckets
with writes and deletes between pages. It only changes the cost."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import random, sys
sys.path.insert(0, sys.argv[1])
from moto.s3 import models
from moto.core import DEFAULT_ACCOUNT_ID
orig = models.S3Backend.list_objects_v2
from bench import indexedlist
indexedlist.install()
new = models.S3Backend.list_objects_v2
backend = models.s3_backends[DEFAULT_ACCOUNT_ID]["global"]
backend.create_bucket("bench-b", "us-east-1")
bucket = backend.get_bucket("bench-b")
rng = random.Random(int(sys.argv[2]))
alphabet = "ab/.-0"
def name():
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))
for _ in range(400):
    backend.put_object("bench-b", name(), b"x")

def names(result):
    return [k if isinstance(k, str) else k.name for k in result]

def walk(fn, prefix, delim, size, start_after, mutate):
    out, token, pages = [], None, 0
    while True:
        keys, truncated, token = fn(backend, bucket, prefix, delim, token,
                                    start_after if token is None else None, size)
        out.append((names(keys), truncated))
        pages += 1
        if not truncated or pages > 500:
            return out
        mutate(pages)

checked = 0
for round_ in range(60):
    prefix = rng.choice(["", "a", "a/", "b", "ab", "/", "a/b"])
    delim = rng.choice([None, "/", "/"])
    size = rng.choice([1, 2, 3, 7, 50, 1000])
    start_after = rng.choice([None, None, "a", "a/", "b/"])
    def mutator():
        r = random.Random(round_)
        def mutate(page):
            for _ in range(3):
                n = "".join(r.choice(alphabet) for _ in range(r.randint(1, 7)))
                if r.random() < 0.5:
                    backend.put_object("bench-b", n, b"y")
                elif n in bucket.keys:
                    backend.delete_object("bench-b", n)
        return mutate
    snapshot = {k: list(v) for k, v in dict.items(bucket.keys)}
    want = walk(orig, prefix, delim, size, start_after, mutator())
    # the same mutations again, from the same start
    for k in list(dict.keys(bucket.keys)):
        dict.__delitem__(bucket.keys, k)
    for k, v in snapshot.items():
        bucket.keys.setlist(k, v)
    got = walk(new, prefix, delim, size, start_after, mutator())
    assert got == want, (prefix, delim, size, start_after, got[:3], want[:3])
    checked += len(want)
print("ok", checked)
'''


def test_indexed_listing_answers_as_moto_does() -> None:
    for seed in (1, 2):
        res = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(seed)],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-3000:]
