"""nf4lora: a from-scratch QLoRA stack (NF4/FP4 + double quantization, Triton kernels, LoRA, LLaMA, trainer).

The parts live in subpackages: nf4lora.nf4 (the plain-torch specification), nf4lora.kernels, nf4lora.lora,
nf4lora.models and nf4lora.train.
"""

__version__ = "0.1.0"



def _imported_as(name: str, part: str) -> bool:
    """Whether a subpackage's __init__ runs under its own name, nf4lora.<part>, rather than as a top-level package
    found because the nf4lora checkout's root is on sys.path (`python -m pytest` or `python -c` run there)."""
    return name == f"nf4lora.{part}"
