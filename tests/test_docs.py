"""README.md and the CLI must not drift apart (in the style of sqlite-utils' docs tests).

* every command and sub-command of the click tree is shown in the README as ``billing <cmd>``
  (in a heading or in code: a fenced block or inline code);
* every ``billing ...`` invocation written in the README's code names commands that exist;
* every ``--flag`` of every command (global options included) appears in the README;
* every command's ``--help`` has an ``Examples:`` block, and the examples there name commands
  that exist.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import click
import pytest
import typer.main

from billing_cli.cli.app import full_app

README = Path(__file__).resolve().parent.parent / "README.md"

_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")
_HEADING = re.compile(r"^#{1,6}\s+(.+)$", re.M)
# ``billing`` as a program name: at a word start, possibly as a path (``/usr/bin/billing``),
# followed by at least one argument.
_INVOCATION = re.compile(r"(?:(?<=^)|(?<=[\s/`$(|;&=]))billing[ \t]+([^\n]*)")
_SHELL_FENCES = {"", "sh", "bash", "console", "shell", "shell-session", "text", "ini", "cron"}
_GLOBAL_WITH_VALUE = {"--registry", "--db", "--log-format"}


@cache
def root() -> click.Group:
    cmd = typer.main.get_command(full_app())
    assert isinstance(cmd, click.Group)
    return cmd


def command_tree(
    group: click.Group | None = None, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    group = group or root()
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        path = (*prefix, name)
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from command_tree(cmd, path)


def flags_of(cmd: click.Command) -> set[str]:
    out: set[str] = set()
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            out.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return out


@cache
def readme_text() -> str:
    if not README.exists():
        pytest.fail(f"{README} is missing: the operator README documents every command")
    return README.read_text(encoding="utf-8")


def code_snippets(text: str) -> list[str]:
    """Heading text, shell-like fenced blocks (continuations joined) and inline code."""
    snippets: list[str] = []
    for lang, body in _FENCE.findall(text):
        if lang.lower() in _SHELL_FENCES:
            for line in body.replace("\\\n", " ").splitlines():
                # Drop shell comments: "# runs `billing demo`" is prose, not a command.
                code = line.split(" #", 1)[0]
                if not code.lstrip().startswith("#"):
                    snippets.append(code)
    # Headings and inline code outside fenced blocks (a "# comment" in a block is no heading).
    prose = _FENCE.sub("", text)
    # A heading counts when it *is* a command ("## billing status"); inline code inside a
    # heading ("## `billing status`") is picked up with the rest of the inline code below,
    # and prose such as "## As `billing` accepts it" is not an invocation.
    snippets.extend(h for h in _HEADING.findall(prose) if h.strip().startswith("billing "))
    snippets.extend(_INLINE.findall(prose))
    return snippets


def invocations(text: str) -> list[str]:
    """The argument strings after every ``billing`` written as a program in ``text``."""
    found: list[str] = []
    for snippet in code_snippets(text):
        for m in _INVOCATION.finditer(snippet):
            before = snippet[: m.start()].split()
            if before and before[-1].startswith("-"):
                continue  # a value, e.g. the user in `crontab -u billing file`
            found.append(m.group(1))
    return found


def resolve(argline: str) -> tuple[tuple[str, ...], str | None]:
    """Walk the click tree along ``argline``: (command path, error or None).

    Global options (and their values) may come first; ``a|b`` lists alternatives (used in
    headings such as ``billing sources enable|disable``) and every alternative must exist.
    """
    try:
        tokens = shlex.split(argline, comments=True)
    except ValueError:
        tokens = argline.split()
    path: tuple[str, ...] = ()
    cmd: click.Command = root()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("|", "&&", ";", "||", ">", "2>&1") or tok.startswith((">", "<")):
            break
        if tok.startswith("-"):
            if not isinstance(cmd, click.Group):
                break  # options of a leaf command: the path is complete
            i += 2 if tok in _GLOBAL_WITH_VALUE else 1
            continue
        if not isinstance(cmd, click.Group):
            break  # an argument of a leaf command
        ctx = click.Context(cmd)
        names = tok.split("|")
        missing = [n for n in names if cmd.get_command(ctx, n) is None]
        if missing:
            where = " ".join(("billing", *path))
            return path, f"{where!r} has no sub-command {missing[0]!r}"
        sub = cmd.get_command(ctx, names[0])
        assert sub is not None
        path = (*path, names[0])
        cmd = sub
        i += 1
    return path, None


def documented_paths(text: str) -> set[tuple[str, ...]]:
    paths: set[tuple[str, ...]] = set()
    for argline in invocations(text):
        try:
            tokens = shlex.split(argline, comments=True)
        except ValueError:
            tokens = argline.split()
        # Expand ``a|b`` alternatives so each one counts as documented.
        for alt in _expand_alternatives(tokens):
            path, error = resolve(shlex.join(alt))
            if error is None:
                paths.update(path[:n] for n in range(1, len(path) + 1))
    return paths


def _expand_alternatives(tokens: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for tok in tokens:
        choices = tok.split("|") if "|" in tok and not tok.startswith("-") and tok != "|" else [tok]
        out = [[*prefix, c] for prefix in out for c in choices]
    return out


# --- the tests ---------------------------------------------------------------------------


def test_the_cli_has_commands_to_document() -> None:
    paths = {p for p, _ in command_tree()}
    # The commands the design promises (DESIGN §8); each one is documented below.
    for expected in ("collect", "reconcile", "sources", "status", "usage", "ledger", "demo"):
        assert (expected,) in paths, f"billing {expected} is not registered"


def test_every_command_is_documented_in_the_readme() -> None:
    documented = documented_paths(readme_text())
    missing = [" ".join(p) for p, _ in command_tree() if p not in documented]
    assert not missing, (
        "README.md never shows these commands as `billing <cmd>` "
        f"(a heading or an example): {missing}"
    )


def test_every_documented_command_exists() -> None:
    problems = []
    for argline in invocations(readme_text()):
        _, error = resolve(argline)
        if error is not None:
            problems.append(f"billing {argline.strip()}: {error}")
    assert not problems, "README.md shows commands the CLI does not have:\n" + "\n".join(problems)


def test_every_flag_is_documented_in_the_readme() -> None:
    text = readme_text()
    missing: list[str] = []
    for path, cmd in [((), root()), *command_tree()]:
        for flag in sorted(flags_of(cmd)):
            if not re.search(re.escape(flag) + r"(?![\w-])", text):
                missing.append(f"billing {' '.join(path)} {flag}".replace("  ", " "))
    assert not missing, "README.md never mentions these flags:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    "path", [" ".join(p) for p, c in command_tree() if not isinstance(c, click.Group)]
)
def test_every_command_help_has_runnable_examples(path: str) -> None:
    cmd = root()
    ctx = click.Context(cmd)
    for name in path.split():
        assert isinstance(cmd, click.Group)
        ctx = click.Context(cmd, parent=ctx, info_name=name)
        sub = cmd.get_command(ctx, name)
        assert sub is not None
        cmd = sub
    help_text = cmd.help or ""
    assert "Examples:" in help_text, f"`billing {path} --help` has no Examples: block"
    examples = help_text.split("Examples:", 1)[1]
    lines = [m.group(1) for m in _INVOCATION.finditer(examples)]
    assert lines, f"`billing {path} --help` Examples: block shows no `billing ...` line"
    for argline in lines:
        resolved, error = resolve(argline)
        assert error is None, f"`billing {path} --help` example `billing {argline}`: {error}"
        assert resolved, f"`billing {path} --help` example `billing {argline}` names no command"


# --- the checker checks itself (so a passing run means something) --------------------------


def test_checker_parses_invocations_from_code_only() -> None:
    text = """
# Operating `billing status`

## billing usage

## As `billing` sees it

Plain prose about billing collect is not an example.

```bash
billing --db /var/lib/billing.db collect -q   # every minute, not `billing nothing`
crontab -u billing crontab.example
/usr/local/bin/billing sources list \\
    --json
```

```toml
# billing nothing here
```

Run `billing status --json` or `billing nosuch`.
"""
    got = invocations(text)
    assert any(a.strip() == "status" for a in got)  # from the heading
    assert any(a.startswith("--db /var/lib/billing.db collect") for a in got)
    assert any(a.startswith("sources list") and "--json" in a for a in got)
    assert "status --json" in got
    assert "nosuch" in got
    assert not any("nothing" in a for a in got)
    assert not any("crontab" in a for a in got)
    assert "usage" in got
    assert not any("sees" in a for a in got)
    assert not any(a.startswith("collect is") for a in got)


def test_checker_resolves_and_rejects() -> None:
    assert resolve("--db x.db --registry r.toml status --json") == (("status",), None)
    assert resolve("status --source a") == (("status",), None)
    path, error = resolve("nosuch --flag")
    assert path == ()
    assert error is not None
    assert "nosuch" in error
    groups = [p for p, c in command_tree() if isinstance(c, click.Group)]
    if groups:
        _, error = resolve(f"{groups[0][0]} definitely-not-a-command")
        assert error is not None
    paths = documented_paths("`billing status` and `billing --db x nosuch`")
    assert paths == {("status",)}


# --- the README's runnable examples run -----------------------------------------------------

# A fenced shell block right after this marker is run as written by the test below.
_RUNNABLE = re.compile(r"^<!-- docs-test: run -->\n```(?:sh|bash)\n(.*?)^```", re.S | re.M)


def runnable_blocks() -> list[str]:
    return _RUNNABLE.findall(readme_text())


def test_the_readme_has_runnable_examples() -> None:
    blocks = runnable_blocks()
    assert len(blocks) >= 2
    assert any("billing period close" in b and "cmp" in b for b in blocks)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("index", range(len(_RUNNABLE.findall(README.read_text()))))
def test_readme_examples_run(
    index: int, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Each marked block runs in a fresh directory with `bash -euo pipefail` and the
    installed `billing` on PATH: every command in it must succeed (the blocks check their
    own claims, e.g. with `cmp`)."""
    import os
    import shutil
    import subprocess
    import sys

    block = runnable_blocks()[index]
    if " jq " in block and shutil.which("jq") is None:
        pytest.skip("this README example pipes into jq, which is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "EXPORTER_"))}
    env.pop("DATABASE_URL", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if backend == "postgres":
        env["BILLING_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, f"README example {index} failed:\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr
    if "billing period close" in block:
        assert "November: unchanged" in res.stdout
        assert "refused (exit 2): November is closed" in res.stdout
