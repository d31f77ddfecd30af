"""``billing sources``: round trips through the real CLI, comment-preserving edits, refusals."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Field names of `sources show --json` / `sources list --json` items: a contract for scripts.
SOURCE_KEYS = [
    "source_id",
    "node_id",
    "env",
    "base_url",
    "enabled",
    "auth_mode",
    "api",
    "credential_ref",
    "client_cert_ref",
    "client_key_ref",
    "ca_bundle_ref",
    "server_name",
    "collect_interval",
    "request_timeout",
    "allow_insecure_http",
    "max_response_bytes",
    "stale_after",
    "max_refused_share",
    "legacy",
]

COMMENTED = """\
# our fleet — keep this header
# second header line

[defaults]
ca_bundle_ref = "system"   # OS store, on purpose

# ---- Asia ----

# Tokyo box
[[sources]]
source_id = "a"   # odd   spacing kept
node_id = "n1"
env = "prod"
base_url = "https://a.example.net"
auth_mode = "bearer"
credential_ref = "env:A_TOKEN"

# Frankfurt
# (pinned CA)
[[sources]]
source_id = "b"
node_id = "n2"
env = "prod"
base_url = "https://b.example.net"
auth_mode = "bearer"
credential_ref = "env:B_TOKEN"
ca_bundle_ref = "file:/etc/billing/b-ca.pem"
[[sources]]
source_id = "c"
node_id = "n3"
env = "prod"
base_url = "https://c.example.net"
enabled = true  # keep me on
auth_mode = "bearer"
credential_ref = "env:C_TOKEN"

# pricing: decimals as strings
[pricing]
price_per_unit = "0.05"
"""

ENTRY_B = """\
[[sources]]
source_id = "b"
node_id = "n2"
env = "prod"
base_url = "https://b.example.net"
auth_mode = "bearer"
credential_ref = "env:B_TOKEN"
ca_bundle_ref = "file:/etc/billing/b-ca.pem"
"""

ADD_JP = (
    "sources",
    "add",
    "jp-1",
    "--node-id",
    "tokyo-1",
    "--env",
    "prod",
    "--base-url",
    "https://jp-1.example.net:9550",
    "--client-cert-ref",
    "file:/etc/billing/client.pem",
    "--client-key-ref",
    "systemd:client-key",
    "--ca-bundle-ref",
    "system",
)


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "sources.toml"
    path.write_text(COMMENTED)
    return path


def list_json(cli: Any, *args: str) -> dict:
    res = cli("sources", "list", "--json", *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# --- add / list / show ---------------------------------------------------------------------


def test_add_creates_missing_file_then_lists_and_shows(cli: Any, tmp_path: Path) -> None:
    res = cli(*ADD_JP)
    assert res.exit_code == 0, res.output
    assert "added source 'jp-1' (enabled)" in res.stdout
    text = (tmp_path / "sources.toml").read_text()
    assert text.startswith("# billing source registry.")
    data = list_json(cli)
    assert data["legacy"] is False
    assert data["registry"] == "sources.toml"
    (src,) = data["sources"]
    assert list(src) == SOURCE_KEYS
    assert src["auth_mode"] == "mtls"  # implied by cert + key
    assert src["client_key_ref"] == "systemd:client-key"
    assert src["collect_interval"] == "1m"  # from [defaults]
    assert src["enabled"] is True

    res = cli("sources", "show", "jp-1", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == src

    res = cli("sources", "show", "jp-1")
    assert res.exit_code == 0
    assert "1m (from [defaults])" in res.stdout
    assert re.search(r"ca_bundle_ref +system *\n", res.stdout)  # set on the source itself
    assert "systemd:client-key" in res.stdout
    assert "https://jp-1.example.net:9550" in res.stdout


def test_add_second_source_all_options(cli: Any, registry: Path) -> None:
    res = cli(
        "sources", "add", "de-1", "--node-id", "frankfurt-1", "--env", "prod",
        "--base-url", "https://203.0.113.20:9550", "--credential-ref", "env:DE1",
        "--client-cert-ref", "file:/c.pem", "--client-key-ref", "file:/k.pem",
        "--ca-bundle-ref", "file:/etc/billing/de-ca.pem", "--server-name", "de-1.example.net",
        "--collect-interval", "2m", "--request-timeout", "20s", "--api", "latest", "--disabled",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "(disabled)" in res.stdout
    src = json.loads(cli("sources", "show", "de-1", "--json").stdout)
    assert src == {
        "source_id": "de-1",
        "node_id": "frankfurt-1",
        "env": "prod",
        "base_url": "https://203.0.113.20:9550",
        "enabled": False,
        "auth_mode": "mtls+bearer",
        "api": "latest",
        "credential_ref": "env:DE1",
        "client_cert_ref": "file:/c.pem",
        "client_key_ref": "file:/k.pem",
        "ca_bundle_ref": "file:/etc/billing/de-ca.pem",
        "server_name": "de-1.example.net",
        "collect_interval": "2m",
        "request_timeout": "20s",
        "allow_insecure_http": False,
        "max_response_bytes": 64 * 1024 * 1024,
        "stale_after": "600s",  # 5 x collect_interval
        "max_refused_share": 0.1,
        "legacy": False,
    }
    text = registry.read_text()
    # Everything that was there is still there, byte for byte, and the new entry follows c.
    head, _, added = text.partition('[[sources]]\nsource_id = "de-1"')
    assert head.startswith(COMMENTED.split("# pricing")[0])
    # The comment above [pricing] stays directly above [pricing].
    assert added.endswith('\n# pricing: decimals as strings\n[pricing]\nprice_per_unit = "0.05"\n')
    enabled = [s["source_id"] for s in list_json(cli)["sources"] if s["enabled"]]
    assert enabled == ["a", "b", "c"]


def test_add_insecure_loopback(cli: Any) -> None:
    res = cli(
        "sources", "add", "dev", "--node-id", "laptop", "--env", "dev",
        "--base-url", "http://127.0.0.1:9550", "--allow-insecure-http",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    src = list_json(cli)["sources"][0]
    assert (src["auth_mode"], src["allow_insecure_http"], src["ca_bundle_ref"]) == (
        "none",
        True,
        None,
    )


def test_add_without_credentials_is_a_usage_error(cli: Any, tmp_path: Path) -> None:
    res = cli(
        "sources", "add", "x", "--node-id", "n", "--env", "e",
        "--base-url", "https://x.example.net",
    )  # fmt: skip
    assert res.exit_code == 2
    assert res.stderr == (
        "error: no credentials given: pass --client-cert-ref and --client-key-ref (mTLS) "
        "and/or --credential-ref (bearer), or --auth-mode\n"
    )
    assert not (tmp_path / "sources.toml").exists()


def test_add_invalid_leaves_file_byte_identical(cli: Any, registry: Path) -> None:
    before = registry.read_bytes()
    res = cli(
        "sources", "add", "jp-2", "--node-id", "n", "--env", "e",
        "--base-url", "http://10.0.0.5:9550", "--credential-ref", "env:T",
    )  # fmt: skip
    assert res.exit_code == 2
    assert res.stderr == (
        "error: sources.toml: source 'jp-2': base_url must be https:// "
        "(got http://10.0.0.5:9550) (nothing written)\n"
    )
    assert registry.read_bytes() == before
    assert [p.name for p in registry.parent.iterdir() if p.name.startswith(".")] == []


def test_add_invalid_does_not_create_file(cli: Any, tmp_path: Path) -> None:
    res = cli(*ADD_JP, "--request-timeout", "5m")
    assert res.exit_code == 2
    assert "request_timeout (5m) must be shorter than collect_interval (1m)" in res.stderr
    assert "(file not created)" in res.stderr
    assert not (tmp_path / "sources.toml").exists()


def test_add_inline_secret_refused_without_echo(cli: Any, registry: Path) -> None:
    before = registry.read_bytes()
    res = cli(
        "sources", "add", "x", "--node-id", "n", "--env", "e",
        "--base-url", "https://x.example.net", "--credential-ref", "hunter2-super-secret",
    )  # fmt: skip
    assert res.exit_code == 2
    assert "credential_ref is not a reference" in res.stderr
    assert "hunter2" not in res.output
    assert registry.read_bytes() == before


def test_add_duplicate_refused(cli: Any, registry: Path) -> None:
    before = registry.read_bytes()
    res = cli(
        "sources", "add", "b", "--node-id", "n", "--env", "e",
        "--base-url", "https://x.example.net", "--credential-ref", "env:T",
    )  # fmt: skip
    assert res.exit_code == 2
    assert res.stderr == (
        "error: sources.toml: source 'b' already exists (see `billing sources show b`; "
        "remove it first to replace it)\n"
    )
    assert registry.read_bytes() == before


# --- enable / disable / remove ---------------------------------------------------------------


def test_disable_enable_round_trip_keeps_everything_else(cli: Any, registry: Path) -> None:
    res = cli("sources", "disable", "b")
    assert res.exit_code == 0, res.output
    assert res.stdout == "disabled source 'b' in sources.toml\n"
    expected = COMMENTED.replace(
        'ca_bundle_ref = "file:/etc/billing/b-ca.pem"\n',
        'ca_bundle_ref = "file:/etc/billing/b-ca.pem"\nenabled = false\n',
    )
    assert registry.read_text() == expected
    assert [s["enabled"] for s in list_json(cli)["sources"]] == [True, False, True]

    res = cli("sources", "enable", "b")
    assert res.exit_code == 0, res.output
    assert registry.read_text() == expected.replace("enabled = false", "enabled = true")
    assert [s["enabled"] for s in list_json(cli)["sources"]] == [True, True, True]


def test_disable_keeps_inline_comment_of_existing_key(cli: Any, registry: Path) -> None:
    assert cli("sources", "disable", "c").exit_code == 0
    assert registry.read_text() == COMMENTED.replace(
        "enabled = true  # keep me on", "enabled = false  # keep me on"
    )


def test_enable_already_enabled_changes_nothing(cli: Any, registry: Path) -> None:
    before = registry.stat().st_mtime_ns, registry.read_bytes()
    res = cli("sources", "enable", "a")
    assert res.exit_code == 0
    assert res.stdout == "source 'a' is already enabled; nothing changed\n"
    assert (registry.stat().st_mtime_ns, registry.read_bytes()) == before


def test_remove_middle_entry_takes_its_comments(cli: Any, registry: Path) -> None:
    res = cli("sources", "remove", "b")
    assert res.exit_code == 0, res.output
    assert res.stdout == "removed source 'b' from sources.toml\n"
    expected = COMMENTED.replace("# Frankfurt\n# (pinned CA)\n" + ENTRY_B, "")
    assert registry.read_text() == expected
    assert [s["source_id"] for s in list_json(cli)["sources"]] == ["a", "c"]


def test_remove_first_entry_keeps_section_comment(cli: Any, registry: Path) -> None:
    assert cli("sources", "remove", "a").exit_code == 0
    text = registry.read_text()
    assert "# Tokyo box" not in text
    assert 'source_id = "a"' not in text
    assert "# ---- Asia ----\n\n# Frankfurt\n# (pinned CA)\n" + ENTRY_B in text
    assert text.endswith('# pricing: decimals as strings\n[pricing]\nprice_per_unit = "0.05"\n')


def test_remove_first_entry_under_top_level_comments(cli: Any, tmp_path: Path) -> None:
    entry = (
        '[[sources]]\nsource_id = "{0}"\nnode_id = "n"\nenv = "e"\nbase_url = "https://{0}"\n'
        'auth_mode = "bearer"\ncredential_ref = "env:T"\nca_bundle_ref = "system"\n'
    )
    path = tmp_path / "sources.toml"
    path.write_text(
        "# header\n\n# about x\n" + entry.format("x") + "\n# about y\n" + entry.format("y")
    )
    assert cli("sources", "remove", "x").exit_code == 0
    assert path.read_text() == "# header\n\n# about y\n" + entry.format("y")


def test_remove_last_entry_keeps_following_table_comment(cli: Any, registry: Path) -> None:
    assert cli("sources", "remove", "c").exit_code == 0
    text = registry.read_text()
    assert 'source_id = "c"' not in text
    assert text.startswith(COMMENTED.split('[[sources]]\nsource_id = "c"')[0])
    assert text.endswith('\n# pricing: decimals as strings\n[pricing]\nprice_per_unit = "0.05"\n')


def test_remove_all_then_add_again(cli: Any, registry: Path) -> None:
    for sid in ("a", "b", "c"):
        assert cli("sources", "remove", sid).exit_code == 0
    assert list_json(cli)["sources"] == []
    res = cli("sources", "list")
    assert res.exit_code == 0
    assert "no sources in sources.toml" in res.stdout
    assert cli(*ADD_JP).exit_code == 0
    assert [s["source_id"] for s in list_json(cli)["sources"]] == ["jp-1"]
    assert "# our fleet — keep this header" in registry.read_text()


def test_unknown_id_suggests_and_lists(cli: Any, registry: Path) -> None:
    for verb in ("remove", "enable", "disable", "show"):
        res = cli("sources", verb, "bb")
        assert res.exit_code == 2, verb
        assert res.stderr == (
            "error: sources.toml: no source 'bb' (did you mean 'b'?); known sources: a, b, c "
            "(see `billing sources list`)\n"
        ), verb


def test_edit_of_invalid_file_is_refused_byte_identical(cli: Any, registry: Path) -> None:
    registry.write_text(
        COMMENTED.replace('env = "prod"\nbase_url = "https://c', 'env = ""\nbase_url = "https://c')
    )
    before = registry.read_bytes()
    res = cli("sources", "disable", "a")
    assert res.exit_code == 2
    assert (
        res.stderr == "error: sources.toml: source 'c': env must not be empty (nothing written)\n"
    )
    assert registry.read_bytes() == before
    # ...but removing the broken entry is allowed: the result validates.
    assert cli("sources", "remove", "c").exit_code == 0


def test_edit_keeps_file_mode(cli: Any, registry: Path) -> None:
    registry.chmod(0o640)
    assert cli("sources", "disable", "a").exit_code == 0
    assert stat.S_IMODE(registry.stat().st_mode) == 0o640


def test_edit_keeps_file_owner(cli: Any, registry: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can hand a file to another owner")
    os.chown(registry, 4321, 4321)
    assert cli("sources", "disable", "a").exit_code == 0
    assert (registry.stat().st_uid, registry.stat().st_gid) == (4321, 4321)


def test_edit_through_symlink_keeps_symlink(cli: Any, registry: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.toml"
    link.symlink_to(registry)
    assert cli("sources", "disable", "a", "--registry", str(link)).exit_code == 0
    assert link.is_symlink()
    assert "enabled = false" in registry.read_text()


def test_registry_flag_and_env(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "etc" / "fleet.toml"
    other.parent.mkdir()
    other.write_text(COMMENTED)
    assert [s["source_id"] for s in list_json(cli, "--registry", str(other))["sources"]] == [
        "a",
        "b",
        "c",
    ]
    monkeypatch.setenv("BILLING_REGISTRY", str(other))
    assert cli("sources", "disable", "a").exit_code == 0
    assert "enabled = false" in other.read_text()
    assert not (tmp_path / "sources.toml").exists()


def test_example_registry_lists(cli: Any) -> None:
    res = cli("sources", "list", "--registry", str(ROOT / "sources.example.toml"))
    assert res.exit_code == 0, res.output
    for word in ("id", "node/env", "auth", "on", "url"):
        assert word in res.stdout
    for sid in ("jp-1", "de-1", "us-stage", "mtls+bearer"):
        assert sid in res.stdout
    assert "interval" not in res.stdout  # --wide only
    wide = cli("sources", "list", "--wide", "--registry", str(ROOT / "sources.example.toml"))
    assert wide.exit_code == 0, wide.output
    for word in ("id", "node", "env", "url", "auth", "api", "enabled", "interval", "timeout"):
        assert word in wide.stdout


# --- legacy shim and errors ------------------------------------------------------------------


def test_legacy_shim_listed_as_legacy(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORTER_BASE_URL", "http://127.0.0.1:9550")
    monkeypatch.setenv("EXPORTER_NODE_ID", "node-a")
    data = list_json(cli)
    assert data["legacy"] is True
    (src,) = data["sources"]
    assert (src["source_id"], src["node_id"], src["api"], src["legacy"]) == (
        "legacy",
        "node-a",
        "latest",
        True,
    )
    res = cli("sources", "list")
    assert res.exit_code == 0
    assert "legacy single source from EXPORTER_BASE_URL" in res.stdout
    assert "\nlegacy " in res.stdout

    res = cli("sources", "disable", "legacy")
    assert res.exit_code == 2
    assert "the legacy source comes from EXPORTER_BASE_URL" in res.stderr

    # Adding a source creates the registry, which ends legacy mode: say so.
    res = cli(*ADD_JP)
    assert res.exit_code == 0, res.output
    assert "EXPORTER_BASE_URL (legacy mode) is no longer used" in res.stderr
    assert [s["source_id"] for s in list_json(cli)["sources"]] == ["jp-1"]


def test_missing_registry_is_one_line(cli: Any) -> None:
    res = cli("sources", "list")
    assert res.exit_code == 2
    assert res.stdout == ""
    assert res.stderr == (
        "error: sources.toml: no such file (create one with `billing sources add ...` or copy "
        "sources.example.toml)\n"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[[sources]\n", "error: sources.toml: line 1: invalid TOML:"),
        ('[[sources]]\nsource_id = "x"\n', "error: sources.toml: source 'x': missing required"),
        ("\xff\xfe", "error: sources.toml: not UTF-8 text"),
    ],
)
def test_bad_registry_no_traceback(cli: Any, tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "sources.toml").write_bytes(content.encode("latin-1"))
    for args in (("sources", "list"), ("sources", "show", "x"), ("sources", "disable", "x")):
        res = cli(*args)
        assert res.exit_code == 2, args
        assert res.stderr.startswith(message), res.stderr
        assert res.stderr.count("\n") == 1
        assert "Traceback" not in res.output


def test_json_never_contains_resolved_secret(
    cli, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("A_TOKEN", "s3cret-value-xyz")
    out = cli("sources", "show", "a", "--json").stdout + cli("sources", "list", "--json").stdout
    assert "env:A_TOKEN" in out
    assert "s3cret" not in out


def test_values_are_printed_verbatim_not_as_markup(cli: Any, registry: Path) -> None:
    registry.write_text(COMMENTED.replace('node_id = "n2"', 'node_id = "[bold]n2:smile:"'))
    for args in (("sources", "list"), ("sources", "show", "b"), ("sources", "list", "--json")):
        res = cli(*args)
        assert res.exit_code == 0, res.output
        assert "[bold]n2:smile:" in res.stdout, args


def test_write_failure_is_one_line_and_changes_nothing(
    cli: Any, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing_cli.registry import edit

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(edit.os, "replace", refuse)
    before = registry.read_bytes()
    res = cli("sources", "disable", "a")
    assert res.exit_code == 2
    assert res.stderr == "error: sources.toml: cannot write: Permission denied (file not changed)\n"
    assert registry.read_bytes() == before
    assert sorted(os.listdir(registry.parent)) == ["sources.toml"]


def test_no_temp_files_left_behind(cli: Any, registry: Path) -> None:
    assert cli("sources", "disable", "a").exit_code == 0
    assert cli("sources", "remove", "b").exit_code == 0
    assert sorted(os.listdir(registry.parent)) == ["sources.toml"]


def test_editor_waits_for_the_directory_lock(tmp_path: Path) -> None:
    """A second editor blocks while another holds the lock, then applies its change."""
    import fcntl
    import subprocess
    import sys
    import time

    billing = Path(sys.executable).parent / "billing"
    registry = tmp_path / "sources.toml"
    registry.write_text(COMMENTED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "EXPORTER_"))}
    args = [str(billing), "--registry", str(registry), "sources", "disable", "a"]
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.5)  # ample time to start and reach the lock
        assert proc.poll() is None, proc.communicate()
        assert registry.read_text() == COMMENTED
    finally:
        os.close(fd)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "enabled = false" in registry.read_text()


# --- --json on edits, `sources set`, shared identities ---------------------------------------


def _edit_json(cli: Any, *args: str) -> dict[str, Any]:
    res = cli(*args, "--json")
    assert res.exit_code == 0, res.output
    doc: dict[str, Any] = json.loads(res.stdout)
    assert list(doc)[:5] == ["action", "changed", "registry", "source_id", "source"]
    return doc


def test_edits_print_json(cli: Any, registry: Path) -> None:
    added = _edit_json(cli, *ADD_JP, "--registry", str(registry))
    assert (added["action"], added["changed"], added["source_id"]) == ("added", True, "jp-1")
    assert list(added["source"]) == SOURCE_KEYS
    assert added["source"]["auth_mode"] == "mtls"
    off = _edit_json(cli, "sources", "disable", "jp-1", "--registry", str(registry))
    assert (off["action"], off["changed"], off["source"]["enabled"]) == ("disabled", True, False)
    again = _edit_json(cli, "sources", "disable", "jp-1", "--registry", str(registry))
    assert again["changed"] is False
    on = _edit_json(cli, "sources", "enable", "jp-1", "--registry", str(registry))
    assert (on["action"], on["source"]["enabled"]) == ("enabled", True)
    gone = _edit_json(cli, "sources", "remove", "jp-1", "--registry", str(registry))
    assert (gone["action"], gone["source"]["node_id"]) == ("removed", "tokyo-1")
    assert "jp-1" not in registry.read_text()


def test_set_edits_one_field_in_place_keeping_comments(cli: Any, registry: Path) -> None:
    before = registry.read_text()
    doc = _edit_json(cli, "sources", "set", "a", "--base-url", "https://a2.example.net",
                     "--registry", str(registry))  # fmt: skip
    assert (doc["action"], doc["changed"], doc["fields"]) == ("set", True, ["base_url"])
    assert doc["source"]["base_url"] == "https://a2.example.net"
    after = registry.read_text()
    # Exactly that one line changed, in place; every comment and other entry kept.
    diff = [(x, y) for x, y in zip(before.splitlines(), after.splitlines(), strict=True) if x != y]
    assert diff == [('base_url = "https://a.example.net"', 'base_url = "https://a2.example.net"')]


def test_set_keeps_an_inline_comment_adds_new_keys_and_unsets(cli: Any, registry: Path) -> None:
    res = cli("sources", "set", "a", "--request-timeout", "20s", "--ca-bundle-ref", "system",
              "--registry", str(registry))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "set ca_bundle_ref, request_timeout of source 'a'" in res.stdout
    text = registry.read_text()
    entry_a = text[text.index('source_id = "a"') : text.index("# Frankfurt")]
    assert 'source_id = "a"   # odd   spacing kept' in entry_a
    assert 'request_timeout = "20s"' in entry_a
    assert "# Frankfurt\n# (pinned CA)\n[[sources]]" in text  # b's comments stay with b
    res = cli("sources", "set", "b", "--unset", "ca_bundle_ref", "--registry", str(registry))
    assert res.exit_code == 0, res.output
    assert "b-ca.pem" not in registry.read_text()
    shown = json.loads(cli("sources", "show", "b", "--json", "--registry", str(registry)).stdout)
    assert shown["ca_bundle_ref"] == "system"  # falls back to [defaults]
    res = cli("sources", "set", "c", "--enabled", "--registry", str(registry))
    assert res.exit_code == 2  # enabled has its own commands


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--client-cert-ref", "file:/x.pem"), 'auth_mode = "bearer" does not use it'),
        (("--unset", "node_id"), "node_id is required"),
        (("--unset", "colect_interval"), "did you mean 'collect_interval'"),
        (("--request-timeout", "2m"), "must be shorter than collect_interval"),
        ((), "nothing to change"),
    ],
)
def test_set_refuses_invalid_results_and_writes_nothing(
    cli: Any, registry: Path, args: tuple[str, ...], needle: str
) -> None:
    before = registry.read_bytes()
    res = cli("sources", "set", "a", *args, "--registry", str(registry))
    assert res.exit_code == 2, res.output
    assert len(res.stderr.splitlines()) == 1
    assert needle in res.stderr
    assert registry.read_bytes() == before


def test_set_to_the_same_value_changes_nothing(cli: Any, registry: Path) -> None:
    before = registry.stat().st_mtime_ns
    doc = _edit_json(cli, "sources", "set", "a", "--env", "prod", "--registry", str(registry))
    assert (doc["changed"], doc["fields"]) == (False, [])
    assert registry.stat().st_mtime_ns == before


def test_two_sources_with_one_identity_are_accepted_with_one_warning(
    cli: Any, registry: Path
) -> None:
    res = cli("sources", "set", "b", "--node-id", "n1", "--registry", str(registry))
    assert res.exit_code == 0, res.output
    res = cli("sources", "list", "--json", "--registry", str(registry))
    assert res.exit_code == 0
    assert len(json.loads(res.stdout)["sources"]) == 3
    warnings = res.stderr.splitlines()
    assert len(warnings) == 1, res.stderr
    assert "sources 'a', 'b' have the same node_id 'n1' and env 'prod'" in warnings[0]
    quiet = cli("-q", "sources", "list", "--registry", str(registry))
    assert quiet.stderr == ""
