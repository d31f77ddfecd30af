"""Content-Encoding decoding with every layer's output bounded while it streams.

httpx decodes a compressed body one network chunk at a time, but each chunk in full: a few
KiB of ``Content-Encoding: gzip, gzip`` inflate to gigabytes inside a single call before
anything can count them. Here each layer inflates at most :data:`STEP` bytes per call
(zlib's ``max_length``), and every layer's running total is checked against the cap as it
grows, so memory stays near the cap (plus a few steps) whatever the compression ratio and
however many layers are stacked.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator

STEP = 64 * 1024  # bytes inflated per call, per layer
MAX_LAYERS = 4  # "gzip, gzip, gzip, gzip" is already absurd
ACCEPT_ENCODING = "gzip, deflate"


class DecodeError(ValueError):
    """The body is not valid for its Content-Encoding (one line, no body text)."""


class TooLargeError(ValueError):
    """A layer's output passed the cap; ``layer`` is 1 for the outermost encoding."""

    def __init__(self, layer: int, layers: int) -> None:
        self.layer = layer
        self.layers = layers
        super().__init__(f"decoded layer {layer} of {layers}")


def parse_encodings(values: Iterable[str]) -> list[str]:
    """The codings of ``Content-Encoding`` header values, in the order they were applied.

    Raises :class:`DecodeError` for a coding billing does not decode or too many layers.
    """
    codings: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip().lower()
            if name and name != "identity":
                codings.append(name)
    for name in codings:
        if name not in ("gzip", "x-gzip", "deflate"):
            shown = name if len(name) <= 20 and name.isprintable() else name[:20] + "…"
            raise DecodeError(f"unsupported Content-Encoding {shown!r} (billing asks for gzip)")
    if len(codings) > MAX_LAYERS:
        raise DecodeError(f"Content-Encoding has {len(codings)} layers (at most {MAX_LAYERS})")
    return codings


class _Inflater:
    """One coding layer: gzip (members concatenated) or deflate (zlib-wrapped or raw)."""

    def __init__(self, coding: str) -> None:
        self._gzip = coding != "deflate"
        self._first = True
        self._raw_deflate = False
        self._obj = self._new()

    def _new(self) -> zlib._Decompress:
        if self._gzip:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return zlib.decompressobj(-zlib.MAX_WBITS if self._raw_deflate else zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        while True:
            try:
                out = self._obj.decompress(data, STEP)
            except zlib.error:
                if not self._gzip and self._first and not self._raw_deflate:
                    # "deflate" is sent both zlib-wrapped (RFC 9110) and raw (old servers).
                    self._raw_deflate = True
                    self._obj = self._new()
                    continue
                raise DecodeError("the body is not valid for its Content-Encoding") from None
            if data:
                self._first = False
            if out:
                yield out
            if self._obj.eof:
                rest = self._obj.unused_data
                if self._gzip and rest.startswith(b"\x1f\x8b"):
                    self._obj = self._new()  # the next gzip member
                    data = rest
                    continue
                return  # bytes after the end of the stream are ignored, like httpx
            # Input zlib could not take yet (the output was cut at STEP), or none left: a
            # full STEP may still leave output pending, fetched by calling with b"".
            data = self._obj.unconsumed_tail
            if not data and len(out) < STEP:
                return

    def check_complete(self) -> None:
        if not self._first and not self._obj.eof:
            raise DecodeError("the compressed body ends before its end marker")


def decoded(
    raw: Iterable[bytes], codings: list[str], cap: int, clock_check: Callable[[], None]
) -> Iterator[bytes]:
    """The body of ``raw`` chunks with ``codings`` undone, in chunks of at most ``STEP``.

    Raises :class:`TooLargeError` as soon as any layer has produced more than ``cap``
    bytes, and calls ``clock_check`` between chunks (it raises when time is up).
    """
    layers = [_Inflater(c) for c in reversed(codings)]  # the last coding applied first
    totals = [0] * len(layers)

    def run(chunk: bytes, i: int) -> Iterator[bytes]:
        if i == len(layers):
            yield chunk
            return
        for out in layers[i].feed(chunk):
            totals[i] += len(out)
            if totals[i] > cap:
                raise TooLargeError(i + 1, len(layers))
            clock_check()
            yield from run(out, i + 1)

    for chunk in raw:
        clock_check()
        yield from run(chunk, 0)
    for layer in layers:
        layer.check_complete()
