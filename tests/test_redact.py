"""The one redaction step (billing_cli/collect/redact.py), on its own."""

from __future__ import annotations

from pathlib import Path

import trustme

from billing_cli._errors import ProtocolError, SourceIdentityError
from billing_cli.collect.redact import CREDENTIAL_IN_EPOCH, CREDENTIAL_IN_SAMPLE, Redactor
from billing_cli.collect.transport import SourceClient, TransportConfig
from billing_cli.core.types import Item, Rejection, Sample
from billing_cli.wire import parse_window_page

TOKEN = "tok-0123456789abcdef"


def test_token_and_every_key_line_are_replaced(tmp_path: Path) -> None:
    key = trustme.CA().issue_cert("client.example").private_key_pem.bytes()
    r = Redactor.of(TOKEN, [key])
    lines = [ln for ln in key.decode().splitlines() if not ln.startswith("-----")]
    text = f"a {TOKEN} b {lines[1]} c {key.decode()}"
    out = r.text(text)
    assert TOKEN not in out
    assert all(ln not in out for ln in lines if len(ln) >= 16)
    assert out.startswith("a [redacted] b [redacted] c ")
    # Only what the exporter is sent is searched for in raw pages.
    assert r.may_contain(b'{"x":"' + TOKEN.encode() + b'"}')
    assert not r.may_contain(b'{"x":"' + lines[1].encode() + b'"}')
    assert r.may_contain(b'{"x":"\\u0074ok"}')  # an escape could hide it


def test_a_quote_cut_inside_the_secret_loses_the_cut_part_too() -> None:
    r = Redactor.of(TOKEN)
    assert r.text(f"'zzz{TOKEN[:9]}…' (400 characters)") == "'zzz[redacted]…' (400 characters)"
    assert r.text("'abc…'") == "'abc…'"  # too short to be a part of anything
    # The mark after the closing quote, as an older quoting wrote it.
    assert r.text(f"got 'zz{TOKEN[:20]}'… instead") == "got 'zz[redacted]'… instead"


def test_no_secrets_changes_nothing() -> None:
    r = Redactor()
    items = [Item(1, "n", "e", None, [Sample(TOKEN, "", "", 1, 1)])]
    assert r.items(items, []) == (items, [])
    assert r.text(TOKEN) == TOKEN
    assert not r.may_contain(TOKEN.encode())


def test_a_page_is_scrubbed_and_samples_carrying_the_secret_rejected() -> None:
    raw = (
        '{"node_id":"n","env":"e","snapshots":['
        '{"collected_at":"2026-11-24T10:00:00Z","samples":['
        '{"uuid":"u-' + TOKEN + '","inbound_tag":"","uplink_bytes_total":1,'
        '"downlink_bytes_total":1},'
        '{"uuid":"fine","email":"' + TOKEN + '@x","inbound_tag":"","uplink_bytes_total":1,'
        '"downlink_bytes_total":1},'
        '{"uuid":"kept","inbound_tag":"","uplink_bytes_total":1,"downlink_bytes_total":1}]},'
        '{"collected_at":"2026-11-24T10:01:00Z","counter_epoch":"' + TOKEN + '","samples":['
        '{"uuid":"kept","inbound_tag":"","uplink_bytes_total":2,"downlink_bytes_total":2}]},'
        '{"collected_at":"' + TOKEN + '","samples":[]}'
        '],"next_cursor":"c-' + TOKEN + '","has_more":true}'
    ).encode()  # fmt: skip
    r = Redactor.of(TOKEN)
    page = r.page(parse_window_page(raw))
    assert [[s.uuid for s in i.samples] for i in page.items] == [["kept"]]
    reasons = [(x.uuid, x.reason) for x in page.rejections]
    assert ("u-[redacted]", CREDENTIAL_IN_SAMPLE) in reasons
    assert ("fine", CREDENTIAL_IN_SAMPLE) in reasons
    assert ("kept", CREDENTIAL_IN_EPOCH) in reasons
    assert all(TOKEN not in repr(x) for x in page.rejections)
    assert page.next_cursor == "c-" + TOKEN  # sent back verbatim; the store gets r.opt()


def test_errors_lose_the_secret_in_message_and_attributes() -> None:
    r = Redactor.of(TOKEN)
    exc = SourceIdentityError("s", f"page is from node_id '{TOKEN}'", node_id=TOKEN, env="e")
    r.error(exc)
    assert TOKEN not in str(exc)
    assert exc.node_id == "[redacted]"
    other = ValueError(f"boom {TOKEN}")
    assert TOKEN not in str(r.error(other))
    plain = ProtocolError("s", "nothing secret")
    assert str(r.error(plain)) == "source 's': nothing secret"
    assert r.rejection(Rejection(None, TOKEN, "e", "", "", TOKEN)).reason == "[redacted]"


def test_the_transport_knows_the_key_material_of_its_source(tmp_path: Path) -> None:
    import ssl

    key = (
        b"-----BEGIN PRIVATE KEY-----\nQUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\n"
        b"-----END PRIVATE KEY-----\n"
    )
    cfg = TransportConfig(
        source_id="s",
        base_url="https://127.0.0.1:1",
        auth_mode="mtls+bearer",
        bearer_token=TOKEN,
        ssl_context=ssl.create_default_context(),
        client_key_pems=(key,),
    )
    with SourceClient(cfg) as client:
        text = client.redactor.text(f"x {TOKEN} QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo= y")
    assert text == "x [redacted] [redacted] y"
    assert "client_key_pems" not in repr(cfg)
    assert TOKEN not in repr(cfg)
