"""Real GGUFs, and the stores they lie in, for tests.

- `packaged_gguf()`: the SmolLM2-135M-Instruct Q4_1 the embedded engine ships (~100 MB).
- `requantized_gguf()`: a second, distinct real model: the same weights re-quantized to
  Q8_0 by llama.cpp (~145 MB), made once and kept under ~/.cache/shoal/test-models
  (or SHOAL_TEST_MODELS_CACHE), keyed by the packaged file's size and mtime.
- `tiny_gguf()`: a header-only GGUF written by the `gguf` package, for tests that need
  many files or a particular header and never load the model.
- `hf_store`, `ollama_store`, `lmstudio_folder`: lay those stores out in a tmp dir the
  way Hugging Face, Ollama and LM Studio do, linking the GGUFs rather than copying them
  (a hard link where the file system allows, else a symbolic link).

The linked files are the real ones: a test must never write to them. A test that needs
a damaged or changed file copies it first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from shoal.engine.assets import default_chat_model

# Read once, at import: tests that move HOME must not make the cache move with it.
CACHE_DIR = Path(
    os.environ.get("SHOAL_TEST_MODELS_CACHE") or Path.home() / ".cache" / "shoal" / "test-models"
)
PACKAGED_NAME = "smollm2-135m-instruct:q4_1"
REQUANTIZED_FILE = "SmolLM2-135M-Instruct-Q8_0.gguf"
REQUANTIZED_NAME = "smollm2-135m-instruct:q8_0"
REVISION = "0123456789abcdef0123456789abcdef01234567"

# In a child process: llama.cpp prints a line per tensor, and its native code stays out
# of the test process.
_REQUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
params.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(
    sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def packaged_gguf() -> Path:
    return default_chat_model()


def requantized_gguf() -> Path:
    """The packaged SmolLM2 re-quantized to Q8_0: a real model with other bytes."""
    source = packaged_gguf()
    status = source.stat()
    target = CACHE_DIR / f"{status.st_size}-{status.st_mtime_ns}" / REQUANTIZED_FILE
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / ".lock"):
        if not target.exists():  # another process made it while this one waited
            partial = target.with_name(target.name + ".partial")
            subprocess.run(
                [sys.executable, "-c", _REQUANTIZE, str(source), str(partial)],
                check=True,
                capture_output=True,
                timeout=600,
            )
            os.replace(partial, target)
    return target


def sha256_of(path: Path) -> str:
    """The file's SHA-256, cached beside the test models for the big ones."""
    status = path.stat()
    if status.st_size < 1 << 20:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    key = hashlib.sha256(f"{path.resolve()}:{status.st_size}:{status.st_mtime_ns}".encode())
    cached = CACHE_DIR / "sha256" / key.hexdigest()
    try:
        return cached.read_text().strip()
    except FileNotFoundError:
        pass
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}")
    partial.write_text(digest.hexdigest())
    os.replace(partial, cached)
    return digest.hexdigest()


def tiny_gguf(
    path: Path,
    *,
    architecture: str = "llama",
    file_type: int | None = 15,  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    context_length: int = 2048,
    block_count: int = 4,
    embedding_length: int = 64,
    head_count: int = 4,
    head_count_kv: int = 2,
    vocabulary: int = 300,
    extra: Mapping[str, int] | None = None,
) -> Path:
    """A GGUF with a real header (and a vocabulary to step over) and no tensors."""
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), architecture)
    writer.add_context_length(context_length)
    writer.add_block_count(block_count)
    writer.add_embedding_length(embedding_length)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(head_count_kv)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_token_list([f"tok{i}" for i in range(vocabulary)])
    writer.add_token_scores([0.0] * vocabulary)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def link(source: Path, target: Path) -> Path:
    """`target` becomes `source` without copying: a hard link, else a symbolic one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        target.symlink_to(source.resolve())
    return target


def hf_store(
    root: Path,
    repo_id: str,
    files: Mapping[str, Path],
    *,
    revision: str = REVISION,
    ref: str | None = "main",
) -> Path:
    """`root/models--org--repo` as `huggingface_hub` lays it out; the snapshot folder.

    Each blob is named by the file's real SHA-256 (what the Hub's ETag is for LFS files)
    and each snapshot entry is a relative symbolic link to it.
    """
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    for relative, source in files.items():
        blob = repo / "blobs" / sha256_of(source)
        if not blob.exists():
            link(source, blob)
        entry = snapshot / relative
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(os.path.relpath(blob, entry.parent))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(revision)  # no newline, as huggingface_hub writes
    return snapshot


def ollama_store(root: Path, models: Mapping[str, Path]) -> Path:
    """Ollama's store under `root` with `{"qwen2.5:0.5b": gguf, "ns/name:tag": ...}`."""
    for name, source in models.items():
        path, _, tag = name.rpartition(":")
        parts = path.split("/")
        if len(parts) == 1:
            parts = ["registry.ollama.ai", "library", *parts]
        elif len(parts) == 2:
            parts = ["registry.ollama.ai", *parts]
        digest = sha256_of(source)
        blob = root / "blobs" / f"sha256-{digest}"
        if not blob.exists():
            link(source, blob)
        manifest = root / "manifests" / Path(*parts) / tag
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(_ollama_manifest(digest, source.stat().st_size)))
    return root


def _ollama_manifest(digest: str, size: int) -> dict[str, object]:
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": "sha256:" + "c" * 64,
            "size": 485,
        },
        "layers": [
            {
                "mediaType": "application/vnd.ollama.image.model",
                "digest": f"sha256:{digest}",
                "size": size,
            },
            {
                "mediaType": "application/vnd.ollama.image.template",
                "digest": "sha256:" + "d" * 64,
                "size": 358,
            },
        ],
    }


def lmstudio_folder(home: Path, files: Mapping[str, Path]) -> Path:
    """`home/.lmstudio/models/<publisher>/<repo>/<file>.gguf` for each `{relative: gguf}`."""
    root = home / ".lmstudio" / "models"
    for relative, source in files.items():
        link(source, root / relative)
    return root


def store_environment(home: Path, **more: str) -> dict[str, str]:
    """An environment whose stores all lie under `home`: nothing of the real ~ is read
    (OLLAMA_MODELS is set too, or Ollama's Linux service folder would be)."""
    keep = {k: v for k, v in os.environ.items() if k not in _STORE_VARIABLES}
    ollama = str(home / ".ollama" / "models")
    return {**keep, "HOME": str(home), "OLLAMA_MODELS": ollama, **more}


_STORE_VARIABLES: Sequence[str] = (
    "HOME",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "XDG_CACHE_HOME",
    "OLLAMA_MODELS",
)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)
