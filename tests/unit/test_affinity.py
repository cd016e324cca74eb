"""`shoal.routing.affinity` and `rank.prefer`: prefix keys of a prompt, the bounded table
of who served them, and the preference for that target only while it has a free slot."""

from __future__ import annotations

import tracemalloc
from typing import Any

import orjson
import pytest

from shoal.api.requests import ChatRequest, parse
from shoal.routing.affinity import (
    BLOCK_CHARS,
    MAX_LOOKUPS,
    MIN_CHARS,
    AffinityTable,
    Keys,
    Prompt,
    conversation_keys,
    text_keys,
)
from shoal.routing.rank import Candidate, hop_policy, prefer

SYSTEM = "You are a careful assistant for the lighthouse logbook. " * 40  # ~2.2k chars
MODEL = "smollm2"


def chat(*messages: tuple[str, Any], model: str = MODEL) -> ChatRequest:
    """A chat as the API parses it: the keys are computed from these very objects."""
    body = {"model": model, "messages": [{"role": r, "content": c} for r, c in messages]}
    return parse(ChatRequest, orjson.dumps(body))


def keys_of(request: ChatRequest) -> Keys:
    keys = conversation_keys(request.model, request.messages)
    assert keys is not None
    return keys


def turns(n: int, system: str = SYSTEM) -> list[tuple[str, Any]]:
    """A conversation's messages through turn n's question."""
    messages: list[tuple[str, Any]] = [("system", system)]
    for i in range(1, n + 1):
        if i > 1:
            messages.append(("assistant", f"answer {i - 1}"))
        messages.append(("user", f"question {i}"))
    return messages


# -- keys ----------------------------------------------------------------------------


def test_the_next_turn_finds_the_key_the_last_turn_recorded() -> None:
    for n in range(1, 6):
        before, after = keys_of(chat(*turns(n))), keys_of(chat(*turns(n + 1)))
        assert before.record[0] in after.lookup
        # ... and it is the longest prefix after the whole prompt (a regenerate).
        assert after.lookup.index(before.record[0]) == 2


def test_the_whole_prompt_comes_first_so_a_regenerate_finds_its_node() -> None:
    keys = keys_of(chat(*turns(3)))
    assert keys.lookup[0] == keys.record[0]


def test_keys_depend_on_the_model_and_on_every_earlier_message() -> None:
    base = keys_of(chat(*turns(3)))
    assert not set(base.lookup) & set(keys_of(chat(*turns(3), model="other")).lookup)
    edited = turns(3)
    edited[1] = ("user", "a different first question")
    assert not set(base.record) & set(keys_of(chat(*edited)).lookup[:-1])  # but the system


def test_a_long_system_prompt_is_recorded_and_looked_up_by_new_conversations() -> None:
    first = keys_of(chat(("system", SYSTEM), ("user", "hello")))
    other = keys_of(chat(("system", SYSTEM), ("user", "something else entirely")))
    assert len(first.record) == 2
    assert first.record[1] == other.lookup[-1]  # the shortest prefix: the system prompt


def test_the_system_prompt_is_looked_up_even_deep_into_a_conversation() -> None:
    keys = keys_of(chat(*turns(20)))
    assert len(keys.lookup) == MAX_LOOKUPS + 1
    assert keys.lookup[-1] == keys_of(chat(("system", SYSTEM), ("user", "x"))).record[1]


def test_short_prompts_get_no_keys_and_short_prefixes_are_not_keyed() -> None:
    assert conversation_keys(MODEL, chat(*turns(4, system="Be brief.")).messages) is None
    # Long only from its third message: the first two prefixes are not keyed.
    request = chat(("user", "hi"), ("assistant", "hello"), ("user", "x" * MIN_CHARS))
    keys = keys_of(request)
    assert len(keys.lookup) == 1 and keys.record == keys.lookup
    # A short system prompt is not recorded on its own.
    assert len(keys_of(chat(("system", "Be brief."), ("user", "y" * MIN_CHARS))).record) == 1


def test_content_parts_key_like_the_same_text() -> None:
    parts = [{"type": "text", "text": SYSTEM}, {"type": "image_url", "image_url": {"url": "x"}}]
    keys = keys_of(chat(("user", parts)))
    assert keys == keys_of(chat(("user", parts)))
    assert keys != keys_of(chat(("user", SYSTEM)))


def test_a_completion_extended_by_its_answer_finds_the_last_full_block() -> None:
    text = "Once upon a time " * 200  # 3400 chars: three full blocks
    keys = text_keys(MODEL, text)
    assert keys is not None
    longer = text_keys(MODEL, text + " and then the keeper said: " + "more " * 100)
    assert longer is not None
    assert keys.record[1] in longer.lookup  # the block boundary both share
    assert keys.record[0] == keys.lookup[0]  # the whole text: an exact repeat
    assert text_keys(MODEL, "x" * (MIN_CHARS - 1)) is None
    assert len(keys.lookup) == 1 + len(text) // BLOCK_CHARS


def test_a_prompt_is_keyed_only_when_asked() -> None:
    calls = 0

    class Counting:
        role = "user"

        @property
        def content(self) -> str:
            nonlocal calls
            calls += 1
            return SYSTEM

    prompt = Prompt(MODEL, messages=[Counting()])
    assert calls == 0
    assert prompt.keys() == prompt.keys()
    assert calls == 2
    assert Prompt(MODEL).keys() is None
    assert Prompt(MODEL, text=SYSTEM).keys() == text_keys(MODEL, SYSTEM)


def test_a_forwarded_request_carries_no_prompt() -> None:
    prompt = Prompt(MODEL, text=SYSTEM)
    assert hop_policy({}, prompt).prompt is prompt
    assert hop_policy({"X-Shoal-Hop": "1"}, prompt).prompt is None


# -- the table -------------------------------------------------------------------------


def test_lookup_returns_the_target_of_the_longest_known_prefix() -> None:
    table = AffinityTable()
    table.record((1,), "a", now=0)
    table.record((2,), "b", now=0)
    assert table.lookup((3, 2, 1), now=1) == "b"
    assert table.lookup((3, 1, 2), now=1) == "a"
    assert table.lookup((3, 4), now=1) is None
    assert table.statistics() == {"entries": 2, "hits": 2, "misses": 1}


def test_a_later_record_moves_the_prefix_to_its_new_target() -> None:
    table = AffinityTable()
    table.record((1,), "a", now=0)
    table.record((1,), "b", now=1)
    assert table.lookup((1,), now=2) == "b"
    assert len(table) == 1


def test_entries_expire_after_the_ttl_counted_from_their_last_record() -> None:
    table = AffinityTable(ttl_s=10)
    table.record((1,), "a", now=0)
    table.record((2,), "a", now=5)
    assert table.lookup((1,), now=9.9) == "a"
    assert table.lookup((1,), now=10) is None
    assert table.lookup((2,), now=14.9) == "a"
    table.record((2,), "a", now=14)  # refreshed by the next turn
    assert table.lookup((2,), now=20) == "a"
    table.record((3,), "b", now=30)  # expired entries are dropped as new ones come
    assert len(table) == 1


def test_the_table_keeps_at_most_max_entries_dropping_the_least_recently_recorded() -> None:
    table = AffinityTable(max_entries=3)
    for key in range(5):
        table.record((key,), f"t{key}", now=key)
    assert len(table) == 3
    assert [table.lookup((k,), now=5) for k in range(5)] == [None, None, "t2", "t3", "t4"]
    table.record((2,), "t2", now=6)  # recorded again: now the most recent
    table.record((9,), "t9", now=7)
    assert table.lookup((3,), now=8) is None
    assert table.lookup((2,), now=8) == "t2"


def test_a_full_table_costs_a_few_megabytes_whatever_the_prompts() -> None:
    targets = [f"peer-{i}" for i in range(4)]
    tracemalloc.start()
    try:
        table = AffinityTable(max_entries=10_000)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            keys = keys_of(chat(("system", SYSTEM), ("user", f"question {i}")))
            table.record(keys.record, targets[i % 4], now=i / 1000)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(table) == 10_000
    assert used < 3_000_000


def test_a_table_refuses_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        AffinityTable(max_entries=0)
    with pytest.raises(ValueError, match="ttl_s"):
        AffinityTable(ttl_s=0)


# -- the preference ----------------------------------------------------------------------


def cand(key: str, *, in_flight: int = 0, capacity: int = 2, loaded: bool = True) -> Candidate:
    return Candidate(key, key, False, loaded, in_flight, capacity)


def test_the_affine_candidate_goes_first_while_it_has_a_free_slot() -> None:
    order = [cand("a"), cand("b", in_flight=1), cand("c")]
    assert [c.key for c in prefer(order, "b")] == ["b", "a", "c"]


def test_a_busy_affine_candidate_keeps_its_place() -> None:
    order = [cand("a"), cand("b", in_flight=2)]
    assert prefer(order, "b") == order


def test_an_affine_candidate_that_unloaded_the_model_keeps_its_place() -> None:
    order = [cand("a"), cand("b", loaded=False)]
    assert prefer(order, "b") == order


def test_an_affine_target_that_is_not_a_candidate_changes_nothing() -> None:
    order = [cand("a"), cand("b")]
    assert prefer(order, "gone") == order
    assert prefer(order, "a") == order
