"""Issue 13: every setting has one definition (``deltafs.options``), shared by the
commands, ``deltafs mount``, ``mount.deltafs`` option strings and config files; and the
package's modules import on their own, with no cycle between them."""
from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deltafs import membudget, options
from deltafs.api import DEFAULT_CACHE_SIZE
from deltafs.cli import build_parser, settings
from deltafs.config import SETTINGS, MountConfig, load_file, parse_options
from deltafs.errors import UsageError

PKG = Path(__file__).resolve().parent.parent / "deltafs"

CLI_COMMANDS = ("put", "get", "ls", "rm", "gc", "stats", "verify", "analyze")
#: flags of one command alone, which are not settings (what to do, not how)
OWN_FLAGS = {
    "put": {"--json", "--recursive", "-r"},
    "get": set(),
    "ls": {"--json", "--long", "-l", "--recursive", "-R"},
    "rm": {"--recursive", "-r", "--force"},
    "gc": {"--json", "--grace", "--dry-run"},
    "stats": {"--json"},
    "verify": {"--json"},
    "analyze": {"--json", "--sample"},
    "mount": {"--config", "-o", "--foreground", "-f"},
}

#: a value each converter takes, and what it makes of it
SAMPLES = {
    options.size: ("3M", 3 << 20), options.int_pos: ("3", 3), options.port: ("9109", 9109),
    options.level: ("3", 3), options.seconds: ("2.5", 2.5), options.ratio: ("0.5", 0.5),
    options.boolean: ("true", True), options.text: ("x", "x"),
    options.path: ("/x", "/x"), options.log_target: ("journal", "syslog"),
    options.fmt: ("deltaglider", "deltaglider"), options.sse: ("aes256", "AES256"),
    options.storage_class: ("standard-ia", "STANDARD_IA"),
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001 - argparse keeps them there
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {f for a in parser._actions for f in a.option_strings}  # noqa: SLF001


def _squash(text: str) -> str:
    return " ".join(text.replace("%%", "%").split())


@pytest.mark.parametrize("command", [*CLI_COMMANDS, "mount"])
def test_each_command_shows_the_tables_options_and_no_other_setting(command: str) -> None:
    scope = "mount" if command == "mount" else "cli"
    sub = _subparsers(build_parser())[command]
    text = sub.format_help()
    table = {f for o in options.for_scope(scope) if o.flag for f in o.flags}
    shown = _flags(sub) - {"-h", "--help"}
    assert all(f in text for f in shown)
    assert shown - table <= OWN_FLAGS[command], \
        f"{command}: flags outside the options table: {shown - table - OWN_FLAGS[command]}"
    assert table <= shown, f"{command}: table options missing: {table - shown}"
    flat = _squash(text)
    for o in options.for_scope(scope):
        if o.flag:
            assert _squash(o.help_text()) in flat, f"{command} --{o.name}: help differs"


def test_the_commands_and_the_mount_share_every_common_option() -> None:
    """The same name means the same thing: same flag, type, default and help on both."""
    cli = {o.name for o in options.for_scope("cli")}
    for name in ("cache_size", "level", "max_ratio", "min_delta_size", "format",
                 "memory_limit", "endpoint_url", "credentials_file", "sse", "storage_class"):
        assert name in cli and "mount" in options.BY_NAME[name].scopes
    args = build_parser().parse_args(["put", "f", "s3://b/"])
    s = settings(args)
    cfg = MountConfig(source=None, mountpoint=Path("/m"))  # type: ignore[arg-type]
    for name in cli & {o.name for o in options.for_scope("mount")}:
        if hasattr(cfg, name):
            assert s[name] == getattr(cfg, name), name
    assert s["cache_size"] == DEFAULT_CACHE_SIZE == 10 << 30
    assert membudget.DEFAULT_LIMIT == options.DEFAULT_MEMORY_LIMIT == s["memory_limit"]
    # --level used to be parsed two ways; now one converter for both
    p = build_parser()
    assert p.parse_args(["put", "--level", "0", "f", "d/"]).level == 0
    assert p.parse_args(["mount", "--level", "0", "s", "m"]).level == 0


def test_every_config_setting_is_taken_by_files_and_option_strings(tmp_path: Path) -> None:
    for o in options.for_scope("mount"):
        if not o.config or o.name in ("fuse_options",):
            continue
        assert o.name in SETTINGS
        given, want = SAMPLES[o.convert]
        assert parse_options([f"{o.name}={given}"]).settings[o.name] == want, o.name
        f = tmp_path / f"{o.name}.toml"
        f.write_text(f'{o.name} = "{given}"\n')
        assert load_file(f)[o.name] == want, o.name
        # and as a flag, the same
        if o.flag and not o.action:
            args = build_parser().parse_args(["mount", f"--{o.name.replace('_', '-')}",
                                              given, "s", "m"])
            assert getattr(args, o.name) == want, o.name
    for name in ("quiet", "verbose"):
        with pytest.raises(UsageError):
            parse_options([f"{name}=1"])


def test_bad_values_get_one_clear_message_everywhere(tmp_path: Path) -> None:
    for bad in ("--storage-class=GLACIER", "--sse=des", "--cache-size=lots", "--level=12"):
        r = subprocess.run([sys.executable, "-m", "deltafs.cli", "put", bad, "f", "d/"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "deltafs.cli", "put", "--storage-class",
                        "DEEP_ARCHIVE", "f", "d/"], capture_output=True, text=True)
    assert "restore" in r.stderr
    with pytest.raises(UsageError, match="storage_class"):
        parse_options(["storage_class=GLACIER"])


# ---------------------------------------------------------------------- imports


def _modules() -> list[str]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_every_module_imports_on_its_own() -> None:
    """Each module in a fresh interpreter: an import that works only because another
    module happened to load first fails here."""
    env = {**os.environ, "PYTHONPATH": str(PKG.parent)}

    def one(mod: str) -> tuple[str, int, str]:
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True,
                           text=True, env=env)
        return mod, r.returncode, r.stderr[-2000:]

    with ThreadPoolExecutor(4) as pool:
        failed = [(m, err) for m, rc, err in pool.map(one, _modules()) if rc]
    assert not failed, failed
    # and the light ones stay light: the store package does not load boto3
    r = subprocess.run([sys.executable, "-c", "import sys, deltafs.store, deltafs.config, "
                        "deltafs.options; print('boto3' in sys.modules)"],
                       capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "False", r.stderr


def _graph() -> dict[str, set[str]]:
    mods = set(_modules())

    def target(cur: str, node: ast.ImportFrom | ast.Import) -> list[str]:
        is_pkg = (PKG.parent / cur.replace(".", "/") / "__init__.py").exists()
        pkg = cur if is_pkg else cur.rsplit(".", 1)[0]
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name in mods]
        if node.level:
            base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        return [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod
                for a in node.names if f"{mod}.{a.name}" in mods or mod in mods]

    graph: dict[str, set[str]] = {}
    for mod in mods:
        path = PKG.parent / (mod.replace(".", "/") + ".py")
        if not path.exists():
            path = PKG.parent / mod.replace(".", "/") / "__init__.py"
        deps: set[str] = set()

        def visit(node: ast.AST) -> None:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for n in node.orelse:
                    visit(n)
                return
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(target(mod, node))  # noqa: B023
            for child in ast.iter_child_nodes(node):
                visit(child)

        visit(ast.parse(path.read_text()))
        graph[mod] = deps - {mod}
    return graph


def test_no_import_cycle_even_through_imports_inside_functions() -> None:
    graph = _graph()
    assert graph["deltafs.cli"] and graph["deltafs.daemon"]  # the walk finds imports
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                walk(dep, path + [dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            walk(mod, [mod])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_s3_settings_on_a_local_store_and_odd_sizes_are_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    subprocess.run([sys.executable, "-m", "deltafs.cli", "init", str(store)], check=True,
                   capture_output=True)
    (tmp_path / "f").write_bytes(b"x")
    r = subprocess.run([sys.executable, "-m", "deltafs.cli", "put", "--sse", "AES256",
                        str(tmp_path / "f"), f"{store}/d/"], capture_output=True, text=True)
    assert r.returncode == 2 and "local store" in r.stderr, r.stderr
    for odd in ("inf", "1e400"):
        r = subprocess.run([sys.executable, "-m", "deltafs.cli", "put", "--cache-size", odd,
                            str(tmp_path / "f"), f"{store}/d/"], capture_output=True,
                           text=True)
        assert r.returncode == 2 and "not a size" in r.stderr, r.stderr
    from deltafs.config import build_mount_config
    from deltafs.errors import ConfigError
    with pytest.raises(ConfigError, match="aws:kms"):
        build_mount_config({"source": "s3://b/", "mountpoint": str(tmp_path),
                            "sse": "AES256", "sse_kms_key_id": "k"})
    f = tmp_path / "rel.toml"
    f.write_text('metrics_textfile = "deltafs.prom"\n')
    with pytest.raises(ConfigError, match="absolute"):
        load_file(f)
