"""Linear4bit + LoRA: drop-in modules, model surgery (quantize / add / merge) and PEFT-format adapters."""

from .adapter import load_adapter, save_adapter
from .linear4bit import Linear4bit
from .lora import LoRALinear
from .surgery import add_lora, merge_lora, quantize_model, unmerge_lora

__all__ = [
    "Linear4bit", "LoRALinear", "quantize_model", "add_lora", "merge_lora", "unmerge_lora",
    "save_adapter", "load_adapter",
]  # fmt: skip
