"""The audit chain's format and verification (DESIGN "Audit trail").

Expected hashes are computed here with hashlib from hand-written canonical
text, never with klockwork's own functions, so a change of format fails.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klockwork.core.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    Checkpoint,
    block_seal,
    canonical_json,
    entry_body,
    entry_hash,
    sign_checkpoint,
)
from klockwork.core.audit.log import AuditLog, export_jsonl, verify_file
from klockwork.core.audit.verify import verify_entries
from klockwork.core.clock import ManualClock
from klockwork.core.errors import AuditIntegrityError

KEY = b"audit-test-key"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- canonical form
def test_canonical_json_sorts_keys_no_spaces_raw_utf8() -> None:
    assert canonical_json({"b": 1, "a": [True, None, 1.5], "é": "ü"}) == (
        '{"a":[true,null,1.5],"b":1,"é":"ü"}'.encode()
    )


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_genesis_entry_hash_matches_an_independent_computation() -> None:
    fields = {
        "seq": 1,
        "ts": 1000,
        "kind": "lease.granted",
        "agent_id": "a1",
        "session_id": None,
        "data": {"resource": "FILE:/x", "fencing_token": 3},
        "prev_hash": GENESIS_HASH,
    }
    text = (
        '{"agent_id":"a1","data":{"fencing_token":3,"resource":"FILE:/x"},'
        '"kind":"lease.granted","prev_hash":"' + "0" * 64 + '","seq":1,'
        '"session_id":null,"ts":1000}'
    )
    assert entry_hash(GENESIS_HASH, fields) == sha("0" * 64 + text)


def test_log_chains_hashes_exactly_as_documented() -> None:
    log = AuditLog(clock=ManualClock(5000))
    log.record("lease.granted", "a1", "s1", {"n": 1})
    log.record("tool.start", None, None, {"tool": "søk"})
    first, second = log.query().entries  # sealed together: one block
    text1 = (
        '{"agent_id":"a1","data":{"n":1},"kind":"lease.granted","prev_hash":"'
        + "0" * 64
        + '","seq":1,"session_id":"s1","ts":5000}'
    )
    text2 = (
        '{"agent_id":null,"data":{"tool":"søk"},"kind":"tool.start","prev_hash":"'
        + "0" * 64
        + '","seq":2,"session_id":null,"ts":5000}'
    )
    seal = sha("0" * 64 + text1 + "\n" + text2)
    assert first.prev_hash == second.prev_hash == GENESIS_HASH
    assert first.hash == second.hash == seal
    # The next block links to this block's seal.
    log.record("tool.end", None, None, {})
    third = log.query(kind="tool.end").entries[0]
    text3 = (
        '{"agent_id":null,"data":{},"kind":"tool.end","prev_hash":"'
        + seal
        + '","seq":3,"session_id":null,"ts":5000}'
    )
    assert third.prev_hash == seal and third.hash == sha(seal + text3)
    # The stored line is the same object with "hash" added, canonical.
    lines = list(log.iter_lines())
    assert (
        lines[1] == (text2[:-1].replace('"kind"', f'"hash":"{second.hash}","kind"') + "}").encode()
    )
    log.close()


def test_signature_is_hmac_sha256_of_seq_colon_hash() -> None:
    expected = hmac.new(KEY, b"7:" + b"a" * 64, hashlib.sha256).hexdigest()
    assert sign_checkpoint(KEY, 7, "a" * 64) == expected


# --------------------------------------------------------------------------- tampering
def make_file(tmp_path: Path, n: int = 6, *, block: int = 1) -> tuple[Path, list[str], Checkpoint]:
    """An export of ``n`` entries sealed ``block`` at a time (1: each entry alone)."""
    log = AuditLog(clock=ManualClock(1_000), key=KEY)
    for i in range(n):
        log.record("lease.granted", f"agent-{i % 2}", "s", {"i": i, "resource": f"FILE:/{i}"})
        if (i + 1) % block == 0:
            log.flush()
    path = tmp_path / "audit.jsonl"
    assert log.export(path) == n
    checkpoint = log.checkpoint()
    log.close()
    return path, path.read_text("utf-8").split("\n")[:-1], checkpoint


def write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), "utf-8")


def test_untouched_export_verifies(tmp_path: Path) -> None:
    path, _, cp = make_file(tmp_path)
    result = verify_file(path, against=cp, key=KEY)
    assert result.valid and result.checked == 6 and result.head_seq == 6
    assert result.head_hash == cp.hash and result.first_broken_seq is None


def test_edited_field_is_caught(tmp_path: Path) -> None:
    path, lines, _ = make_file(tmp_path)
    lines[2] = lines[2].replace('"agent-0"', '"mallory"')
    write(path, lines)
    result = verify_file(path)
    assert not result.valid and result.first_broken_seq == 3
    assert result.checked == 2 and "modified" in result.reason


def test_reformatted_but_equal_line_still_verifies(tmp_path: Path) -> None:
    path, lines, cp = make_file(tmp_path)
    lines[1] = json.dumps(json.loads(lines[1]), indent=None)  # spaces, other key order
    write(path, lines)
    assert verify_file(path, against=cp, key=KEY).valid


def test_dropped_line_is_caught(tmp_path: Path) -> None:
    path, lines, _ = make_file(tmp_path)
    del lines[3]
    write(path, lines)
    result = verify_file(path)
    assert not result.valid and result.first_broken_seq == 4 and "missing" in result.reason


def test_swapped_lines_are_caught(tmp_path: Path) -> None:
    path, lines, _ = make_file(tmp_path)
    lines[1], lines[4] = lines[4], lines[1]
    write(path, lines)
    result = verify_file(path)
    assert not result.valid and result.first_broken_seq == 2


def test_inserted_forged_line_is_caught(tmp_path: Path) -> None:
    path, lines, _ = make_file(tmp_path)
    prev = json.loads(lines[1])
    forged = {**prev, "seq": 3, "prev_hash": prev["hash"], "data": {"forged": True}}
    forged["hash"] = entry_hash(prev["hash"], forged)  # even with a correct hash
    lines.insert(2, json.dumps(forged))
    write(path, lines)
    result = verify_file(path)
    assert not result.valid and result.first_broken_seq == 3
    assert "out of order or repeated" in result.reason


def test_truncation_is_caught_only_with_a_checkpoint(tmp_path: Path) -> None:
    path, lines, cp = make_file(tmp_path)
    write(path, lines[:4])
    assert verify_file(path).valid  # a chain cut short is still a chain...
    result = verify_file(path, against=cp, key=KEY)  # ...but not the one checkpointed
    assert not result.valid and result.first_broken_seq == 5 and "truncated" in result.reason


def test_rewritten_tail_differs_from_the_checkpoint(tmp_path: Path) -> None:
    path, lines, cp = make_file(tmp_path)
    last = json.loads(lines[-1])
    last["data"] = {"rewritten": 1}
    last["hash"] = entry_hash(last["prev_hash"], last)
    lines[-1] = canonical_json(last).decode()
    write(path, lines)
    assert verify_file(path).valid  # internally consistent
    result = verify_file(path, against=cp, key=KEY)
    assert not result.valid and result.first_broken_seq == 6 and "checkpoint" in result.reason


def test_bad_or_missing_signature_is_caught(tmp_path: Path) -> None:
    path, _, cp = make_file(tmp_path)
    forged = cp.model_copy(update={"signature": "0" * 64})
    result = verify_file(path, against=forged, key=KEY)
    assert not result.valid and "signature" in result.reason and result.first_broken_seq is None
    result = verify_file(path, against=cp, key=b"another key")
    assert not result.valid and "signature" in result.reason
    unsigned = cp.model_copy(update={"signature": None})
    assert not verify_file(path, against=unsigned, key=KEY).valid
    assert verify_file(path, against=unsigned).valid  # no key: the signature is not checked


def test_malformed_line_names_its_line_number(tmp_path: Path) -> None:
    path, lines, _ = make_file(tmp_path)
    lines[2] = lines[2][:-5]
    write(path, lines)
    result = verify_file(path)
    assert not result.valid and "line 3" in result.reason and result.first_broken_seq == 3
    lines[2] = '{"seq": 3}'
    write(path, lines)
    assert "line 3 is not an audit entry" in verify_file(path).reason


def test_verify_entries_catches_an_edited_object() -> None:
    log = AuditLog(clock=ManualClock(0))
    for i in range(5):
        log.record("tool.end", "a", "s", {"i": i})
        log.flush()  # each entry a block of its own
    entries = log.query().entries
    assert verify_entries(entries).valid
    entries[2] = entries[2].model_copy(update={"ts": 99})
    result = verify_entries(entries)
    assert not result.valid and result.first_broken_seq == 3
    with pytest.raises(AuditIntegrityError, match="entry 3"):
        result.raise_if_invalid()
    log.close()


# --------------------------------------------------------------------------- sealed blocks
def test_a_block_verifies_and_its_seal_covers_every_entry(tmp_path: Path) -> None:
    path, lines, cp = make_file(tmp_path, 12, block=4)
    assert len({json.loads(line)["hash"] for line in lines}) == 3  # three blocks
    result = verify_file(path, against=cp, key=KEY)
    assert result.valid and result.checked == 12 and result.head_hash == cp.hash


@pytest.mark.parametrize("index", range(12))
def test_an_edit_anywhere_in_a_block_names_the_block(tmp_path: Path, index: int) -> None:
    path, lines, cp = make_file(tmp_path, 12, block=4)
    lines[index] = lines[index].replace('"s"', '"mallory"', 1)
    write(path, lines)
    for result in (verify_file(path), verify_file(path, against=cp, key=KEY)):
        first = index - index % 4 + 1
        assert not result.valid and result.first_broken_seq == first
        assert result.checked == first - 1 and result.head_seq == first - 1
        assert f"entries {first}..{first + 3}" in result.reason


def test_an_entry_cut_from_a_block_is_caught_without_a_checkpoint(tmp_path: Path) -> None:
    path, lines, _ = make_file(tmp_path, 12, block=4)
    write(path, lines[:10])  # the last block loses two entries
    result = verify_file(path)
    assert not result.valid and result.first_broken_seq == 9 and result.checked == 8
    write(path, lines[:8])  # cut at a block boundary: still a chain (a checkpoint tells)
    assert verify_file(path).valid


def test_swapped_lines_inside_a_block_are_caught(tmp_path: Path) -> None:
    path, lines, _ = make_file(tmp_path, 12, block=4)
    lines[5], lines[6] = lines[6], lines[5]
    write(path, lines)
    result = verify_file(path)
    assert not result.valid and result.first_broken_seq == 6 and "reordered" in result.reason


def test_a_block_split_in_two_is_caught(tmp_path: Path) -> None:
    """Relabelling half a block as a block of its own breaks both seals."""
    path, lines, _ = make_file(tmp_path, 8, block=8)
    objs = [json.loads(line) for line in lines]
    fake = block_seal(GENESIS_HASH, [entry_body(o) for o in objs[:4]])
    for o in objs[:4]:
        o["hash"] = fake
    for o in objs[4:]:
        o["prev_hash"] = fake
    write(path, [canonical_json(o).decode() for o in objs])
    result = verify_file(path)
    assert not result.valid and result.first_broken_seq == 5 and result.checked == 4


def test_a_malformed_line_in_a_block_is_named_exactly(tmp_path: Path) -> None:
    path, lines, _ = make_file(tmp_path, 8, block=8)
    lines[5] = '{"agent_id":"mallory",' + lines[5][1:]  # a duplicate key
    write(path, lines)
    result = verify_file(path)
    assert not result.valid and result.first_broken_seq == 6
    assert "line 6 repeats the key 'agent_id'" in result.reason


def test_verify_entries_checks_whole_blocks() -> None:
    log = AuditLog(clock=ManualClock(0))
    for i in range(5):
        log.record("tool.end", "a", "s", {"i": i})
    entries = log.query().entries  # one block
    assert verify_entries(entries).valid
    entries[2] = entries[2].model_copy(update={"ts": 99})
    result = verify_entries(entries)
    assert not result.valid and result.first_broken_seq == 1 and "entries 1..5" in result.reason
    log.close()


def test_export_jsonl_of_entries_round_trips(tmp_path: Path) -> None:
    log = AuditLog(clock=ManualClock(0))
    for i in range(3):
        log.record("chain.start", "a", None, {"i": i})
    path = tmp_path / "e.jsonl"
    assert export_jsonl(log.query().entries, path) == 3
    assert [AuditEntry.from_line(x).seq for x in path.read_bytes().splitlines()] == [1, 2, 3]
    assert verify_file(path, against=log.checkpoint()).valid
    log.close()


# --------------------------------------------------------------------------- property
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.text(max_size=8)
)
datas = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        json_scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=6,
    ),
    max_size=4,
)
# Identities the log accepts (see klockwork.core.validation): visible, NFC text.
IDENTITIES = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, categories=("L", "N", "P", "S")),
    min_size=1,
    max_size=5,
)
records = st.lists(
    st.tuples(
        st.sampled_from(["lease.granted", "tool.end", "action.denied"]),
        st.none() | IDENTITIES,
        st.none() | IDENTITIES,
        datas,
    ),
    min_size=1,
    max_size=12,
)
TAMPERS = ["none", "edit_ts", "edit_data", "drop", "swap", "duplicate", "truncate", "reorder_keys"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    records=records,
    tamper=st.sampled_from(TAMPERS),
    pick=st.integers(0, 10_000),
    seal_after=st.sets(st.integers(0, 11)),
)
def test_verify_file_is_valid_iff_not_tampered(
    tmp_path: Path,
    records: list[tuple[str, str | None, str | None, dict[str, object]]],
    tamper: str,
    pick: int,
    seal_after: set[int],
) -> None:
    """Any partition into blocks; any tamper is caught, an edit at its block's first seq."""
    log = AuditLog(clock=ManualClock(1), key=KEY)
    for index, (kind, agent, session, data) in enumerate(records):
        log.record(kind, agent, session, data)
        if index in seal_after:
            log.flush()  # ends a block here
    path = tmp_path / "p.jsonl"
    log.export(path)
    cp = log.checkpoint()
    log.close()
    lines = path.read_text("utf-8").split("\n")[:-1]
    seals = [json.loads(line)["hash"] for line in lines]
    assert seals == sorted(seals, key=seals.index)  # each block is one run of lines
    n = len(lines)
    i = pick % n
    tampered = True
    if tamper == "none" or (tamper in ("swap", "duplicate", "truncate") and n < 2):
        tampered = False
    elif tamper == "edit_ts":
        obj = json.loads(lines[i])
        obj["ts"] += 1
        lines[i] = canonical_json(obj).decode()
    elif tamper == "edit_data":
        obj = json.loads(lines[i])
        obj["data"]["\x00tamper"] = pick
        lines[i] = canonical_json(obj).decode()
    elif tamper == "drop":
        del lines[i]
    elif tamper == "swap":
        j = (i + 1 + pick // n % (n - 1)) % n
        lines[i], lines[j] = lines[j], lines[i]
    elif tamper == "duplicate":
        lines.insert(i, lines[i])
    elif tamper == "truncate":
        lines = lines[: i % (n - 1) + 1]
    elif tamper == "reorder_keys":  # same content, not canonical text: not a tamper
        obj = json.loads(lines[i])
        lines[i] = json.dumps(dict(reversed(obj.items())), ensure_ascii=True)
        tampered = False
    write(path, lines)
    result = verify_file(path, against=cp, key=KEY)
    assert result.valid is (not tampered), (tamper, i, result.reason)
    if tamper in ("edit_ts", "edit_data"):
        assert result.first_broken_seq == seals.index(seals[i]) + 1, result.reason
    if tamper == "truncate" and tampered:  # without a checkpoint: caught inside a block only
        cut = len(lines)
        assert verify_file(path).valid is (seals[cut - 1] != seals[cut])
