"""The one redaction step for text that comes from a source's exporter.

An exporter (broken, or hostile) may echo what it received — the bearer token — into any
field it returns: an error body, ``window_start``, ``node_id``, ``collected_at``, a uuid,
the cursor. Whatever it sends can reach stderr, logs, ``source_checkpoints.last_error``,
integrity events and the database. Each source's :class:`Redactor` knows that source's
own resolved secrets (its bearer token and its client key material) and replaces them,
wherever they occur, with ``[redacted]``. It is applied where remote text enters billing:

* the transport builds every error message through it (HTTP status lines, the quoted
  error body ``HTTPStatusError.body``, retry warnings);
* the pull loop passes each parsed page through it (identities, rejection reasons and
  values, the cursor it stores) and every error a source's worker reports (protocol,
  identity-mismatch and wire errors quote remote values).

A sample whose uuid, email or inbound_tag carries a secret is rejected rather than billed
under a rewritten key; the rejection shows the key redacted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from billing_cli._errors import BillingError, one_line
from billing_cli.core.types import Item, Rejection, Sample
from billing_cli.wire import WindowPage

REDACTED = "[redacted]"
CREDENTIAL_IN_SAMPLE = "uuid, email or inbound_tag carries this source's credential (redacted)"
CREDENTIAL_IN_EPOCH = "invalid item: counter_epoch carries this source's credential (redacted)"
ELLIPSIS = "…"  # what billing's own truncation of quoted values ends with
_MIN_PREFIX = 4  # a cut-off secret shorter than this says nothing
# Lines of a PEM key shorter than this (the last base64 line, markers) are not secrets.
_MIN_KEY_LINE = 16


@dataclass(frozen=True)
class Redactor:
    """Replaces a source's secrets in text. ``Redactor()`` (no secrets) changes nothing."""

    secrets: tuple[str, ...] = field(default=(), repr=False)
    # What the exporter is sent (the bearer token), as bytes: what a raw page is searched
    # for. Key material never leaves this host (TLS proves possession without sending it),
    # so an exporter cannot echo it; searching every PEM line in every page would cost
    # about half the parse time of an mTLS source.
    sent: tuple[bytes, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, token: str | None = None, key_pems: Iterable[bytes | str] = ()) -> Redactor:
        """From a bearer token and client key PEMs (the whole PEM and each body line)."""
        found: set[str] = set()
        if token:
            found.add(token)
        for pem in key_pems:
            text = pem.decode("utf-8", "replace") if isinstance(pem, bytes) else pem
            if text.strip():
                found.add(text.strip())
            found.update(
                line.strip()
                for line in text.splitlines()
                if len(line.strip()) >= _MIN_KEY_LINE and not line.startswith("-----")
            )
        # Longest first, so a whole PEM goes before the lines inside it.
        ordered = tuple(sorted(found, key=len, reverse=True))
        return cls(ordered, (token.encode(),) if token else ())

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def has(self, text: str) -> bool:
        return any(s in text for s in self.secrets)

    def text(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if ELLIPSIS in text and self.secrets:
            text = self._cut_prefixes(text)
        return text

    def _cut_prefixes(self, text: str) -> str:
        """A value cut short for quoting (``…``) may end inside a secret: its first
        characters are a part of the secret all the same. The mark may follow the cut
        directly (``'abc…'``) or after its closing quote (``'abc'…``)."""
        parts = text.split(ELLIPSIS)
        for i, part in enumerate(parts[:-1]):
            body = part.rstrip("'\"")
            quotes = part[len(body) :]
            for secret in self.secrets:
                for k in range(min(len(secret) - 1, len(body)), _MIN_PREFIX - 1, -1):
                    if body.endswith(secret[:k]):
                        parts[i] = body[:-k] + REDACTED + quotes
                        break
                else:
                    continue
                break
        return ELLIPSIS.join(parts)

    def opt(self, text: str | None) -> str | None:
        return None if text is None else self.text(text)

    def may_contain(self, raw: bytes) -> bool:
        """Cheap test on a raw JSON body: False means no parsed string can hold what the
        exporter was sent (it could only hide behind a JSON escape, and the body has none)."""
        if not self.sent:
            return False
        return b"\\" in raw or any(s in raw for s in self.sent)

    # -- what the pull loop receives -----------------------------------------------------

    def page(self, page: WindowPage) -> WindowPage:
        """The page with every secret replaced. ``next_cursor`` is left as received: it is
        sent back to the same exporter verbatim; the caller redacts what it stores."""
        items, rejections = self.items(page.items, page.rejections)
        return dataclasses.replace(
            page,
            source_id=self.opt(page.source_id),
            node_id=self.opt(page.node_id),
            env=self.opt(page.env),
            items=items,
            rejections=rejections,
        )

    def items(
        self, items: list[Item], rejections: list[Rejection]
    ) -> tuple[list[Item], list[Rejection]]:
        if not self.secrets:
            return items, rejections
        out_rejections = [self.rejection(r) for r in rejections]
        out_items: list[Item] = []
        for item in items:
            node_id, env = self.text(item.node_id), self.text(item.env)
            epoch_bad = item.counter_epoch is not None and self.has(item.counter_epoch)
            kept: list[Sample] = []
            for s in item.samples:
                if epoch_bad or self.has(s.uuid) or self.has(s.email) or self.has(s.inbound_tag):
                    reason = CREDENTIAL_IN_EPOCH if epoch_bad else CREDENTIAL_IN_SAMPLE
                    out_rejections.append(
                        Rejection(
                            item.collected_at_ns,
                            node_id,
                            env,
                            self.text(s.uuid),
                            self.text(s.inbound_tag),
                            reason,
                        )
                    )
                else:
                    kept.append(s)
            if epoch_bad:
                if not item.samples:
                    out_rejections.append(
                        Rejection(item.collected_at_ns, node_id, env, "", "", CREDENTIAL_IN_EPOCH)
                    )
                continue
            if len(kept) != len(item.samples) or (node_id, env) != (item.node_id, item.env):
                item = Item(item.collected_at_ns, node_id, env, item.counter_epoch, kept)
            out_items.append(item)
        return out_items, out_rejections

    def rejection(self, r: Rejection) -> Rejection:
        return Rejection(
            r.collected_at_ns,
            self.text(r.node_id),
            self.text(r.env),
            self.text(r.uuid),
            self.text(r.inbound_tag),
            self.text(r.reason),
        )

    def error(self, exc: BaseException) -> BaseException:
        """``exc`` with the secrets gone from its message and text attributes (in place:
        the exception belongs to the worker that reports it)."""
        if not self.secrets:
            return exc
        exc.args = tuple(self.text(a) if isinstance(a, str) else a for a in exc.args)
        if isinstance(exc, BillingError):
            exc.args = (one_line(str(exc.args[0]) if exc.args else ""),)
        for name, value in list(vars(exc).items()):
            if isinstance(value, str):
                setattr(exc, name, self.text(value))
        return exc


NO_SECRETS = Redactor()
