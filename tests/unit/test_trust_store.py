"""`TrustStore`: finding a node by whatever a person types, and keeping trust on disk.

No clock is read for real: the pending list runs on a clock the test moves. Who may
wait in it is `PendingBook`'s decision, tested alone in test_trust_pending.py; here, that
the store applies it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.errors import ConfigError
from shoal.mesh.identity import short_id
from shoal.trust import store as store_mod
from shoal.trust.pending import MAX_PENDING, NEW_PER_MINUTE, PendingFull
from shoal.trust.store import TrustedNode, TrustState, TrustStore


class Clock:
    """Stands in for the `time` module inside shoal.trust.store."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(store_mod, "time", types.SimpleNamespace(time=fake.time))
    return fake


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> TrustStore:
    return TrustStore(tmp_path / "data" / "trust.json")


def random_id(prefix: str = "") -> str:
    return prefix + secrets.token_hex(32)[len(prefix) :]


def id_with_short_digits(digits: str) -> str:
    """A node ID whose short ID is SHOAL-<digits> (12 base32 digits)."""
    head = base64.b32decode(digits + "AAAA")  # 16 digits: the first 10 bytes of the ID
    return head.hex() + secrets.token_hex(22)


def meet(
    store: TrustStore,
    node_id: str,
    *,
    name: str = "",
    paired: bool = False,
    address: str | None = None,
) -> TrustedNode:
    """Meet a node; by default at an address of its own (one request per address waits)."""
    return store.met(
        node_id,
        bytes.fromhex(node_id)[:32],
        paired=paired,
        name=name,
        address=address or "http://10.{}.{}.{}:11450".format(*bytes.fromhex(node_id[-6:])),
        code="123456",
        cert="-----BEGIN CERTIFICATE-----\n",
        peer_port=11451,
    ).node


def digits_of(node_id: str) -> str:
    """The short ID's 12 digits, as a person might type them: no tag, no dashes."""
    return short_id(node_id).removeprefix("SHOAL-").replace("-", "")


# -- find: every form a person types --------------------------------------------------


@pytest.fixture
def three(store: TrustStore) -> list[TrustedNode]:
    return [meet(store, random_id(), name=name, paired=True) for name in ("a", "b", "c")]


def test_find_by_the_full_node_id_in_either_case(
    store: TrustStore, three: list[TrustedNode]
) -> None:
    for node in three:
        assert store.find(node.node_id) is node
        assert store.find(node.node_id.upper()) is node


def test_find_by_the_short_id_as_printed_and_as_typed(
    store: TrustStore, three: list[TrustedNode]
) -> None:
    for node in three:
        printed = node.short_id
        assert printed.startswith("SHOAL-") and len(printed) == len("SHOAL-XXXX-XXXX-XXXX")
        bare = printed.removeprefix("SHOAL-")
        for typed in (
            printed,
            printed.lower(),
            printed.title(),
            bare,  # without the tag
            bare.lower(),
            digits_of(node.node_id),  # without the tag or the dashes
            "SHOAL-" + digits_of(node.node_id),
            "shoal" + digits_of(node.node_id).lower(),
            f"  {printed}\n",  # pasted with the line it came from
        ):
            assert store.find(typed) is node, typed


def test_find_by_a_hex_prefix_of_eight_or_more_digits(
    store: TrustStore, three: list[TrustedNode]
) -> None:
    for node in three:
        for length in (8, 12, 40, 63):
            assert store.find(node.node_id[:length]) is node
            assert store.find(node.node_id[:length].upper()) is node
        assert store.find(node.node_id[:7]) is None  # too short to name one node


def test_find_by_name_is_exact(store: TrustStore, three: list[TrustedNode]) -> None:
    assert store.find("a") is three[0]
    assert store.find("  c ") is three[2]
    assert store.find("A") is None  # names are case-sensitive
    assert store.find("ab") is None


def test_ambiguous_keys_name_nothing(store: TrustStore) -> None:
    one = meet(store, random_id("deadbeef"), name="twin")
    two = meet(store, random_id("deadbeef"), name="twin")
    assert store.find("deadbeef") is None  # a prefix of both
    assert store.find("DEADBEEF") is None
    assert store.find("twin") is None  # the name of both
    for node in (one, two):  # each is still reachable by what is its own
        assert store.find(node.node_id) is node
        assert store.find(node.short_id) is node
        assert store.find(node.node_id[:20]) is node


def test_a_node_that_fits_a_key_twice_is_one_match(store: TrustStore) -> None:
    node_id = random_id()
    node = meet(store, node_id, name=node_id[:12])  # its name is its own ID prefix
    assert store.find(node_id[:12]) is node
    other = random_id()
    named = meet(store, other, name=digits_of(other))  # its name is its own short ID
    assert store.find(digits_of(named.node_id)) is named


def test_a_whole_id_outranks_a_prefix_of_another(store: TrustStore) -> None:
    # A key that is both one node's short ID (without tag or dashes) and the first
    # 12 hex digits of another node's ID: the whole ID wins.
    whole = meet(store, id_with_short_digits("ABCDEF234567"), name="whole")
    prefixed = meet(store, random_id("abcdef234567"), name="prefixed")
    assert whole.short_id == "SHOAL-ABCD-EF23-4567"
    assert store.find("ABCDEF234567") is whole
    assert store.find("abcdef234567") is whole
    assert store.find("abcdef2345") is prefixed  # not a short ID: only the prefix fits


def test_a_name_cannot_capture_another_nodes_id(store: TrustStore) -> None:
    """Names are chosen by the other node: one dressed as a victim's ID names nothing."""
    victim = meet(store, random_id(), name="victim")
    disguises = {
        "tagged short ID": victim.short_id,
        "full ID": victim.node_id,
        "bare short ID": digits_of(victim.node_id),
        "dashed short ID": victim.short_id.removeprefix("SHOAL-"),
        "ID prefix": victim.node_id[:12],
    }
    for i, disguise in enumerate(disguises.values()):
        meet(store, random_id(), name=disguise, paired=i % 2 == 0)
    # Written as a whole ID, a key is never read as a name: the victim is found.
    assert store.find(victim.short_id) is victim
    assert store.find(victim.node_id) is victim
    # Forms a name could take: both fit, so neither is chosen.
    for what in ("bare short ID", "dashed short ID", "ID prefix"):
        assert store.find(disguises[what]) is None, what


def test_with_the_real_node_absent_an_id_shaped_name_is_not_found(store: TrustStore) -> None:
    absent = random_id()
    meet(store, random_id(), name=short_id(absent))
    meet(store, random_id(), name=absent)
    assert store.find(short_id(absent)) is None
    assert store.find(absent) is None


@pytest.mark.parametrize(
    "junk",
    [
        "",
        " ",
        "\t\n",
        "-",
        "..",
        "../..",
        "/",
        "SHOAL",
        "SHOAL-",
        "SHOAL-----",
        "SHOAL-7Q2K",  # a fragment of a short ID, as in an old README
        "SHOAL-XXXX-XXXX-XXX",  # one digit short
        "SHOAL-XXXX-XXXX-XXXXX",  # one digit over
        "SHOAL-0000-0000-0000",  # 0 is not a base32 digit
        "0" * 64,  # ID-shaped, nobody's
        "g" * 64,
        "a" * 65,
        "a" * 100_000,
        "x" * 100_000,
        "ａｂｃｄｅｆ１２",  # full-width look-alikes of hex digits
        "%2e%2e",
        "\x00",
    ],
)
def test_junk_names_nothing(store: TrustStore, three: list[TrustedNode], junk: str) -> None:
    meet(store, random_id(), name="")  # a nameless node is not named by ""
    assert store.find(junk) is None


def test_an_empty_store_finds_nothing(store: TrustStore) -> None:
    assert store.find("a") is None
    assert store.find(random_id()) is None


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> TrustStore:
    """One store for every example (Hypothesis runs a test's examples in one call)."""
    made = TrustStore(tmp_path_factory.mktemp("trust") / "trust.json")
    for i in range(6):
        meet(made, random_id(), name=f"node-{i}", paired=True)
    return made


@given(key=st.text(max_size=80))
def test_any_key_finds_nothing_or_a_node_of_the_store(six: TrustStore, key: str) -> None:
    found = six.find(key)
    assert found is None or found in six.nodes()


@given(index=st.integers(0, 5), form=st.sampled_from(["id", "short", "bare", "prefix"]))
def test_every_printed_form_finds_its_node(six: TrustStore, index: int, form: str) -> None:
    node = six.nodes()[index]
    key = {
        "id": node.node_id,
        "short": node.short_id,
        "bare": digits_of(node.node_id).lower(),
        "prefix": node.node_id[:12].upper(),
    }[form]
    assert six.find(key) is node


# -- meeting, deciding, forgetting: kept on disk --------------------------------------


def test_a_met_node_is_saved_with_mode_0600_and_reads_back_the_same(
    store: TrustStore, clock: Clock
) -> None:
    old_umask = os.umask(0)  # a careless umask must not widen the file
    try:
        pending = meet(store, random_id(), name="p")
        clock.now += 1
        paired = meet(store, random_id(), name="q", paired=True)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert [p.name for p in store.path.parent.iterdir()] == ["trust.json"]  # no temp left

    assert (pending.state, paired.state) == (TrustState.PENDING, TrustState.PAIRED)
    assert pending.public_key == bytes.fromhex(pending.node_id).hex()
    assert pending.first_seen == clock.now - 1
    reread = TrustStore(store.path)
    assert reread.nodes() == store.nodes() == [pending, paired]  # oldest first
    assert reread.paired() == [paired]
    assert reread.state(pending.node_id) is TrustState.PENDING
    assert isinstance(reread.state(pending.node_id), TrustState)
    assert reread.get(paired.node_id) == paired
    assert reread.get(random_id()) is None and reread.state(random_id()) is None


def test_meeting_again_updates_what_it_says_and_pairs_only_a_pending_node(
    store: TrustStore,
) -> None:
    node_id = random_id()
    meet(store, node_id, name="old")
    again = store.met(
        node_id, b"k", paired=False, name="new", address="http://10.0.0.8:1",
        code="654321", cert="C", peer_port=2,
    ).node  # fmt: skip
    assert (again.state, again.name, again.address, again.code, again.cert, again.peer_port) == (
        TrustState.PENDING, "new", "http://10.0.0.8:1", "654321", "C", 2,
    )  # fmt: skip
    assert again.public_key == bytes.fromhex(node_id)[:32].hex()  # the pinned key stays
    assert meet(store, node_id, paired=True).state is TrustState.PAIRED  # pending -> paired
    assert meet(store, node_id, paired=False).state is TrustState.PAIRED  # stays paired

    store.set_state(node_id, TrustState.UNPAIRED)
    assert meet(store, node_id, paired=True).state is TrustState.UNPAIRED  # the operator's
    assert TrustStore(store.path).state(node_id) is TrustState.UNPAIRED


def test_set_state_and_forget_are_saved_at_once(store: TrustStore) -> None:
    keep, drop = meet(store, random_id()), meet(store, random_id())
    store.set_state(keep.node_id, TrustState.PAIRED)
    store.forget(drop.node_id)
    store.forget(random_id())  # unknown: nothing to do
    reread = TrustStore(store.path)
    assert [(n.node_id, n.state) for n in reread.nodes()] == [(keep.node_id, TrustState.PAIRED)]
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    with pytest.raises(KeyError):
        store.set_state(drop.node_id, TrustState.PAIRED)


# -- the pending list, as the store applies it ---------------------------------------


def test_a_new_identity_from_the_same_address_takes_the_place_of_the_old(
    store: TrustStore, clock: Clock
) -> None:
    first = meet(store, random_id(), address="http://10.0.0.7:11450")
    clock.now += 1
    second = meet(store, random_id(), address="http://10.0.0.7:11450")
    assert [n.node_id for n in store.nodes()] == [second.node_id]
    assert TrustStore(store.path).get(first.node_id) is None  # saved
    # A paired node at that address is never touched; only pending requests make way.
    paired = meet(store, random_id(), paired=True, address="http://10.0.0.7:11450")
    third = meet(store, random_id(), address="http://10.0.0.7:11450")
    assert {n.node_id for n in store.nodes()} == {paired.node_id, third.node_id}


def test_met_says_which_requests_made_way(store: TrustStore, clock: Clock) -> None:
    old = meet(store, random_id(), address="http://10.0.0.7:11450")
    meeting = store.met(
        random_id(), b"k" * 32, paired=False, name="n", address="http://10.0.0.7:1",
        code="123456", cert="C", peer_port=2,
    )  # fmt: skip
    assert [n.node_id for n in meeting.dropped] == [old.node_id]


def test_one_address_asking_too_fast_is_refused_and_others_are_not(
    store: TrustStore, clock: Clock
) -> None:
    for _ in range(NEW_PER_MINUTE):
        meet(store, random_id(), address="http://10.0.0.66:11450")
    refused = random_id()
    with pytest.raises(PendingFull) as raised:
        meet(store, refused, address="http://10.0.0.66:11450")
    assert 0 < raised.value.retry_after <= 60
    assert store.get(refused) is None and TrustStore(store.path).get(refused) is None
    # Another address is not held back, and neither a paired meeting nor a known node.
    assert meet(store, random_id(), address="http://10.0.0.8:11450").state is TrustState.PENDING
    meet(store, random_id(), paired=True, address="http://10.0.0.66:11450")
    clock.now += 61
    assert meet(store, refused, address="http://10.0.0.66:11450").state is TrustState.PENDING


def test_a_full_list_still_lets_a_new_address_in(store: TrustStore, clock: Clock) -> None:
    flood = []
    for i in range(MAX_PENDING):
        clock.now += 1
        flood.append(meet(store, random_id(), address=f"http://10.0.1.{i}:11450"))
    clock.now += 1
    real = meet(store, random_id(), address="http://10.0.0.9:11450")
    pending = [n.node_id for n in store.nodes() if n.state is TrustState.PENDING]
    assert len(pending) == MAX_PENDING and real.node_id in pending
    assert flood[0].node_id not in pending  # the oldest made way
    decided = store.get(pending[0])
    assert decided is not None
    store.set_state(decided.node_id, TrustState.UNPAIRED)  # the operator declines one
    assert meet(store, random_id()).state is TrustState.PENDING


# -- the file: edited from outside, or broken -----------------------------------------


def bump_mtime(path: Path) -> None:
    """Some file systems keep whole seconds: make an outside edit visible as one."""
    stamp = path.stat().st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(stamp, stamp))


def test_reload_picks_up_an_outside_edit_once(store: TrustStore) -> None:
    node = meet(store, random_id(), name="n")
    assert store.reload() is False  # its own save is no news

    cli = TrustStore(store.path)  # what `shoal pair` or a hand edit does meanwhile
    cli.set_state(node.node_id, TrustState.PAIRED)
    bump_mtime(store.path)
    assert store.reload() is True
    assert store.state(node.node_id) is TrustState.PAIRED
    assert store.reload() is False

    document = json.loads(store.path.read_text())
    document["nodes"][0]["name"] = "renamed"
    store.path.write_text(json.dumps(document))
    bump_mtime(store.path)
    assert store.reload() is True
    assert store.find("renamed") == store.get(node.node_id)


def test_a_missing_file_is_an_empty_store(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "nowhere" / "trust.json")
    assert store.nodes() == [] and store.reload() is False
    assert not store.path.exists()  # reading creates nothing


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        "{}",
        '{"nodes": 3}',
        '{"nodes": [{"node_id": "ab"}]}',
        '{"nodes": [{"node_id": "ab", "public_key": "", "state": "trusted"}]}',
        '{"nodes": [{"node_id": "ab", "public_key": "", "state": "paired", "extra": 1}]}',
    ],
)
def test_a_corrupt_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "trust.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="not a valid trust store") as raised:
        TrustStore(path)
    assert str(path) in str(raised.value)


def test_corruption_while_running_keeps_what_was_known(store: TrustStore) -> None:
    node = meet(store, random_id(), name="n")
    store.path.write_text("{truncated")
    bump_mtime(store.path)
    with pytest.raises(ConfigError):
        store.reload()
    assert store.get(node.node_id) == node
