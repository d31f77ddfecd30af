"""Property: any sequence of registry edits keeps the file valid, matches a simple model,
and keeps every comment of every surviving entry attached to it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from billing_cli._errors import ConfigError
from billing_cli.registry import edit
from billing_cli.registry.load import load_registry

IDS = ["a", "b", "c", "d", "e"]

HEADER = '# fleet header\n\n[defaults]\nca_bundle_ref = "system"  # trust the OS\n\n'
FOOTER = '# pricing comment\n[pricing]\nprice_per_unit = "0.01"\n'


def entry(sid: str) -> str:
    return (
        f'# about {sid}\n[[sources]]\nsource_id = "{sid}"  # id of {sid}\nnode_id = "n-{sid}"\n'
        f'env = "prod"\nbase_url = "https://{sid}.example.net"\nauth_mode = "bearer"\n'
        f'credential_ref = "env:T_{sid.upper()}"\n'
    )


def fields(sid: str) -> dict[str, object]:
    return {
        "source_id": sid,
        "node_id": f"n-{sid}",
        "env": "prod",
        "base_url": f"https://{sid}.example.net",
        "auth_mode": "bearer",
        "credential_ref": f"env:T_{sid.upper()}",
    }


ops = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "enable", "disable"]), st.sampled_from(IDS)),
    max_size=12,
)


# Each example does up to 12 validated file writes; 200 keeps CI at a few seconds.
@settings(max_examples=200)
@given(initial=st.lists(st.sampled_from(IDS), unique=True, max_size=4), steps=ops)
def test_edit_sequences(initial: list[str], steps: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sources.toml"
        entries = "".join(entry(s) + "\n" for s in initial)
        path.write_text(HEADER + entries + FOOTER)
        model: dict[str, bool] = dict.fromkeys(initial, True)  # id -> enabled, in file order
        originals = set(initial)
        for op, sid in steps:
            before = path.read_bytes()
            try:
                if op == "add":
                    edit.add_source(path, fields(sid))
                elif op == "remove":
                    edit.remove_source(path, sid)
                else:
                    edit.set_enabled(path, sid, op == "enable")
            except ConfigError:
                # Refused: adding an existing id, or editing a missing one.
                assert (op == "add") == (sid in model)
                assert path.read_bytes() == before
                continue
            if op == "add":
                assert sid not in model
                model[sid] = True
            elif op == "remove":
                del model[sid]
                originals.discard(sid)
            else:
                model[sid] = op == "enable"

            reg = load_registry(path, explicit=True)
            assert reg.ids == list(model)
            assert {s.source_id: s.enabled for s in reg.sources} == model
            text = path.read_text()
            assert text.startswith(HEADER)
            # [pricing] keeps its comment; with no [[sources]] left, new ones follow it.
            assert FOOTER in text
            assert "\n\n\n" not in text
            for sid2 in IDS:
                # An original entry keeps its comment directly above its header and its
                # inline comment; a removed one leaves no comment behind.
                attached = f'# about {sid2}\n[[sources]]\nsource_id = "{sid2}"  # id of {sid2}\n'
                assert (attached in text) == (sid2 in originals), (sid2, text)
                assert (f"# about {sid2}\n" in text) == (sid2 in originals), (sid2, text)
