"""4-bit kernels: Triton on CUDA, plain torch on the CPU, one dispatch point (backend.py, used by ops.py).

Layers (docs/architecture.md, "Kernels in layers"): @triton.jit kernels and their launchers in dequant.py,
matmul.py, gemv.py; the fast torch path in torch_path.py; in ops.py the rule that picks a kernel, the torch custom
ops (for torch.compile) and the eager autograd.Function; checked public entry points in dispatch.py. The decoder's
other ops (RMSNorm, RoPE, SwiGLU/GeGLU, linear + cross-entropy) have their kernels in rmsnorm.py, rope.py, glu.py
and cross_entropy.py, and their entries and torch references in model_ops.py.
"""

# Run only as nf4lora.kernels. Found through sys.path as a top-level "kernels" (the checkout's root on sys.path),
# running this module again would register the nf4lora:: torch custom ops a second time, which frees the first
# registration, and torch.compile then crashes in the freed operator. Under that name the module hands the name
# to the installed package that owns it, if any (Hugging Face's `kernels`, which transformers >= 5.25 requires
# and imports along with bitsandbytes), so the checkout shadows nothing; without one it stays empty.
if __name__ == "nf4lora.kernels":
    from .backend import backend_for
    from .dispatch import dequantize, matmul_4bit, matmul_4bit_grad_input
    from .model_ops import apply_rope, geglu, linear_cross_entropy, rms_norm, swiglu

    __all__ = ["dequantize", "matmul_4bit", "matmul_4bit_grad_input", "backend_for",
               "rms_norm", "apply_rope", "swiglu", "geglu", "linear_cross_entropy"]  # fmt: skip
else:
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None:  # the import statement returns what sys.modules holds once this module has run
        _sys.modules[__name__] = _owner = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_owner)
