"""The ingest spool: validated batches go to a temporary file and come back exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_cli.cli._spool import Spool
from billing_cli.core.types import Item, Rejection, Sample

text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
counter = st.integers(min_value=0, max_value=2**63 - 1)
samples = st.lists(st.builds(Sample, text, text, text, counter, counter), max_size=6)
items = st.builds(
    Item,
    st.integers(min_value=-(2**62), max_value=2**62),
    text,
    text,
    st.one_of(st.none(), text),
    samples,
)
rejections = st.builds(
    Rejection, st.one_of(st.none(), st.integers(0, 2**62)), text, text, text, text, text
)
batches = st.lists(
    st.tuples(st.lists(items, max_size=5), st.lists(rejections, max_size=3)), max_size=5
)


def _exact(batch: tuple[list[Item], list[Rejection]]) -> list[object]:
    """A batch with every type spelled out: equal NamedTuples of other types must not pass."""
    its, rejs = batch
    return [
        [(type(i), i, [(type(s), s, [type(v) for v in s]) for s in i.samples]) for i in its],
        [(type(r), r) for r in rejs],
    ]


@given(batches)
def test_batches_come_back_exactly_and_in_order(
    written: list[tuple[list[Item], list[Rejection]]],
) -> None:
    with Spool() as spool:
        for its, rejs in written:
            spool.add(its, rejs)
        assert len(spool) == len(written)
        back = list(spool)
    assert [_exact(b) for b in back] == [_exact(b) for b in written]


def test_repeated_identities_are_shared_and_stored_once() -> None:
    """The fleet shape: every item names the same series in the same order."""
    names = [Sample(f"uuid-{k:04d}", f"user{k}@example.com", "vless-in", 0, 0) for k in range(500)]

    def item(minute: int) -> Item:
        return Item(
            minute, "node", "prod", "boot-1", [n._replace(uplink_total=minute) for n in names]
        )

    with Spool() as spool:
        spool.add([item(m) for m in range(10)], [])
        spool.add([item(m) for m in range(10, 20)], [])  # held in memory
        # 16 bytes of counters a sample; the names once (each is ~40 bytes), not per item
        assert 10 * 500 * 16 < spool.bytes_on_disk < 10 * 500 * 16 + 2 * 500 * 40
        first, second = list(spool)
    assert [i.samples for i in first[0]] == [item(m).samples for m in range(10)]
    assert second[0][0] == item(10)
    uuids = {id(s.uuid) for i in first[0] for s in i.samples}
    assert len(uuids) == 500  # one string per series, shared by every item of the batch


def test_the_last_batch_never_touches_the_disk(tmp_path: Path) -> None:
    with Spool(directory=tmp_path) as spool:
        spool.add([Item(1, "n", "e", None, [Sample("u", "", "", 1, 2)])], [])
        assert spool.bytes_on_disk == 0
        assert list(spool) == [([Item(1, "n", "e", None, [Sample("u", "", "", 1, 2)])], [])]


def test_the_spool_file_is_never_visible_and_is_closed(tmp_path: Path) -> None:
    spool = Spool(directory=tmp_path)
    with spool:
        for t in range(3):
            spool.add([Item(t, "n", "e", None, [Sample("u", "", "", t, t)])], [])
        assert spool.bytes_on_disk > 0
        assert os.listdir(tmp_path) == []  # unlinked at once: nothing to clean up after a kill
    assert spool.closed


def test_a_spool_is_read_once() -> None:
    with Spool() as spool:
        spool.add([], [])
        assert list(spool) == [([], [])]
        with pytest.raises(RuntimeError, match="once"):
            list(spool)
