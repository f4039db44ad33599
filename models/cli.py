"""The model subcommands of the `nf4lora` command line: `generate` and `convert-gguf`.

train/cli.py owns the top-level parser and calls add_generate_parser / add_convert_gguf_parser; each subparser
stores its handler in `args.func`. Errors are raised as ValueError / FileNotFoundError for the caller to print.
"""

from __future__ import annotations

import argparse
import os
import sys

from nf4lora.kernels.precision import DTYPE_NAMES, resolve_compute_dtype

from .loading import resolve_device



# -------------------------------------------------------------------------------------------------- generate
def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face checkpoint directory (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory to apply")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --no-chat)")
    p.add_argument("--system", help="system message (chat mode only: an error with --no-chat)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template (default: when it has one)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=200, help="upper bound on generated tokens (default: 200)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (needs --temperature > 0)")  # fmt: skip
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set with probability >= p (needs --temperature > 0)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (needs --temperature > 0)")
    p.add_argument("--quant-type", choices=("nf4", "fp4", "none"), default=None,
                   help="hold the base in 4 bits (nf4/fp4) or 16 bits (none) (default: nf4; none for a checkpoint "
                        "written by `nf4lora merge`, which 4 bits would lose part of the fine-tune of, unless "
                        "--adapter is given)")  # fmt: skip
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="double quantization (default: on)")  # fmt: skip
    p.add_argument("--blocksize", type=int, default=64, help="quantization block size (default: 64)")
    p.add_argument("--compute-dtype", choices=("auto", *DTYPE_NAMES), default="auto",
                   help="dtype the model computes in (default: auto, the device's fastest: bfloat16 where native, "
                        "else float32)")  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="generate text from a model (optionally with a LoRA adapter), printed as it comes",
        description="Load a checkpoint (4-bit by default), optionally apply a PEFT adapter, and print the "
        "continuation of --prompt token by token, stopping at an end-of-sequence id of config.json, "
        "generation_config.json or the tokenizer.",
    )  # fmt: skip
    add_generate_args(p)
    p.set_defaults(func=run_generate)
    return p


def run_generate(args: argparse.Namespace, out=None) -> str:
    """Run `generate` for parsed args; prints to `out` (default stdout) as tokens arrive; returns the text."""
    from nf4lora.train.data import IGNORE_INDEX, Example
    from nf4lora.train.merged import load_for_inference, sample_of
    from nf4lora.train.resources import check_adapter_fits, resolve_model

    from .generate import generate, stop_token_ids
    from .generic import read_model_config
    from .tokenizer import Tokenizer

    out = out or sys.stdout
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    sampling = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
                if value is not None]  # fmt: skip
    if args.temperature == 0 and sampling:
        raise ValueError(f"sampling flags {', '.join(sampling)} have no effect with --temperature=0 (greedy "
                         "decoding); give --temperature > 0 or drop them")  # fmt: skip
    device = resolve_device(args.device)
    chosen = resolve_compute_dtype(args.compute_dtype, device)
    print(f"compute dtype: {chosen}", file=sys.stderr)  # stdout carries only the generated text
    path = resolve_model(args.model)
    config = read_model_config(path)  # every input is checked before the model is loaded
    check_adapter_fits(config, args.adapter)
    tokenizer = Tokenizer.from_pretrained(path)
    chat = args.chat if args.chat is not None else bool(tokenizer.chat_template)
    if args.system is not None and not chat:
        why = "--no-chat was given" if args.chat is False else f"the tokenizer of --model={path!r} has none"
        raise ValueError(f"--system needs the chat template, but {why}")
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        ids = tokenizer.encode(args.prompt)

    prompt = sample_of([Example(ids, [IGNORE_INDEX] * len(ids))])  # what 4 bits cost is measured on, if asked
    model = load_for_inference(path, config.nf4lora_merged, args, device, chosen.name, prompt, log=sys.stderr)
    eos = stop_token_ids(path, model.config, tokenizer)
    printer = _StreamPrinter(tokenizer, set(eos), out)
    generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
             seed=args.seed, eos_token_id=eos or None, stream=printer)  # fmt: skip
    return printer.finish()


class _StreamPrinter:
    """Prints the decoded text as tokens arrive. Byte-level tokens can end inside a UTF-8 character, so the text
    is re-decoded from the start and only complete new characters are printed."""

    def __init__(self, tokenizer, eos: set[int], out):
        self.tokenizer, self.eos, self.out = tokenizer, eos, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: int) -> None:
        if token in self.eos:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
            return
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[len(self.printed) :] + "\n")
        self.out.flush()
        return text


# --------------------------------------------------------------------------------------------- convert-gguf
def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", help="LLaMA, Qwen2/2.5 or Qwen3 .gguf file")
    p.add_argument("out_dir", help="output directory (Hugging Face layout)")
    p.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default="bfloat16", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true",
                   help="replace out_dir if it already holds a checkpoint (a directory with config.json); without "
                        "it out_dir must be new or empty")  # fmt: skip


def add_convert_gguf_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-gguf", help="convert a llama.cpp GGUF file into a Hugging Face checkpoint directory",
        description="Dequantize a LLaMA, Qwen2/2.5 or Qwen3 GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1) into "
        "model.safetensors + config.json + tokenizer.json + tokenizer_config.json + generation_config.json. "
        "The directory is built beside out_dir and moved into place when complete, replacing (with --overwrite) "
        "an earlier checkpoint there as a whole; a failed conversion leaves out_dir as it was.",
    )  # fmt: skip
    add_convert_args(p)
    p.set_defaults(func=run_convert_gguf)
    return p


def run_convert_gguf(args: argparse.Namespace) -> str:
    from .gguf_import import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}: " + ", ".join(sorted(os.listdir(out))))
    return out
