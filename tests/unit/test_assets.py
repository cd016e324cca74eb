"""`shoal.engine.assets`: model ids from GGUF file names, and locating model packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.engine.assets import model_id_of, package_dir
from shoal.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "model_id", "quant"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct", "Q4_1"),
        ("Llama-3-8B-Instruct.Q4_K_M.gguf", "Llama-3-8B-Instruct", "Q4_K_M"),
        ("llama-3-8b-instruct.q8_0.gguf", "llama-3-8b-instruct", "Q8_0"),
        ("gemma-2-2b-it.IQ2_XXS.gguf", "gemma-2-2b-it", "IQ2_XXS"),
        ("phi-3.5-mini.f16.gguf", "phi-3.5-mini", "F16"),
        ("Qwen2.5-0.5B.BF16.gguf", "Qwen2.5-0.5B", "BF16"),
        ("tiny.F32.gguf", "tiny", "F32"),
        ("model.gguf", "model", None),
        ("smollm2-f16.gguf", "smollm2-f16", None),  # a dash is part of the name
        ("Qwen2.5-0.5B.gguf", "Qwen2.5-0.5B", None),  # ".5B" is not a quantization
        ("name.Q4_1.extra.gguf", "name.Q4_1.extra", None),  # only a final suffix counts
    ],
)
def test_model_id_of(name: str, model_id: str, quant: str | None) -> None:
    assert model_id_of(Path("/models") / name) == (model_id, quant)


def test_model_id_ignores_the_directory() -> None:
    assert model_id_of(Path("/a.Q4_0/b.gguf")) == ("b", None)


def test_missing_package_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="shoal_no_such_model_package"):
        package_dir("shoal_no_such_model_package")


def test_a_plain_module_is_not_a_model_package() -> None:
    with pytest.raises(ConfigError):
        package_dir("shoal.engine.assets")


def test_package_dir_of_an_installed_package() -> None:
    import shoal

    assert package_dir("shoal") == Path(shoal.__file__).parent
