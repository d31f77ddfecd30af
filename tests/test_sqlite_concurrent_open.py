"""Several processes opening one new SQLite database at once (two cron runs on a fresh
deployment, ``status`` beside the first ``collect``) all succeed: none sees "locked"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OPEN = "from billing_cli.store import open_store; open_store({db!r}).close()"


def test_concurrent_first_opens_all_succeed(tmp_path: Path) -> None:
    for trial in range(6):
        db = str(tmp_path / f"fresh-{trial}.db")
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN.format(db=db)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        failed = [
            e.strip().splitlines()[-1] for p, e in zip(procs, errors, strict=True) if p.returncode
        ]
        assert failed == [], f"trial {trial}: {failed}"
