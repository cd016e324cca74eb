"""The NumPy all-MiniLM-L6-v2: shape, normalisation, padding, truncation, token counts, and
values checked against sentence-transformers 6.2 on torch 2.13 (CPU), computed once by hand."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from tokenizers import Tokenizer

from shoal.engine.embedding import Embedder, default_model_dir, gelu

GUITAR = "A man is playing a guitar."
GUITAR_TOO = "Someone plays a guitar."
STOCKS = "The stock market fell sharply today."
# 40 sentences, ~680 WordPiece tokens: truncated to 256.
LONG = " ".join(
    f"The {i}th quick brown fox jumps over the lazy dog near river number {i}." for i in range(40)
)

# sentence-transformers 6.2.0 (transformers 5.23, torch 2.13.0+cpu) on the same packaged
# model: SentenceTransformer(model_dir).encode([...]), first five components.
REFERENCE = {
    GUITAR: [0.02166406, -0.00486423, -0.00964916, -0.06340125, -0.16749354],
    "": [-0.11883832, 0.04829871, -0.00254813, -0.01101117, 0.05195079],
    LONG: [0.04304718, -0.01725268, 0.08579164, -0.02675277, -0.05319901],
    "The quick brown fox jumps over the lazy dog.": [
        0.04393354,
        0.05893439,
        0.04817841,
        0.07754807,
        0.02674443,
    ],
}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def embedder(model_dir: Path) -> Embedder:
    return Embedder(model_dir)


@pytest.fixture(scope="module")
def raw_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer as shipped, without the embedder's settings: no truncation, no padding."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def one(embedder: Embedder, text: str) -> NDArray[np.float32]:
    vectors, _ = embedder.embed([text])
    row: NDArray[np.float32] = vectors[0]
    return row


def test_model_facts(embedder: Embedder) -> None:
    assert embedder.model_id == "all-MiniLM-L6-v2"
    assert embedder.dimensions == 384
    assert embedder.max_tokens == 256


def test_shape_dtype_and_unit_norm(embedder: Embedder) -> None:
    texts = [GUITAR, GUITAR_TOO, STOCKS, "", "Ünïcödé 🎸 中文 Ελληνικά", LONG]
    vectors, _ = embedder.embed(texts)
    assert vectors.shape == (len(texts), 384)
    assert vectors.dtype == np.float32
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Different texts, different vectors: not one constant row.
    assert np.abs(vectors[0] - vectors[2]).max() > 0.05


def test_no_texts(embedder: Embedder) -> None:
    vectors, tokens = embedder.embed([])
    assert vectors.shape == (0, 384)
    assert tokens == 0


def test_a_single_string_is_refused(embedder: Embedder) -> None:
    with pytest.raises(TypeError):
        embedder.embed(GUITAR)


def test_same_text_same_vector_across_calls(embedder: Embedder) -> None:
    first, second = one(embedder, GUITAR), one(embedder, GUITAR)
    assert float(first @ second) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_padding_and_batch_order_do_not_change_a_result(embedder: Embedder) -> None:
    # GUITAR is padded to the width of LONG in this batch; the rows come back in input order.
    texts = [LONG, GUITAR, STOCKS, "", GUITAR_TOO]
    batch, _ = embedder.embed(texts)
    for row, text in zip(batch, texts, strict=True):
        np.testing.assert_allclose(row, one(embedder, text), atol=1e-5)


def test_more_texts_than_one_batch(embedder: Embedder) -> None:
    texts = [f"Sentence number {i} is {'quite ' * (i % 7)}different." for i in range(70)]
    vectors, tokens = embedder.embed(texts)
    assert vectors.shape == (70, 384)
    for i in (0, 31, 32, 33, 64, 69):
        np.testing.assert_allclose(vectors[i], one(embedder, texts[i]), atol=1e-5)
    assert tokens == sum(embedder.count_tokens(t) for t in texts)


def test_close_meaning_scores_higher_than_unrelated(embedder: Embedder) -> None:
    vectors, _ = embedder.embed([GUITAR, GUITAR_TOO, STOCKS])
    close = float(vectors[0] @ vectors[1])
    unrelated = float(vectors[0] @ vectors[2])
    assert close > unrelated + 0.5
    # sentence-transformers gives 0.8504 and -0.0540.
    assert close == pytest.approx(0.8504, abs=1e-3)
    assert unrelated == pytest.approx(-0.0540, abs=1e-3)


def test_token_count(embedder: Embedder, raw_tokenizer: Tokenizer) -> None:
    expected = len(raw_tokenizer.encode(GUITAR).ids)
    assert expected == 9  # [CLS] a man is playing a guitar . [SEP]
    _, tokens = embedder.embed([GUITAR])
    assert tokens == expected
    _, tokens = embedder.embed([GUITAR, STOCKS, ""])
    assert tokens == 9 + len(raw_tokenizer.encode(STOCKS).ids) + 2
    assert embedder.count_tokens(GUITAR) == 9


def test_long_input_is_truncated_to_max_tokens(
    embedder: Embedder, raw_tokenizer: Tokenizer
) -> None:
    assert len(raw_tokenizer.encode(LONG).ids) > 600
    vectors, tokens = embedder.embed([LONG])
    assert tokens == 256
    assert embedder.count_tokens(LONG) == 256
    # Only the first 256 tokens count: what comes after them changes nothing.
    longer = one(embedder, LONG + " Then something else entirely happened in Paris.")
    np.testing.assert_allclose(vectors[0], longer, atol=1e-6)
    # Even far past the 512 position embeddings.
    huge, huge_tokens = embedder.embed(["word " * 5000])
    assert huge_tokens == 256
    assert np.isfinite(huge).all()


@pytest.mark.parametrize("text", list(REFERENCE))
def test_matches_sentence_transformers(embedder: Embedder, text: str) -> None:
    np.testing.assert_allclose(one(embedder, text)[:5], REFERENCE[text], atol=1e-4)


def test_concurrent_calls_agree_with_serial_ones(embedder: Embedder) -> None:
    batches = [[GUITAR, LONG], [STOCKS], ["", GUITAR_TOO, GUITAR], [LONG, STOCKS]] * 2
    serial = [embedder.embed(b)[0] for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda b: embedder.embed(b)[0], batches))
    for s, c in zip(serial, concurrent, strict=True):
        np.testing.assert_allclose(s, c, atol=1e-6)


def test_gelu_is_exact_to_float32_rounding() -> None:
    # Within one float32 step of the exact GELU, or 1e-9 where that step is finer (x < -3.5).
    # A tanh GELU, or an Abramowitz-Stegun 7.1.26 erf (error 1.5e-7), fails this by far.
    x = np.concatenate(
        [np.linspace(-14.0, 14.0, 40000), np.random.default_rng(7).standard_normal(20000) * 3]
    ).astype(np.float32)
    exact = np.array([0.5 * float(v) * math.erfc(-float(v) / math.sqrt(2.0)) for v in x])
    got = gelu(x.reshape(200, -1)).reshape(-1)
    assert got.dtype == np.float32
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got - exact) <= np.maximum(ulp, 1e-9))


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        Embedder(tmp_path)


def test_default_model_dir_holds_the_model() -> None:
    model_dir = default_model_dir()
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer.json").is_file()
