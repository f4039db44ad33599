"""nf4lora: a from-scratch QLoRA stack (NF4/FP4 + double quantization, Triton kernels, LoRA, LLaMA, trainer).

The parts live in subpackages: nf4lora.nf4 (the plain-torch specification), nf4lora.kernels, nf4lora.lora,
nf4lora.models and nf4lora.train.
"""

__version__ = "0.1.0"


def _require_part(name: str, part: str) -> None:
    """Refuse to import a subpackage's folder under any name but nf4lora.<part>.

    With the checkout's root on sys.path (`python -m pytest` or `python -c` run there), its folders `kernels`,
    `models`, `lora`, ... are also top-level packages, and another library's `import kernels` (bitsandbytes looks
    for Hugging Face's `kernels` package when it is imported) would run our code a second time. For kernels/
    that is fatal: registering the nf4lora:: torch custom ops again frees the first registration, and
    torch.compile then crashes in the freed operator (seen as intermittent segfaults in the test suite)."""
    if name != f"nf4lora.{part}":
        raise ImportError(
            f"{part}/ is nf4lora's and imports only as nf4lora.{part}, not as {name!r}: the nf4lora checkout's root "
            "is on sys.path (run from another directory, or with python -P)"
        )
