"""The audit writer's fast path: byte-identical to the documented conversion.

The writer formats klockwork's own lease records as canonical JSON directly
(:mod:`klockwork.core.audit.canonical`); every line it writes must be exactly the
line the documented conversion (``to_json_value`` + ``canonical_json``)
gives, whatever odd values the records hold. References here are computed
with the chain's public helpers from the records' ``__audit_data__()``.
"""

from __future__ import annotations

import enum
import gc
import hashlib
import json
import threading
import warnings
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klockwork.core.audit import canonical
from klockwork.core.audit import encode as audit_encode
from klockwork.core.audit.canonical import INT_LIMIT
from klockwork.core.audit.chain import GENESIS_HASH, canonical_json, to_json_value
from klockwork.core.audit.encode import ENDED, PENDING_SLOTS, encode_batch, encode_slow
from klockwork.core.audit.log import AuditLog
from klockwork.core.audit.records import Denied, granted_data
from klockwork.core.clock import ManualClock
from klockwork.core.governance.outcomes import ActionResult, GateEntry, action_digest
from klockwork.core.leases.rules import ParsedIntent
from klockwork.core.model import (
    Conflict,
    LeaseRecord,
    LeaseState,
    Predicate,
    Verdict,
    VerdictStatus,
    _build,
)

ODD_CHARS = [
    "a",
    "Z",
    '"',
    "\\",
    "\n",
    "\t",
    "\x00",
    "\x1f",
    "\x7f",
    "\u2028",
    "é",
    "ü",
    "\udc80",
    "\ud800",
    "😀",
    "/",
    " ",
    ":",
]


class OddStr(str):
    """A str subclass whose str() differs from its text (converted by str())."""

    def __str__(self) -> str:
        return "overridden"


class Level(enum.IntEnum):
    HIGH = 3


texts = st.one_of(
    st.text(max_size=12),
    st.lists(st.sampled_from(ODD_CHARS), max_size=8).map("".join),
    st.sampled_from(["FILE:/x", "", OddStr("FILE:/odd")]),
)
ints = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**62),
    st.sampled_from(
        [0, -1, INT_LIMIT - 1, INT_LIMIT, -INT_LIMIT, -INT_LIMIT + 1, 1 << 13_500, True, Level.HIGH]
    ),
)
# Records hold enum members (``__audit_data__`` reads ``.value``); another
# enum's member must not pass for a predicate.
predicates = st.sampled_from([*Predicate, VerdictStatus.WAIT])
reasons = st.one_of(st.none(), texts, st.sampled_from([0, 7, ["list"]]))


@st.composite
def records(draw: st.DrawFn) -> LeaseRecord:
    return LeaseRecord(
        lease_id=draw(texts),
        agent_id=draw(texts),
        session_id=draw(texts),
        resource=draw(texts),
        predicate=draw(predicates),
        priority=1,
        fencing_token=draw(ints),
        acquired_at=1_700_000_000_000,
        expires_at=draw(ints),
        ttl_ms=30_000,
        state=LeaseState.RELEASED,
        reason=draw(reasons),
    )


def documented(data: Any) -> str:
    return canonical_json(to_json_value(data)).decode()


def assert_same_or_refused(direct: Any, reference: Any) -> None:
    """``direct()`` gives the documented text, or refuses (raises / is not UTF-8)."""
    try:
        text = direct()
    except Exception:
        return  # the writer takes the documented conversion instead
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates: the writer takes the documented conversion
    assert text == documented(reference)


# --------------------------------------------------------------------------- direct formats
def test_plain_lease_records_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common entries are formatted directly (the fast path is really taken)."""
    rec = LeaseRecord("id1", "a", "s", "FILE:/é\n", Predicate.MUTATES, 1, 7, 0, 99, 5, reason="r")
    plain = LeaseRecord("id2", "a", "s", "FILE:/x", Predicate.CONSUMES, 1, 8, 0, 99, 5)
    batch = [
        (1, 10, "lease.granted", "a", "s", rec, 123),
        (2, 11, "lease.revoked", "a", "s", rec, ENDED),
        (3, 12, "lease.released", "a", "s", plain, ENDED),
        (4, 13, "tool.end", "a", None, {"k": [1, "v"]}, None),
        (5, 14, "lease.denied", "b", "t", _plain_denial(), None),
    ]
    expected = reference_rows(batch)

    def no_slow_path(*args: Any) -> Any:
        raise AssertionError(f"slow path taken for {args}")

    monkeypatch.setattr(audit_encode, "encode_slow", no_slow_path)
    rows, _ = encode_batch([slot for entry in batch for slot in entry], GENESIS_HASH)
    assert [(r[7], r[8]) for r in rows] == expected
    assert rows[0][5] == documented(granted_data(rec, 123))
    assert granted_data(rec, 123)["expires_at"] == 123  # as granted, not the record's 99


def _plain_denial() -> Denied:
    conflict = _build(
        Conflict,
        {
            "agent_id": "a",
            "session_id": "s",
            "resource": "FILE:/x",
            "predicate": Predicate.MUTATES,
            "lease_id": "id1",
        },
    )
    verdict = _build(
        Verdict,
        {"status": VerdictStatus.WAIT, "leases": [], "conflicts": [conflict], "wait_time_ms": 5},
    )
    intents = (ParsedIntent("FILE:/x", Predicate.CONSUMES, ()),)
    return Denied(verdict.status, verdict.conflicts, verdict.wait_time_ms, intents)


@st.composite
def denials(draw: st.DrawFn) -> Denied:
    conflicts = [
        _build(
            Conflict,
            {
                "agent_id": draw(texts),
                "session_id": draw(texts),
                "resource": draw(texts),
                "predicate": draw(predicates),
                "lease_id": draw(st.one_of(st.none(), texts)),
            },
        )
        for _ in range(draw(st.integers(0, 3)))
    ]
    verdict = _build(
        Verdict,
        {
            "status": draw(
                st.sampled_from([VerdictStatus.WAIT, VerdictStatus.DIE, Predicate.DELETES])
            ),
            "leases": [],
            "conflicts": conflicts,
            "wait_time_ms": draw(st.one_of(st.none(), ints)),
        },
    )
    intents = tuple(
        ParsedIntent(draw(texts), draw(predicates), ())  # type: ignore[arg-type]
        for _ in range(draw(st.integers(0, 3)))
    )
    return Denied(verdict.status, verdict.conflicts, verdict.wait_time_ms, intents)


@settings(max_examples=300, deadline=None)
@given(denied=denials())
def test_denied_json_is_the_documented_text(denied: Denied) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic warns when dumping odd field types
        reference = denied.__audit_data__()
    assert_same_or_refused(denied.__audit_json__, reference)


_ODD_TEXT = st.text(max_size=6)  # surrogates included: the writer must refuse those
_OPTIONAL = st.none() | _ODD_TEXT | st.integers()  # an int where text belongs: refused


@st.composite
def gate_entries(draw: st.DrawFn) -> GateEntry:
    result = ActionResult.model_construct(
        status=draw(st.sampled_from(["executed", "requested", "denied"])),
        audit_event_id=draw(_OPTIONAL),
        approval_id=draw(_OPTIONAL),
        policy_name=draw(_OPTIONAL),
        denial_reason=draw(_OPTIONAL),
        conditions_evaluated=[],
        message="",
    )
    metadata = draw(
        st.dictionaries(_ODD_TEXT, st.none() | st.integers() | _ODD_TEXT | st.floats(), max_size=3)
        | st.dictionaries(st.integers(), st.integers(), max_size=2)  # not JSON as is
    )
    return GateEntry(result, draw(_ODD_TEXT | st.integers()), metadata, draw(_OPTIONAL))


@settings(max_examples=400, deadline=None)
@given(entry=gate_entries())
def test_gate_entry_json_is_the_documented_text(entry: GateEntry) -> None:
    assert_same_or_refused(entry.__audit_json__, entry.__audit_data__())


def test_a_plain_gate_entry_is_formatted_directly() -> None:
    result = ActionResult(status="executed", audit_event_id="g-1", policy_name="reads")
    entry = GateEntry(result, "repo.read", {"n": 1}, None)
    assert entry.__audit_json__() == documented(entry.__audit_data__())


def test_action_digest_without_metadata_is_the_stored_text() -> None:
    """Digests are stored with gate records: the direct text must be json.dumps's, exactly."""
    for agent, action in [("a", "repo.read"), ('ü\n"', "x\u2028y"), ("\ud800", "é")]:
        for metadata in (None, {}):
            text = json.dumps([agent, action, {}], sort_keys=True, separators=(",", ":"))
            expected = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            assert action_digest(agent, action, metadata) == expected


# --------------------------------------------------------------------------- whole lines
def reference_rows(entries: list[tuple[Any, ...]]) -> list[tuple[str, bytes]]:
    """(hash, line) of each entry by the specification, sealed as one block after genesis."""
    bodies, objects = [], []
    for seq, ts, kind, agent, session, data, how in entries:
        if how is ENDED:
            data = data.__audit_data__()
        elif how is not None:
            data = granted_data(data, how)
        value = to_json_value({} if data is None else data)
        if not isinstance(value, dict):
            value = {"value": value}
        fields = {
            "agent_id": agent,
            "data": value,
            "kind": kind,
            "prev_hash": GENESIS_HASH,
            "seq": seq,
            "session_id": session,
            "ts": ts,
        }
        objects.append(fields)
        bodies.append(canonical_json(fields))
    seal = hashlib.sha256(GENESIS_HASH.encode() + b"\n".join(bodies)).hexdigest()
    return [(seal, canonical_json({**fields, "hash": seal})) for fields in objects]


identities = st.one_of(st.none(), st.text(max_size=6), st.sampled_from(["a", "é\n", '"q"']))
plain_data = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), ints, st.floats(), texts),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.one_of(texts, ints), inner, max_size=3),
    ),
    max_leaves=8,
)


@st.composite
def entries(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    out = []
    for seq in range(1, draw(st.integers(1, 8)) + 1):
        how_kind = draw(st.sampled_from(["record", "grant", "end"]))
        agent = draw(identities)
        session = draw(identities)
        ts = draw(st.integers(0, 2**50))
        if how_kind == "record":
            data = draw(st.one_of(st.none(), plain_data))
            out.append((seq, ts, "tool.end", agent, session, data, None))
        elif how_kind == "grant":
            out.append((seq, ts, "lease.granted", agent, session, draw(records()), draw(ints)))
        else:
            out.append((seq, ts, "lease.released", agent, session, draw(records()), ENDED))
    return out


@settings(max_examples=300, deadline=None)
@given(batch=entries())
def test_encode_batch_lines_are_the_specified_lines(batch: list[tuple[Any, ...]]) -> None:
    flat = [slot for entry in batch for slot in entry]
    rows, head = encode_batch(flat, GENESIS_HASH)
    expected = reference_rows(batch)
    assert [(r[7], r[8]) for r in rows] == expected
    assert head == expected[-1][0]
    for row, entry in zip(rows, batch, strict=True):
        slow = encode_slow(*entry[:6], row[6], entry[6])  # the entry sealed alone
        assert row[:7] == slow[:7]  # every column, not only the line
        assert row[8] == slow[8].replace(slow[7].encode(), row[7].encode())


# Every exact JSON type but float (floats keep the standard encoder), odd text included.
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_FLOAT_FREE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-INT_LIMIT + 1, INT_LIMIT - 1)
    | _TEXT
    | st.sampled_from(['\x00\x1f\x7f\u2028\u2029"\\/', "é\U0001f600", "\t\r\n\b\f"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_TEXT, inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(data=st.dictionaries(_TEXT, _FLOAT_FREE, max_size=6))
def test_orjson_text_is_the_specified_canonical_json(data: dict[str, Any]) -> None:
    """Float-free data takes orjson, whose bytes must be exactly the specification's."""
    assert canonical._plain(data) == canonical._NO_FLOATS
    assert canonical._orjson_dumps is not None  # the fast encoder is really installed
    specified = json.dumps(
        to_json_value(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert audit_encode.data_text(data) == specified


def test_floats_and_odd_types_keep_the_standard_encoder() -> None:
    for data in ({"f": 1e-7}, {"n": [1, {"x": float("nan")}]}, {"inf": float("inf")}):
        assert canonical._plain(data) == canonical._FLOATS
        assert audit_encode.data_text(data) == canonical_json(to_json_value(data)).decode()
    for odd in ({1: "int key"}, {"big": 2**70}, {"set": {1}}, {"e": Predicate.MUTATES}):
        assert canonical._plain(odd) == canonical._ODD_DATA
        assert audit_encode.data_text(odd) == canonical_json(to_json_value(odd)).decode()


def test_encode_batch_refuses_a_torn_queue() -> None:
    flat = [1, 1000, "tool.end", None, None, {}, None, 2]
    with pytest.raises(ValueError):
        encode_batch(flat, GENESIS_HASH)
    assert PENDING_SLOTS == 7


# --------------------------------------------------------------------------- recording
def test_recording_creates_no_objects_the_garbage_collector_tracks() -> None:
    """Queued entries must not be promoted by collections (DESIGN "Performance stance")."""
    clock = ManualClock(1_700_000_000_000)
    log = AuditLog(clock=clock)
    rec = LeaseRecord("id", "a", "s", "FILE:/x", Predicate.MUTATES, 1, 1, 0, 9, 9)
    log.record_grant(rec, 1)  # starts the writer
    log.flush()
    log._wake_needed = False  # keep the writer asleep: entries stay queued
    was = gc.isenabled()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for i in range(1000):
            log.record_grant(rec, i)
            log.record_end("lease.released", rec, i)
            log.record("tool.end", "a", "s", None, ts=i)
        grown = gc.get_count()[0] - before
    finally:
        if was:
            gc.enable()
        log._wake_needed = True
    assert grown < 50, f"{grown} tracked objects allocated for 3000 queued entries"
    log.record("tool.end", None, None)  # wakes the writer
    result = log.verify()
    assert result.valid and result.checked == 3002
    log.close()


def test_a_writer_that_cannot_start_is_started_by_the_next_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = AuditLog(clock=ManualClock(1_700_000_000_000))
    start = threading.Thread.start
    with monkeypatch.context() as patch:

        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        patch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError):
            log.record("tool.start", "a", "s")  # queued, but no writer yet
    assert threading.Thread.start is start
    log.record("tool.end", "a", "s")  # starts the writer, which takes both
    result = log.verify()
    assert result.valid and result.checked == 2
    log.close()
