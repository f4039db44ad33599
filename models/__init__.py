"""One LLaMA-style decoder for LLaMA, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 that loads Hugging
Face checkpoints straight into 4-bit, its tokenizers, generation and GGUF import."""

from .config import LlamaConfig
from .generate import generate
from .generic import load_any
from .gguf_import import convert_gguf
from .kv_cache import KVCache
from .llama import CausalLMOutput, LlamaForCausalLM
from .loading import load_model
from .tokenizer import Tokenizer

__all__ = [
    "LlamaConfig", "LlamaForCausalLM", "CausalLMOutput", "KVCache", "load_model", "load_any", "generate", "Tokenizer",
    "convert_gguf",
]  # fmt: skip
