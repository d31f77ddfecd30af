"""Comment-preserving edits of ``sources.toml``: add, remove, enable, disable a source.

tomlkit keeps every byte of the parts we do not touch. One subtlety: tomlkit stores the
comment lines written just above a ``[[sources]]`` header at the END of the previous
table's body. So "the comments of entry i" live in entry i-1, and the comments after
entry i's last key belong to whatever header follows. The helpers below move those
comment blocks with their entries, so that removing or appending an entry keeps every
remaining comment next to the header it describes.

Every edit is validated with the same loader as ``billing`` itself BEFORE anything is
written; an invalid result is refused and the file stays byte-identical. Writes are
atomic (temp file in the same directory, fsync, ``os.replace``) and keep the file mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Array, Comment, Item, Null, Table, Whitespace

from billing_cli._errors import ConfigError, RegistryError
from billing_cli.registry.load import parse_registry_text
from billing_cli.registry.model import Registry, did_you_mean

NEW_FILE_HEADER = """\
# billing source registry. See sources.example.toml for every field, explained.
# *_ref fields are references (env:NAME, file:/abs/path, systemd:NAME), never secrets.
"""

# Canonical key order for entries written by `sources add`.
FIELD_ORDER = (
    "source_id",
    "node_id",
    "env",
    "base_url",
    "enabled",
    "auth_mode",
    "credential_ref",
    "client_cert_ref",
    "client_key_ref",
    "ca_bundle_ref",
    "server_name",
    "collect_interval",
    "request_timeout",
    "api",
    "allow_insecure_http",
    "max_response_bytes",
    "stale_after",
    "max_refused_share",
)


# --- public operations -------------------------------------------------------------------


def add_source(path: Path, fields: dict[str, Any]) -> Registry:
    """Append a ``[[sources]]`` entry; create the file when it does not exist."""
    source_id = str(fields["source_id"])

    def change(doc: tomlkit.TOMLDocument) -> None:
        if "sources" not in doc and doc.body and not doc.as_string().endswith("\n\n"):
            doc.add(tomlkit.nl())  # a blank line between what is there and [[sources]]
        aot = _sources_aot(doc, create=True)
        if any(_entry_id(t) == source_id for t in aot):
            raise ConfigError(
                f"{path}: source '{source_id}' already exists "
                f"(see `billing sources show {source_id}`; remove it first to replace it)"
            )
        table = tomlkit.table()
        for key in FIELD_ORDER:
            if fields.get(key) is not None:
                table.add(key, fields[key])
        if len(aot) > 0:
            # The last entry's trailing comments describe whatever follows the AoT (e.g. a
            # [pricing] header): hand them to the new last entry, and keep a blank line
            # between the old last entry and the new header.
            last = aot[-1].value
            tail = _pop_trailing(last)
            last.body.append((None, Whitespace("\n")))
            for item in tail:
                table.value.body.append((None, item))
        aot.append(table)

    return _edit(path, change, create=True)


def remove_source(path: Path, source_id: str) -> Registry:
    def change(doc: tomlkit.TOMLDocument) -> None:
        aot = _sources_aot(doc, create=False)
        i = _index_of(aot, source_id, path)
        tail = _pop_trailing(aot[i].value)
        before = _container_before(doc, aot, i)
        if isinstance(before, tomlkit.TOMLDocument):
            _move_top_level(doc, aot, tail)
        elif before is not None:
            # The comment lines right above entry i describe entry i: they go with it.
            _pop_attached_comments(before)
            if tail and isinstance(tail[0], Whitespace) and _ends_blank(before):
                tail = tail[1:]  # avoid a double blank line where the entry was
            before.body.extend((None, item) for item in tail)
        if len(aot) == 1:
            # tomlkit renders an empty AoT as `sources = []` at the top of the file.
            del doc["sources"]
        else:
            del aot[i]

    return _edit(path, change, create=False)


def set_enabled(path: Path, source_id: str, enabled: bool) -> tuple[Registry, bool]:
    """Set ``enabled``; returns the registry and whether the file changed."""
    changed = False

    def change(doc: tomlkit.TOMLDocument) -> None:
        nonlocal changed
        aot = _sources_aot(doc, create=False)
        entry = aot[_index_of(aot, source_id, path)]
        current = entry.get("enabled", True)
        if current is enabled:
            return
        changed = True
        if "enabled" in entry:
            entry["enabled"] = enabled  # replaced in place: position and comment kept
        else:
            _insert_before_trailing(entry.value, "enabled", enabled)

    registry = _edit(path, change, create=False, write_if=lambda: changed)
    return registry, changed


# Fields `sources set` may change; source_id names the entry (remove + add to rename) and
# enabled has its own verbs (`sources enable|disable`).
SETTABLE = tuple(f for f in FIELD_ORDER if f not in ("source_id", "enabled"))
REQUIRED = ("node_id", "env", "base_url", "auth_mode")


def set_fields(
    path: Path, source_id: str, values: dict[str, Any], unset: list[str]
) -> tuple[Registry, list[str]]:
    """Set (or remove) fields of one entry in place: a changed key keeps its position and
    inline comment, a new one goes after the entry's last key, the rest stays byte for
    byte. Returns the registry and the fields that changed (none: nothing written)."""
    for name in [*values, *unset]:
        if name not in SETTABLE:
            hint = (
                " (use `billing sources enable|disable`)"
                if name == "enabled"
                else did_you_mean(name, SETTABLE)
            )
            raise ConfigError(f"{path}: source '{source_id}': cannot set field '{name}'{hint}")
    for name in unset:
        if name in REQUIRED:
            raise ConfigError(
                f"{path}: source '{source_id}': {name} is required and cannot be unset"
            )
        if name in values:
            raise ConfigError(f"{path}: source '{source_id}': {name} is both set and unset")
    changed: list[str] = []

    def change(doc: tomlkit.TOMLDocument) -> None:
        aot = _sources_aot(doc, create=False)
        entry = aot[_index_of(aot, source_id, path)]
        for key in FIELD_ORDER:
            if key in values:
                value = values[key]
                if key in entry and entry[key] == value:
                    continue
                changed.append(key)
                if key in entry:
                    entry[key] = value  # replaced in place: position and comment kept
                else:
                    _insert_before_trailing(entry.value, key, value)
            elif key in unset and key in entry:
                changed.append(key)
                del entry[key]

    registry = _edit(path, change, create=False, write_if=lambda: bool(changed))
    return registry, changed


# --- the edit cycle ----------------------------------------------------------------------


def _edit(
    path: Path,
    change: Callable[[tomlkit.TOMLDocument], None],
    *,
    create: bool,
    write_if: Callable[[], bool] = lambda: True,
) -> Registry:
    target = path.resolve() if path.is_symlink() else path
    with _directory_lock(target.parent):
        return _edit_locked(path, target, change, create=create, write_if=write_if)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Serialise editors: two `sources add` at once must not lose one of the entries.

    The registry file itself cannot carry the lock (``os.replace`` swaps its inode), and a
    lock file would litter /etc; an flock on the directory leaves nothing behind.
    """
    try:
        fd = os.open(directory if str(directory) else ".", os.O_RDONLY)
    except OSError as exc:
        raise RegistryError(f"{directory}: cannot open directory: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _edit_locked(
    path: Path,
    target: Path,
    change: Callable[[tomlkit.TOMLDocument], None],
    *,
    create: bool,
    write_if: Callable[[], bool],
) -> Registry:
    try:
        original = target.read_text(encoding="utf-8")
        exists = True
    except FileNotFoundError:
        if not create:
            raise RegistryError(
                f"{path}: no such file (create one with `billing sources add ...` "
                "or copy sources.example.toml)"
            ) from None
        original, exists = NEW_FILE_HEADER, False
    except UnicodeDecodeError:
        raise RegistryError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read: {exc.strerror}") from None

    try:
        doc = tomlkit.parse(original)
    except TOMLKitError:
        # Let the loader phrase the error exactly as every other command does.
        parse_registry_text(original, path)
        raise  # pragma: no cover - tomllib accepted what tomlkit refused
    change(doc)
    text = doc.as_string()
    try:
        registry = parse_registry_text(text, path)
    except RegistryError as exc:
        note = "nothing written" if exists else "file not created"
        raise RegistryError(f"{exc.message} ({note})") from None
    if write_if():
        try:
            atomic_write(target, text, exists=exists)
        except OSError as exc:
            raise RegistryError(
                f"{path}: cannot write: {exc.strerror or exc} (file not changed)"
            ) from None
    return registry


def atomic_write(path: Path, text: str, *, exists: bool) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never
    a mix; the mode of an existing file is kept, a new file gets 0666 & ~umask."""
    owner: tuple[int, int] | None = None
    if exists:
        st = path.stat()
        mode = stat.S_IMODE(st.st_mode)
        owner = (st.st_uid, st.st_gid)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                # root editing the service user's file must not take it over.
                with contextlib.suppress(PermissionError):
                    os.fchown(fh.fileno(), *owner)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Persist the rename itself.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- tomlkit helpers ---------------------------------------------------------------------


def _sources_aot(doc: tomlkit.TOMLDocument, *, create: bool) -> AoT:
    current = doc.get("sources")
    if isinstance(current, Array) and len(current) == 0:
        del doc["sources"]  # `sources = []`: replace by a real [[sources]] array of tables
    if "sources" not in doc:
        if not create:
            return tomlkit.aot()
        doc.append("sources", tomlkit.aot())
    aot = doc["sources"]
    if not isinstance(aot, AoT):
        raise RegistryError("sources must be written as [[sources]] tables to be edited")
    return aot


def _entry_id(table: Table) -> str | None:
    sid = table.get("source_id")
    return str(sid) if sid is not None else None


def _index_of(aot: AoT, source_id: str, path: Path) -> int:
    ids = [_entry_id(t) for t in aot]
    if source_id in ids:
        return ids.index(source_id)
    known = [i for i in ids if i is not None]
    raise ConfigError(
        f"{path}: no source '{source_id}'{did_you_mean(source_id, known)}; "
        f"known sources: {', '.join(known) or 'none'} (see `billing sources list`)"
    )


def _trailing_start(container: Container) -> int:
    """Index of the first item after the last key/value pair."""
    body = container.body
    i = len(body)
    while i > 0 and body[i - 1][0] is None and isinstance(body[i - 1][1], Whitespace | Comment):
        i -= 1
    return i


def _pop_trailing(container: Container) -> list[Item]:
    # Only key-less items after every key are removed, so no index in tomlkit's key map
    # moves: editing ``body`` directly is safe here.
    start = _trailing_start(container)
    tail = [item for _, item in container.body[start:]]
    del container.body[start:]
    return tail


def _pop_attached_comments(container: Container) -> None:
    """Drop the comment lines directly above the next header (no blank line between)."""
    body = container.body
    start = _trailing_start(container)
    while len(body) > start and body[-1][0] is None and isinstance(body[-1][1], Comment):
        body.pop()


def _container_before(doc: tomlkit.TOMLDocument, aot: AoT, i: int) -> Container | None:
    """The container whose tail holds the comments written above entry ``i``."""
    if i > 0:
        prev: Container = aot[i - 1].value
        return prev
    keys = [k for k, _ in doc.body]
    items = [v for _, v in doc.body]
    pos = next((n for n, v in enumerate(items) if v is aot), None)
    if pos is None or pos == 0:
        return None  # nothing above the first entry to carry its comments
    before = items[pos - 1]
    if isinstance(before, Table) and keys[pos - 1] is not None:
        table_body: Container = before.value
        return table_body
    if isinstance(before, Whitespace | Comment):
        return doc  # top-level comments right above the first [[sources]]
    return None


def _ends_blank(container: Container) -> bool:
    body = container.body
    return bool(body) and body[-1][0] is None and isinstance(body[-1][1], Whitespace)


def _insert_before_trailing(container: Container, key: str, value: Any) -> None:
    idx = _trailing_start(container)
    if idx >= len(container.body):
        container.append(key, value)
    else:
        container._insert_at(idx, key, value)


def _move_top_level(doc: tomlkit.TOMLDocument, aot: AoT, tail: list[Item]) -> None:
    """Entry 0 is removed and only top-level comments precede the AoT.

    The document body is indexed by position (tomlkit's key map), so items are replaced
    in place rather than removed or inserted: attached comments become ``Null`` (renders
    nothing), and the removed entry's trailing lines are merged, verbatim, into the slot
    right above the AoT.
    """
    body = doc.body
    pos = next(n for n, (_, v) in enumerate(body) if v is aot)
    n = pos - 1
    while n >= 0 and body[n][0] is None and isinstance(body[n][1], Comment):
        body[n] = (None, Null())
        n -= 1
    above = next((v for _, v in reversed(body[:pos]) if not isinstance(v, Null)), None)
    if tail and isinstance(tail[0], Whitespace) and isinstance(above, Whitespace):
        tail = tail[1:]  # avoid a double blank line where the entry was
    raw = "".join(item.as_string() for item in tail)
    if raw:
        slot = body[pos - 1][1]
        body[pos - 1] = (None, Whitespace(slot.as_string() + raw))
