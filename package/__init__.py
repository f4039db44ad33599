"""nf4lora: a from-scratch QLoRA stack (NF4/FP4 + double quantization, Triton kernels, LoRA, LLaMA, trainer).

The parts live in subpackages: nf4lora.nf4 (the plain-torch specification), nf4lora.kernels, nf4lora.lora,
nf4lora.models and nf4lora.train.
"""

__version__ = "0.1.0"
