"""The ``deltafs`` program's entry point: ``deltafs mount`` runs itself again with the
daemon's allocator (:func:`memtrim.use_c_allocator`) before anything heavy is imported.

Why a module of its own: ``cli`` imports boto3, the engine and the store (~0.3 s), and
the ``execve`` that picks the allocator threw that away and paid it again, on every
mount (the test suite mounts hundreds of times; a boot mounts every fstab entry).
"""
from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["mount"]:
        from .memtrim import use_c_allocator

        use_c_allocator()  # returns when not needed (or not possible)
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
