"""Model names: the one check every name passes where it enters, and the names the
catalog gives the files it finds. Pure: no I/O.

A name is never turned into a path. The catalog maps names to the paths it found; the
check below is what keeps a hostile name (from a client, a config file or a peer) from
even looking like one, and from impersonating another model with look-alike letters:

- 1 to 256 characters of ASCII letters, digits and `. _ - : / @ +`; anything else
  (whitespace, NUL, control characters, a backslash, non-ASCII) is refused, with the
  problem named. ASCII only is what makes confusables impossible (a Cyrillic `а` for a
  Latin `a`); every name in this field is ASCII (Ollama's, the Hub's repo IDs, GGUF
  file names);
- no `..` anywhere, no leading `/` or `-`, no empty part (`//`, a trailing `/`), no
  part that starts with `.`.

Names the catalog gives (see `short_name`): the file's stem, lowercased, with the
quantization as a tag, `SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct:q4_1`
(also `-Q4_K_M`, `_q8_0`); a Hub file is also `org/repo/file.gguf`; an Ollama model keeps
its Ollama name (`qwen2.5:0.5b`, or `ns/name:tag` outside `library`). Two different files
that would share a name are told apart by `disambiguate`.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import Set as AbstractSet

from shoal.errors import InvalidRequest

MAX_NAME_CHARS = 256
# `@` is LM Studio's variant separator, `+` appears in some Hub file names.
_ALLOWED = frozenset(string.ascii_letters + string.digits + "._-:/@+")
_ALLOWED_TEXT = "letters, digits and . _ - : / @ +"
# Leaves room under MAX_NAME_CHARS for a disambiguating suffix.
_MAX_BASE_CHARS = 160


class InvalidModelName(InvalidRequest, ValueError):
    """A model name that fails `check_name`: a 400 at the API, a ValueError elsewhere."""

    code = "invalid_value"

    def __init__(self, name: object, problem: str, *, param: str = "model") -> None:
        super().__init__(f"invalid model name {_shown(name)}: {problem}", param=param)
        self.problem = problem


def check_name(name: object, *, param: str = "model") -> str:
    """`name` itself if it is an acceptable model name, else `InvalidModelName`."""
    problem = name_problem(name)
    if problem is not None:
        raise InvalidModelName(name, problem, param=param)
    assert isinstance(name, str)
    return name


def name_problem(name: object) -> str | None:
    """What is wrong with `name`, in words, or None if it is acceptable."""
    if not isinstance(name, str):
        return f"a model name is a string, not {type(name).__name__}"
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"it is {len(name)} characters long; the limit is {MAX_NAME_CHARS}"
    for char in name:
        if char == "\x00":
            return "it contains a NUL character"
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            return f"it contains the control character U+{ord(char):04X}"
        if char == "\\":
            return "it contains a backslash"
    if unicodedata.normalize("NFC", name) != name:
        return "it is not in Unicode normal form NFC"
    for char in name:
        if not char.isascii():
            return (
                f"it contains the non-ASCII character U+{ord(char):04X} "
                f"({unicodedata.name(char, 'unnamed')}); model names are ASCII, so that a "
                "look-alike letter cannot stand for another model"
            )
        if char.isspace():
            return "it contains whitespace"
        if char not in _ALLOWED:
            return f"it contains {char!r}; a model name has only {_ALLOWED_TEXT}"
    if name.startswith("/"):
        return "it starts with '/'; a model name is not a path"
    if name.startswith("-"):
        return "it starts with '-'"
    if ".." in name:
        return "it contains '..'"
    parts = name.split("/")
    if "" in parts:
        return "it has an empty part between '/' (a '//' or a trailing '/')"
    if any(part.startswith(".") for part in parts):
        return "a part of it starts with '.'"
    return None


def is_valid_name(name: object) -> bool:
    return name_problem(name) is None


def lookup_key(name: str) -> str:
    """Names are matched without regard to case: `SmolLM2…:Q4_1` finds `smollm2…:q4_1`."""
    return name.lower()


# --- the names the catalog gives ---------------------------------------------------------

_GGUF_SUFFIX = re.compile(r"\.gguf$", re.IGNORECASE)
# `model-00001-of-00003.gguf`: llama.cpp's split files; the first one names the model.
SHARD_SUFFIX = re.compile(r"-(?P<no>\d{5})-of-(?P<count>\d{5})$")
# The quantization at the end of a stem, after `.`, `-` or `_`: Q4_K_M, IQ2_XXS, Q8_0,
# TQ1_0, MXFP4_MOE, F16, BF16, F32.
_QUANT_SUFFIX = re.compile(
    r"[-._](?P<quant>(?:I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|MXFP4(?:_MOE)?|B?F16|F32|FP16|FP32))$",
    re.IGNORECASE,
)
# Stems that say nothing about the model: the folder (or repo) names it instead.
_GENERIC_STEMS = frozenset({"model", "ggml-model", "gguf", "weights", "consolidated"})
_REPO_GGUF_SUFFIX = re.compile(r"[-_.]gguf$", re.IGNORECASE)


def split_stem(filename: str) -> tuple[str, str | None]:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> (`SmolLM2-135M-Instruct`, `Q4_1`)."""
    stem = _GGUF_SUFFIX.sub("", filename)
    stem = SHARD_SUFFIX.sub("", stem)
    match = _QUANT_SUFFIX.search(stem)
    if match is None or match.start() == 0:
        return stem, None
    return stem[: match.start()], match.group("quant").upper()


def short_name(filename: str, *, quantization: str | None = None, folder: str | None = None) -> str:
    """The name a person types for a GGUF file, always acceptable to `check_name`.

    The quantization in the file name wins over the header's (`quantization`), which is
    used when the name has none. A generic stem (`model.gguf`) is named after `folder`
    (its folder or repo, without a `-GGUF` suffix).
    """
    base, quant = split_stem(filename)
    if base.lower() in _GENERIC_STEMS and folder:
        base = _REPO_GGUF_SUFFIX.sub("", folder) or base
    base = _slug(base, "._-")[:_MAX_BASE_CHARS].strip("._-") or "model"
    tag = _slug(quant or quantization or "", "._")
    return f"{base}:{tag}" if tag else base


def ollama_name(host: str, namespace: str, model: str, tag: str) -> str | None:
    """Ollama's own name for a model in its store, as `ollama list` shows it, lowercased.

    None when the parts do not make an acceptable name (a hostile or odd manifest path).
    """
    if host == "registry.ollama.ai":
        path = model if namespace == "library" else f"{namespace}/{model}"
    else:
        path = f"{host}/{namespace}/{model}"
    name = f"{path}:{tag}".lower()
    return name if is_valid_name(name) and name.count(":") == 1 else None


def full_name(repo_id: str, relative: str) -> str | None:
    """`org/repo/file.gguf` for a Hub file, case kept; None if it is not acceptable."""
    name = f"{repo_id}/{relative}"
    return name if is_valid_name(name) else None


def disambiguate(wanted: str, taken: AbstractSet[str], tiebreak: str) -> str:
    """`wanted`, or when it is taken, a name told apart by a short stable hash.

    `taken` holds the names already given, as `lookup_key`s. `tiebreak` is the file's
    SHA-256 when known (the same on every node) or its path.
    `smollm2:q4_1` taken -> `smollm2-1a2b3c4d:q4_1`, then `-1a2b3c4d-2`, `-3`, ...
    """
    if lookup_key(wanted) not in taken:
        return wanted
    digest = tiebreak if re.fullmatch(r"[0-9a-f]{64}", tiebreak) else _sha256_text(tiebreak)
    base, colon, tag = wanted.rpartition(":")
    if not colon:
        base, tag = wanted, ""
    suffix = f"-{digest[:8]}"
    number = 1
    while True:
        room = MAX_NAME_CHARS - len(suffix) - len(colon) - len(tag)
        candidate = f"{base[:room].rstrip('/')}{suffix}{colon}{tag}"
        if lookup_key(candidate) not in taken:
            return candidate
        number += 1
        suffix = f"-{digest[:8]}-{number}"


def _slug(text: str, keep: str) -> str:
    """Lowercase ASCII letters, digits and `keep`; anything else becomes one `-`."""
    out: list[str] = []
    for char in unicodedata.normalize("NFKD", text).lower():
        if char.isascii() and (char.isalnum() or char in keep):
            out.append(char)
        elif not out or out[-1] != "-":
            out.append("-")
    slug = "".join(out)
    while ".." in slug:
        slug = slug.replace("..", ".")
    return slug.strip("-.")


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _shown(name: object) -> str:
    """The name in an error message: escaped, so that it cannot drive a terminal."""
    if not isinstance(name, str):
        return f"({type(name).__name__})"
    shown = ascii(name[:80])
    return shown if len(name) <= 80 else shown[:-1] + "…'"
