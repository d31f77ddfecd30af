"""Run ``billing`` on a real pseudo-terminal of a given size, and read back the screen.

``run_in_pty`` starts the real program with stdin/stdout/stderr on a pty whose window is
``cols`` x ``rows`` (what an operator's terminal reports through TIOCGWINSZ), and returns
the exit code and every byte written. ``Screen`` replays those bytes the way a terminal
does — carriage return, newline, cursor up, erase line, automatic wrap at the right edge —
so tests can assert on what a person would see, including whether any line was too wide.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PtyResult:
    exit_code: int
    raw: str
    cols: int

    @property
    def screen(self) -> Screen:
        return Screen.replay(self.raw, self.cols)


def run_in_pty(
    args: Sequence[str],
    *,
    cwd: Path,
    cols: int = 80,
    rows: int = 50,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> PtyResult:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "EXPORTER_"))}
    for name in ("DATABASE_URL", "COLUMNS", "LINES", "TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR"):
        base.pop(name, None)
    base["TERM"] = "xterm-256color"
    base.update(env or {})
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "billing_cli", *args],
        cwd=cwd,
        env=base,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise TimeoutError(f"billing {' '.join(args)} did not finish in {timeout}s")
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if not ready:
                if proc.poll() is not None:
                    # Drain what is left without blocking.
                    ready, _, _ = select.select([master], [], [], 0.2)
                    if not ready:
                        break
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:
                if exc.errno == errno.EIO:  # the other side closed: the program ended
                    break
                raise
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    code = proc.wait(timeout=30)
    return PtyResult(code, b"".join(chunks).decode("utf-8", "replace"), cols)


_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z@])")
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


@dataclass
class Screen:
    """What a terminal of ``cols`` columns shows after the bytes (scrollback included)."""

    cols: int
    lines: list[list[str]] = field(default_factory=lambda: [[]])
    row: int = 0
    col: int = 0
    wrapped: list[int] = field(default_factory=list)  # rows that overflowed into the next

    @classmethod
    def replay(cls, raw: str, cols: int) -> Screen:
        s = cls(cols)
        raw = _OSC.sub("", raw)
        i = 0
        while i < len(raw):
            ch = raw[i]
            if ch == "\x1b":
                m = _CSI.match(raw, i)
                if m is not None:
                    s._csi(m.group(1), m.group(2))
                    i = m.end()
                    continue
                i += 2  # a two-character escape (e.g. ESC 7): no effect we need
                continue
            if ch == "\r":
                s.col = 0
            elif ch == "\n":
                s._down()
            elif ch == "\b":
                s.col = max(0, s.col - 1)
            elif ch in "\x07\x0e\x0f":
                pass
            else:
                s._put(ch)
            i += 1
        return s

    def _line(self) -> list[str]:
        while len(self.lines) <= self.row:
            self.lines.append([])
        return self.lines[self.row]

    def _down(self) -> None:
        self.row += 1
        self._line()

    def _put(self, ch: str) -> None:
        if self.col >= self.cols:  # automatic margin: the line was too long
            self.wrapped.append(self.row)
            self._down()
            self.col = 0
        line = self._line()
        while len(line) < self.col:
            line.append(" ")
        if self.col < len(line):
            line[self.col] = ch
        else:
            line.append(ch)
        self.col += 1

    def _csi(self, params: str, final: str) -> None:
        nums = [int(p) for p in params.replace("?", "").split(";") if p.isdigit()]
        n = nums[0] if nums else 1
        if final == "A":
            self.row = max(0, self.row - n)
            self._line()
        elif final == "B":
            self.row += n
            self._line()
        elif final == "C":
            self.col += n
        elif final == "D":
            self.col = max(0, self.col - n)
        elif final == "G":
            self.col = max(0, n - 1)
        elif final == "K":
            line = self._line()
            mode = nums[0] if nums else 0
            if mode == 2:
                line.clear()
            elif mode == 0:
                del line[self.col :]
            else:
                for k in range(min(self.col + 1, len(line))):
                    line[k] = " "
        # m (colours), h/l (modes), J and the rest: nothing a test looks at.

    @property
    def text(self) -> list[str]:
        return ["".join(line).rstrip() for line in self.lines]

    def __str__(self) -> str:
        return "\n".join(self.text)
