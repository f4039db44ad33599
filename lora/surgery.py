"""Model surgery on any nn.Module (ours, a Hugging Face model, a user's MLP): quantize its Linear layers, wrap them
with LoRA, merge the adapters back.

Module names are those of `model.named_modules()`. A name in a list matches a module whose name equals it or ends
with "." + it (PEFT's rule), so "q_proj" matches "model.layers.3.self_attn.q_proj"; a string other than
"all-linear" is a regular expression that must match the whole name (re.fullmatch, as PEFT does).
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from .linear4bit import Linear4bit
from .lora import LoRALinear, check_lora_args

_QUANT_KWARGS = ("blocksize", "quant_type", "double_quant", "compute_dtype", "device")
OUTPUT_HEAD = "lm_head"  # the conventional name of a language model's output layer, never adapted by "all-linear"


def _name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} for the Linear / Linear4bit layers that are not already parts of a LoRA wrapper."""
    out, inside = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoRALinear):
            inside.append(name)
        elif isinstance(module, (nn.Linear, Linear4bit)):
            out[name] = module
    return out


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _read_without_call(model: nn.Module) -> set[str]:
    """Names of the Linear layers whose owner reads their weight instead of calling them, so a LoRA wrapper there
    breaks the owner's forward: nn.MultiheadAttention's out_proj (it hands out_proj.weight to the attention kernel)."""
    return {f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}  # fmt: skip


def _check_wrappable(model: nn.Module, names, source: str) -> None:
    """Raise ValueError, naming `source`, if `names` holds a layer LoRA cannot wrap (_read_without_call)."""
    read_only = _read_without_call(model)
    bad = [name for name in names if name in read_only]
    if bad:
        raise ValueError(
            f"{source} selects {bad[:3]}: the out_proj of an nn.MultiheadAttention, which reads its weight without "
            "calling it, so a LoRA wrapper there would break the attention; select the model's other Linear layers"
        )


def _check_root(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.Linear, Linear4bit, LoRALinear)):
        raise TypeError(
            f"model is itself a {type(model).__name__}; surgery replaces submodules, so wrap the layer in a module "
            "(or use Linear4bit.from_linear / LoRALinear directly)"
        )


def quantize_model(model: nn.Module, skip=(OUTPUT_HEAD,), **quant_kwargs) -> list[str]:
    """Replace every nn.Linear in `model` (in place) by a Linear4bit, except those named in `skip`.

    quant_kwargs go to Linear4bit.from_linear (blocksize, quant_type, double_quant, compute_dtype, device).
    Layers are quantized one at a time, so the peak extra memory is one layer's 4-bit copy. Returns the names
    of the quantized layers.
    """
    _check_root(model)
    unknown = sorted(set(quant_kwargs) - set(_QUANT_KWARGS))
    if unknown:
        raise TypeError(f"quantize_model got unknown keyword arguments {unknown}; allowed: {list(_QUANT_KWARGS)}")
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a sequence of module names, got {skip!r}")
    names = []
    for name, module in _linear_layers(model).items():
        if type(module) is nn.Linear and not any(_name_matches(name, s) for s in skip):
            _set_submodule(model, name, Linear4bit.from_linear(module, **quant_kwargs))
            names.append(name)
    return names


def _output_head_names(model: nn.Module, linears: dict[str, nn.Module]) -> set[str]:
    """Names of the output head: "lm_head" and whatever Hugging Face's get_output_embeddings() returns."""
    heads = {name for name in linears if _name_matches(name, OUTPUT_HEAD)}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    heads |= {name for name, m in linears.items() if m is head}
    return heads


def select_targets(model: nn.Module, target_modules) -> list[str]:
    """Names of the Linear layers `target_modules` selects ("all-linear" | list of names | regex), in model order.
    "all-linear" leaves out the output head and the layers LoRA cannot wrap (_read_without_call); selecting one of
    those by name or regex raises ValueError."""
    linears = _linear_layers(model)
    available = sorted({name.rpartition(".")[2] for name in linears}) or "none"
    if target_modules == "all-linear":
        skipped = _output_head_names(model, linears) | _read_without_call(model)
        names = [name for name in linears if name not in skipped]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {e}") from None
        names = [name for name in linears if pattern.fullmatch(name)]
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules:
        if not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"target_modules must hold module names (str), got {list(target_modules)!r}")
        unmatched = [t for t in target_modules if not any(_name_matches(name, t) for name in linears)]
        if unmatched:
            raise ValueError(
                f"target_modules {unmatched} match no Linear layer of the model; its Linear layers are named "
                f"{available} (full names like {next(iter(linears), 'none')!r})"
            )
        names = [name for name in linears if any(_name_matches(name, t) for t in target_modules)]
    else:
        raise TypeError(
            "target_modules must be 'all-linear', a non-empty list of module names or a regex string, "
            f"got {target_modules!r}"
        )
    if not names:
        raise ValueError(
            f"target_modules {target_modules!r} selects no Linear layer; the model's Linear layers are named {available}"
        )
    _check_wrappable(model, names, f"target_modules {target_modules!r}")
    return names


def add_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules="all-linear",
    use_rslora: bool = False,
    init: str = "kaiming",
) -> list[str]:
    """Wrap the selected Linear / Linear4bit layers of `model` in LoRALinear (in place) and freeze everything
    else: afterwards only lora_A / lora_B weights require grad. Returns the wrapped names in model order."""
    _check_root(model)
    check_lora_args(r, alpha, dropout, use_rslora, init)
    if _lora_layers(model):
        raise ValueError(f"model already has LoRA layers ({sorted(_lora_layers(model))[:3]}...); add_lora applies once")
    names = select_targets(model, target_modules)  # validates everything before the model is touched
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        # The wrapper takes the mode of the layer it replaces: adding LoRA to a model in eval mode must not switch
        # its dropout on.
        wrapped = LoRALinear(base, r, alpha, dropout, use_rslora, init).train(base.training)
        _set_submodule(model, name, wrapped)
    return names


def merge_lora(model: nn.Module, dequantize: bool = False, *, unload: bool = False) -> list[str]:
    """Merge every LoRA adapter of `model` into its base weight (in place); returns the merged names.

    A 4-bit base is requantized (lossy; one warning gives the largest measured error), or with dequantize=True
    becomes a 16-bit nn.Linear, lossless with respect to the dequantized base. Without `unload` the wrappers
    stay, forward skips the adapters and unmerge_lora() restores the model exactly; with `unload` each wrapper is
    replaced by its merged base layer (what a merged checkpoint holds) and nothing can be unmerged.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to merge (add_lora or load_adapter first)")
    merged_already = [name for name, m in layers.items() if m.merged]
    if merged_already:
        raise ValueError(f"LoRA layers {merged_already[:3]} are already merged; call unmerge_lora(model) first")
    worst = None
    for name, layer in layers.items():
        errors = layer._merge(dequantize)
        if errors is not None and (worst is None or errors[0] > worst[1]):
            worst = (name, *errors)
        if unload:
            _set_submodule(model, name, layer.merged_base())
    if worst is not None:
        warnings.warn(
            f"merging LoRA into 4-bit bases requantizes {len(layers)} weights: largest relative error {worst[1]:.3g} "
            f"(max abs error {worst[2]:.3g}) in {worst[0]}; merge_lora(model, dequantize=True) is lossless",
            stacklevel=2,
        )
    return list(layers)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo merge_lora(model) (without unload) exactly; returns the unmerged names."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to unmerge")
    not_merged = [name for name, m in layers.items() if not m.merged]
    if not_merged:
        raise ValueError(f"LoRA layers {not_merged[:3]} are not merged; nothing to unmerge there")
    for layer in layers.values():
        layer.unmerge()
    return list(layers)
