"""4-bit kernels: Triton on CUDA, plain torch on the CPU, one dispatch point (backend.py, used by ops.py).

Layers (docs/architecture.md, "Kernels in layers"): @triton.jit kernels and their launchers in dequant.py,
matmul.py, gemv.py; the fast torch path in torch_path.py; in ops.py the rule that picks a kernel, the torch custom
ops (for torch.compile) and the eager autograd.Function; checked public entry points in dispatch.py.
"""

# Run only as nf4lora.kernels. Found through sys.path as a top-level "kernels" (the checkout's root on sys.path,
# and bitsandbytes and transformers both look for Hugging Face's "kernels" package on import), this module stays
# empty: running it again would register the nf4lora:: torch custom ops a second time, which frees the first
# registration, and torch.compile then crashes in the freed operator.
if __name__ == "nf4lora.kernels":
    from .backend import backend_for
    from .dispatch import dequantize, matmul_4bit, matmul_4bit_grad_input

    __all__ = ["dequantize", "matmul_4bit", "matmul_4bit_grad_input", "backend_for"]
