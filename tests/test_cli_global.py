"""The ``billing`` root: version, help with examples on EVERY command, global options."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import typer

from billing_cli import __version__
from billing_cli.cli import app as app_module
from billing_cli.cli._context import AppContext

REGISTRY = """\
[defaults]
ca_bundle_ref = "system"

[[sources]]
source_id = "a"
node_id = "n1"
env = "prod"
base_url = "https://a.example.net"
auth_mode = "bearer"
credential_ref = "env:A"
"""


def command_paths() -> Iterator[tuple[str, ...]]:
    """Every command and group of the real command tree, including ones added later."""
    root = typer.main.get_command(app_module.full_app())

    def walk(cmd: click.Command, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        yield path
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                if not sub.hidden:
                    yield from walk(sub, (*path, name))

    yield from walk(root, ())


PATHS = list(command_paths())


def test_tree_has_the_sources_commands() -> None:
    for verb in ("add", "list", "show", "remove", "enable", "disable"):
        assert ("sources", verb) in PATHS


def test_version(cli: Any) -> None:
    res = cli("--version")
    assert res.exit_code == 0
    assert res.stdout == f"billing {__version__}\n"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "billing")
def test_every_help_has_examples(cli: Any, path: tuple[str, ...]) -> None:
    res = cli(*path, "--help")
    assert res.exit_code == 0, res.output
    assert "Examples:" in res.stdout
    # The examples are runnable lines of this very command.
    assert f"billing {' '.join(path)}".rstrip() in res.stdout


def test_no_args_shows_help(cli: Any) -> None:
    res = cli()
    assert "Usage: billing" in res.output
    assert "sources" in res.output


def test_unknown_command_is_a_usage_error(cli: Any) -> None:
    res = cli("sourcez")
    assert res.exit_code == 2
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    ("args", "suggestion"),
    [(("colect",), "'collect'"), (("sources", "lst"), "'list'"), (("integrity", "ak"), "'ack'")],
)
def test_a_typo_gets_one_suggestion(cli: Any, args: tuple[str, ...], suggestion: str) -> None:
    res = cli(*args)
    assert res.exit_code == 2
    assert res.stderr.count("Did you mean") == 1
    assert suggestion in res.stderr


@pytest.fixture
def contexts(monkeypatch: pytest.MonkeyPatch) -> list[AppContext]:
    """Capture the AppContext the root callback builds, to see the resolved options."""
    seen: list[AppContext] = []

    class Capturing(AppContext):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(app_module, "AppContext", Capturing)
    return seen


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(REGISTRY)
    return path


def test_global_options_after_the_subcommand(
    cli: Any, registry: Path, contexts: list[AppContext]
) -> None:
    res = cli(
        "sources", "list", "--json", "--registry", str(registry), "--db", "x.db",
        "--log-format", "json", "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    (ctx,) = contexts
    assert ctx.registry_path == registry
    assert ctx.registry_explicit is True
    assert ctx.db_url == "x.db"
    assert ctx.log_format == "json"
    assert ctx.quiet


def test_global_options_with_equals_sign(cli: Any, registry: Path) -> None:
    res = cli("sources", "show", "a", f"--registry={registry}", "--json")
    assert res.exit_code == 0, res.output
    assert '"source_id": "a"' in res.stdout


def test_registry_env_is_explicit(
    cli: Any, registry: Path, contexts: list[AppContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BILLING_REGISTRY", str(registry))
    assert cli("sources", "list").exit_code == 0
    assert contexts[0].registry_path == registry
    assert contexts[0].registry_explicit is True


def test_registry_default(cli: Any, contexts: list[AppContext]) -> None:
    cli("sources", "list")
    assert contexts[0].registry_path == Path("sources.toml")
    assert contexts[0].registry_explicit is False


@pytest.mark.parametrize(
    ("flag", "billing_env", "legacy_env", "expected"),
    [
        (None, None, None, "billing.db"),
        (None, None, "postgresql://legacy/db", "postgresql://legacy/db"),
        (None, "postgresql://new/db", "postgresql://legacy/db", "postgresql://new/db"),
        ("flag.db", "postgresql://new/db", "postgresql://legacy/db", "flag.db"),
    ],
)
def test_db_precedence(
    cli: Any,
    registry: Path,
    contexts: list[AppContext],
    monkeypatch: pytest.MonkeyPatch,
    flag: str | None,
    billing_env: str | None,
    legacy_env: str | None,
    expected: str,
) -> None:
    if billing_env:
        monkeypatch.setenv("BILLING_DATABASE_URL", billing_env)
    if legacy_env:
        monkeypatch.setenv("DATABASE_URL", legacy_env)
    args = ["sources", "list", "--registry", str(registry)]
    if flag:
        args += ["--db", flag]
    assert cli(*args).exit_code == 0
    assert contexts[0].db_url == expected


def test_bad_log_format_is_a_usage_error(cli: Any) -> None:
    res = cli("sources", "list", "--log-format", "xml")
    assert res.exit_code == 2
    assert "xml" in res.output
    assert "Traceback" not in res.output


def _billing(*args: str) -> subprocess.CompletedProcess[str]:
    """The real program: click's own rendering would go straight to the process's stderr."""
    return subprocess.run(
        [sys.executable, "-m", "billing_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("usage", "--nope"), "no such option '--nope'"),
        (("colect",), "did you mean one of: 'collect'"),
        (("usage", "--by", "week"), "'week' is not one of"),
        (("integrity", "ack", "--source"), "'--source' requires an argument"),
        (("sources", "add"), "missing argument"),
    ],
)
def test_usage_errors_are_one_error_line(args: tuple[str, ...], needle: str) -> None:
    res = _billing(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), res.stderr
    assert needle.lower() in lines[0].lower()


def test_a_group_without_a_command_still_shows_its_help() -> None:
    res = _billing("sources")
    assert res.returncode == 2
    assert "Usage: billing sources" in res.stderr
    assert "list" in res.stderr


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_db_flag_is_a_flag_error(cli: Any, registry: Path, value: str) -> None:
    res = cli("--registry", str(registry), "--db", value, "sources", "list")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: --db is empty")
    assert len(res.stderr.splitlines()) == 1
    assert not Path("billing.db").exists()


# --- shell completion (typer's) ------------------------------------------------------------


def test_show_completion_prints_a_script_for_the_shell() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "billing_cli", "--show-completion", "bash"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    )
    assert res.returncode == 0, res.stderr
    assert "complete -o default -F _billing_completion billing" in res.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("billing sou", {"sources"}),
        ("billing sources s", {"show", "set"}),
        ("billing integrity a", {"ack"}),
        ("billing usage --wi", {"--wide"}),
    ],
)
def test_completion_through_a_real_bash(words: str, expected: set[str]) -> None:
    """The script `--show-completion bash` prints, sourced by bash, asks billing itself."""
    bindir = str(Path(sys.executable).parent)
    assert (Path(bindir) / "billing").exists()
    script = (
        "source <(billing --show-completion bash); COMP_WORDS=($WORDS); "
        "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); _billing_completion billing; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
        "WORDS": words,
        "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1",
    }
    res = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert res.returncode == 0, res.stderr
    assert set(res.stdout.split()) == expected, res.stdout


def test_a_db_path_no_file_system_can_hold_is_a_flag_error(cli: Any) -> None:
    for path in ("x" * 100_000, "d/" + "y" * 300 + ".db"):
        res = cli("--db", path, "usage")
        assert res.exit_code == 2, res.output
        assert res.stderr.startswith("error: --db: the path")
        assert len(res.stderr) < 300


def test_a_malformed_postgres_url_never_shows_its_password(cli: Any) -> None:
    res = cli("--db", "postgresql://u:s3cretpw@[::1", "usage")
    assert res.exit_code == 4, res.output
    assert "s3cretpw" not in res.output
    assert res.stderr.count("\n") == 1
