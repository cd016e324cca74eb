"""REFs for `shoal models pull`: their grammar, checked before any request is made, and
which of a repo's files a REF means. Pure: values in, values (or a ClientError) out.

    org/repo:q4_k_m          the repo's one GGUF of that quantization (all the parts of
                             a split one), whatever the case
    org/repo/dir/file.gguf   that file
    org/repo                 the repo's one GGUF, if it has only one

A REF first passes the check every model name passes (`names.check_name`: ASCII letters,
digits and `. _ - : / @ +` only, so no NUL, control, space, backslash or look-alike
Unicode; no `..`, no leading `/`, no part starting with `.`), then this grammar. The
names and hashes the Hub sends back become paths in the store, so they pass the same
rules (`valid_filename`). A file's quantization is the one the catalog names it by
(`names.split_stem`), so `org/repo:q4_k_m` pulls what the catalog then calls `…:q4_k_m`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.errors import InvalidRequest, ModelNotFound
from shoal.models.names import SHARD_SUFFIX, check_name, split_stem

DEFAULT_REVISION = "main"

# The Hub's rules for a repo's owner and name (huggingface_hub's validate_repo_id), in
# ASCII: at most 96 characters, no "--" (it separates the parts of the store's folder
# names, `models--org--repo`).
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,47}")
# One folder or file name inside a repo (and one part of a revision): no leading dot,
# so no ".", "..", or hidden file.
_SEGMENT = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}")
COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class HubRef:
    """What to pull: a repo and either a quantization, a file, or neither (its one GGUF)."""

    repo_id: str
    quant: str | None = None
    filename: str | None = None

    def __str__(self) -> str:
        if self.quant is not None:
            return f"{self.repo_id}:{self.quant}"
        return self.repo_id if self.filename is None else f"{self.repo_id}/{self.filename}"


def parse_ref(text: object) -> HubRef:
    """`org/repo:quant`, `org/repo/path/file.gguf` or `org/repo`, or InvalidRequest."""
    ref = check_name(text, param="model")
    if ":" in ref:
        repo, _, quant = ref.partition(":")
        if not _QUANT.fullmatch(quant):
            raise InvalidRequest(
                f"{ref!r}: a quantization is letters, digits and '_' (e.g. q4_k_m)",
                param="model",
            )
        return HubRef(_repo_id(repo, ref), quant=quant)
    parts = ref.split("/")
    if len(parts) <= 2:
        return HubRef(_repo_id(ref, ref))
    filename = "/".join(parts[2:])
    if not valid_filename(filename) or not filename.lower().endswith(".gguf"):
        raise InvalidRequest(
            f"{ref!r}: a file is a path in the repo ending in .gguf, each part letters, "
            "digits, '.', '_', '+', '-' and not starting with '.'",
            param="model",
        )
    return HubRef(_repo_id("/".join(parts[:2]), ref), filename=filename)


def _repo_id(text: str, ref: str) -> str:
    parts = text.split("/")
    if (
        len(text) > 96
        or len(parts) != 2
        or not all(_REPO_PART.fullmatch(p) and "--" not in p for p in parts)
    ):
        raise InvalidRequest(
            f"{ref!r} does not start with a Hub repo (owner/name: letters, digits, '-', '_', '.')",
            param="model",
        )
    return text


def valid_filename(name: str) -> bool:
    """A path inside a repo that is safe to make a path of in the store."""
    parts = name.split("/")
    return 0 < len(parts) <= 16 and all(_SEGMENT.fullmatch(p) for p in parts)


def check_revision(text: object) -> str:
    """A branch, tag or commit (default main), safe to name a file under `refs/` with."""
    if text is None:
        return DEFAULT_REVISION
    if (
        not isinstance(text, str)
        or not 0 < len(text) <= 255
        or ".." in text
        or not all(_SEGMENT.fullmatch(p) for p in text.split("/"))
    ):
        raise InvalidRequest(
            f"revision {text!r} is not a branch, tag or commit name (ASCII letters, digits, "
            "'.', '_', '+', '-', parts joined by '/')",
            param="revision",
        )
    return text


# -- which files -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HubFile:
    filename: str
    size: int
    sha256: str | None  # the LFS SHA-256: every GGUF on the Hub is in LFS
    blob_id: str | None = None  # git's object ID: the blob's name for a file not in LFS

    @property
    def etag(self) -> str:
        """The blob's name in the store, and what the download must hash to."""
        name = self.sha256 or self.blob_id
        assert name is not None
        return name


def quant_of(filename: str) -> str | None:
    """The quantization a GGUF's name gives (`Q4_K_M`), as the catalog reads it."""
    return split_stem(filename.rsplit("/", 1)[-1])[1]


def _part(filename: str) -> tuple[int, int]:
    """`Model-Q4_K_M-00002-of-00003.gguf` -> (2, 3); an unsplit file is (1, 1)."""
    split = SHARD_SUFFIX.search(filename[: -len(".gguf")])
    return (1, 1) if split is None else (int(split["no"]), int(split["count"]))


def _models(files: Sequence[HubFile]) -> dict[str, list[HubFile]]:
    """The repo's models by stem: one GGUF, or the parts of one split GGUF. Vision
    projectors (`mmproj-…`) go with a model; they are not one."""
    models: dict[str, list[HubFile]] = {}
    for f in files:
        base = f.filename.rsplit("/", 1)[-1].lower()
        if base.endswith(".gguf") and not base.startswith("mmproj"):
            stem = SHARD_SUFFIX.sub("", f.filename[: -len(".gguf")])
            models.setdefault(stem, []).append(f)
    return models


def choose_files(ref: HubRef, files: Sequence[HubFile]) -> tuple[HubFile, ...]:
    """The files `ref` means among a repo's: one GGUF, or every part of a split one."""
    if ref.filename is not None:
        for f in files:
            if f.filename == ref.filename:
                return (f,)
        raise ModelNotFound(f"{ref.repo_id} has no file {ref.filename}; {_listing(ref, files)}")
    models = _models(files)
    if ref.quant is not None:
        wanted = ref.quant.upper()
        models = {s: parts for s, parts in models.items() if quant_of(parts[0].filename) == wanted}
    if not models:
        raise ModelNotFound(f"{ref} matches no GGUF; {_listing(ref, files)}")
    if len(models) > 1:
        raise InvalidRequest(
            f"{ref} matches {len(models)} models; name one: {_names(ref.repo_id, models)}",
            param="model",
            code="ambiguous_model_ref",
        )
    (stem, parts), *_ = models.items()
    by_part = {_part(f.filename): f for f in parts}
    count = _part(parts[0].filename)[1]
    wanted_parts = [(i, count) for i in range(1, count + 1)]
    if len(parts) != count or any(p not in by_part for p in wanted_parts):
        raise ModelNotFound(f"{ref}: the split GGUF {stem} is missing parts on the Hub")
    return tuple(by_part[p] for p in wanted_parts)


def _listing(ref: HubRef, files: Sequence[HubFile]) -> str:
    models = _models(files)
    return f"it has: {_names(ref.repo_id, models)}" if models else "it holds no GGUF at all"


def _names(repo_id: str, models: dict[str, list[HubFile]]) -> str:
    """What a person can type for each model: `org/repo:quant` where that names one
    model alone, else `org/repo/file.gguf`."""
    first = [parts[0].filename for parts in models.values()]
    quants = [quant_of(name) for name in first]
    return ", ".join(
        sorted(
            f"{repo_id}:{quant.lower()}"
            if quant is not None and quants.count(quant) == 1
            else f"{repo_id}/{name}"
            for name, quant in zip(first, quants, strict=True)
        )
    )
