"""Cache affinity: which target last served a prompt's prefix, so its KV cache is reused.

Theory of operation (issue 13, item 4): an engine keeps the KV cache of the prompts it
has just read (llama-server's `cache_prompt`, on by default, with its slots and host-RAM
prompt cache; vLLM's prefix caching; Ollama per loaded model), and reads again only the
part of a new prompt past the longest prefix it still holds. Turn N of a conversation
repeats turn N-1's prompt and answer, then adds a question: sent to the node that served
turn N-1, only the new tail is read; sent elsewhere, all of it is (a long system prompt
or a document: seconds on a CPU).

So a request's prompt is cut into prefix `Keys`, cheaply and only when there is a
choice of target (`Prompt.keys`): hashes of its last few message prefixes (of a
completion's text, a chain over fixed blocks), scoped by model. After a target
takes the request, `AffinityTable.record` remembers that target for the key of the
whole prompt (the next turn's prefix) and for its system prompt; before routing,
`AffinityTable.lookup` finds the longest prefix some target served recently. The
router then prefers that target only while it has a free slot (`rank.prefer`):
affinity never queues a request behind a busy node, it falls back to the strategy's
order. Prompts shorter than `MIN_CHARS` get no affinity: reading them again costs
little, and steering them would only skew the load.

Memory is bounded by count: entries hold hashes and a reference to a target's key,
never prompt text, so each costs about the same (~200 bytes); `MAX_ENTRIES` of them are
a few MB at most. An entry expires `TTL_S` after it was last recorded, the time an idle
engine is likely to still hold the cache. Everything here is pure: time is a parameter.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from itertools import accumulate
from operator import attrgetter
from typing import NamedTuple, Protocol

# About 256 tokens: the shorter a prompt, the less its cache saves (the question and
# the answer are read anyway), while steering it still skews the load.
MIN_CHARS = 1024
# A completion's text is keyed at every BLOCK_CHARS characters: the next call's prompt
# (this one + its answer + more) shares these boundaries; ~256 tokens of the tail are
# not keyed, which costs nothing since the engine matches tokens, not our keys.
BLOCK_CHARS = 1024
# Prefixes looked up per request, longest first: the previous turn's prompt is two
# messages back (the answer, the new question; a tool call, its result), three after
# two parallel tool calls. Each costs a hash and a lookup on the request path.
MAX_LOOKUPS = 4
# Ollama's keep_alive and Shoal's models.keep_alive_s (5 minutes): an engine idle longer
# may have unloaded the model, and its cache with it; a conversation's next turn
# refreshes the entry.
TTL_S = 300.0
# ~200 bytes each (an int key, a tuple, a float; the target's key is shared): ~2 MB.
MAX_ENTRIES = 10_000

_SYSTEM_ROLES = frozenset({"system", "developer"})
_ONLY_STR = {str}
_CONTENT = attrgetter("content")


class Part(Protocol):
    """A content part of a chat message: text parts have a `text` too."""

    @property
    def type(self) -> str: ...


class Message(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str | Sequence[Part] | None: ...


class Keys(NamedTuple):  # tuples and lists: made on the request path, where µs count
    """A prompt's prefix keys: what to look up, and what to record once it is served."""

    lookup: list[int]  # the longest prefix first; the whole prompt first of all
    record: list[int]  # the whole prompt (the next turn's prefix), its system prompt


class Prompt(NamedTuple):
    """A request's prompt as the handler parsed it; keyed only when there is a choice of
    target (most requests have one), by `keys`."""

    model: str
    messages: Sequence[Message] | None = None  # a chat's
    text: str | None = None  # a completion's

    def keys(self) -> Keys | None:
        """The prompt's keys; None for a short prompt, or one there is no keying of."""
        if self.messages is not None:
            return conversation_keys(self.model, self.messages)
        if self.text is not None:
            return text_keys(self.model, self.text)
        return None


def conversation_keys(model: str, messages: Sequence[Message]) -> Keys | None:
    """Keys of a chat: one for the conversation up to each of its last messages.

    The previous turn's request, the conversation up to its last question, is one of
    the last few prefixes. A message counts by its text (other parts by their type;
    roles and other fields not at all): a collision only makes a cache miss, never a
    wrong answer. The loops over messages are C's (map, accumulate, tuple hashing; a
    text is hashed once, then its hash is cached): this runs on the request path.
    """
    texts = tuple(map(_CONTENT, messages))
    if set(map(type, texts)) != _ONLY_STR:  # some content is None, or parts: seldom
        texts = tuple(map(_text, texts))
    lengths = list(accumulate(map(len, texts)))
    if lengths[-1] < MIN_CHARS:
        return None
    count = len(texts)
    long_from = bisect_left(lengths, MIN_CHARS)  # the first prefix long enough to key
    first = max(long_from, count - MAX_LOOKUPS)
    lookup = [hash((model, texts[:end])) for end in range(count, first, -1)]
    record = [lookup[0]]
    system_end = 0  # leading system/developer messages
    while system_end < count and messages[system_end].role in _SYSTEM_ROLES:
        system_end += 1
    if long_from < system_end < count:  # a long system prompt, and more after it
        system_key = hash((model, texts[:system_end]))  # what new conversations look up
        record.append(system_key)
        if system_end <= first:
            lookup.append(system_key)
    return Keys(lookup, record)


def _text(content: str | Sequence[Part] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join([getattr(part, "text", None) or part.type for part in content])


def text_keys(model: str, text: str) -> Keys | None:
    """Keys of a completion's text: the whole text, and a chain over its full blocks."""
    if len(text) < MIN_CHARS:
        return None
    chain = hash(model)
    blocks: list[int] = []
    for start in range(0, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
        chain = hash((chain, text[start : start + BLOCK_CHARS]))
        blocks.append(chain)
    whole = hash((model, text))  # an exact repeat; its own construction, never a block's
    return Keys([whole, *blocks[: -MAX_LOOKUPS - 1 : -1]], [whole, blocks[-1]])


class AffinityTable:
    """Which target served which prefix key recently: an LRU, bounded, with a TTL.

    Entries are kept in the order they were last recorded; with one TTL for all, that is
    also the order they expire in, so expired ones are dropped from the front as new
    ones come, and the oldest one goes when the table is full.
    """

    def __init__(self, *, max_entries: int = MAX_ENTRIES, ttl_s: float = TTL_S) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("an affinity table needs max_entries >= 1 and ttl_s > 0")
        self._max = max_entries
        self._ttl_s = ttl_s
        self._entries: OrderedDict[int, tuple[str, float]] = OrderedDict()  # → target, expiry
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: Sequence[int], now: float) -> str | None:
        """The target that last served the first of `keys` (the longest) known, or None."""
        entries = self._entries
        for key in keys:
            entry = entries.get(key)
            if entry is not None:
                target, expires = entry
                if now < expires:
                    self.hits += 1
                    return target
                del entries[key]
        self.misses += 1
        return None

    def record(self, keys: Sequence[int], target: str, now: float) -> None:
        """`target` has just taken a request whose prompt has these keys."""
        entries = self._entries
        expires = now + self._ttl_s
        for key in keys:
            entries[key] = (target, expires)
            entries.move_to_end(key)
        while entries:
            oldest = next(iter(entries.values()))
            if len(entries) <= self._max and oldest[1] > now:
                break
            entries.popitem(last=False)

    def statistics(self) -> dict[str, int]:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}
