"""What makes the memory-bound kernels fast, read off their sm_90 machine code (SASS): the gates compile_kernels.py
applies to every variant it compiles, so that a change that would slow them down fails in CI, without a GPU.

The budgets (docs/benchmarking.md, "budget arithmetic"): an H200 SM issues 128 thread-instructions per cycle.
Dequantization moves 2.5 bytes per bf16 output; at 90% of the copy bandwidth an SM must write about 6 outputs per
cycle. The GEMV at M = 1 streams 0.52 bytes per weight; at 80% of HBM an SM must take in about 30 weights per cycle,
about 4 instructions per weight in all. Counts here are static (instructions in the code, per output or per weight
of one loop iteration), which for these loop-free or single-loop kernels is what each thread executes.

Gates:
- dequantize: no shared memory and no barrier (outputs leave the thread that computed them); stores of 16 bytes
  (STG.E.128); codes loaded as whole 32-bit words (a byte load only for the 8-bit absmax code of each word with
  double quantization); at most DEQUANT_SASS_PER_OUTPUT instructions per output for 16-bit outputs.
- GEMV: its K loop has no shared memory and no barrier (no layout conversion), and no load in it whose address
  depends on another load of the same iteration (a chain of memory latencies per step); at most the budget per
  weight for its batch size; registers leave room for two programs per SM.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton

SHARED_OPCODES = ("BAR", "STS", "LDS", "LDSM", "STSM", "ATOMS")
DEQUANT_SASS_PER_OUTPUT = 10.0  # measured 9.75 (bf16 and fp16 out, double quantization, Triton 3.6 and 3.9)
# SASS per weight in the GEMV's K loop, per batch size (rows of x): measured 4.66, 5.92, 10.09, 21.19 on Triton
# 3.6 and 3.9 (bf16, double quantization, K = 4096), plus about 5%. M > 1 spends one FMA per weight and row of x.
GEMV_SASS_PER_WEIGHT = {1: 4.9, 2: 6.25, 4: 10.6, 8: 22.3}
REGISTERS_PER_SM = 65536


@dataclass
class Instruction:
    opcode: str  # with modifiers: "LDG.E.128"
    dests: list[int]  # general registers written
    sources: list[int]  # general registers read outside brackets
    addresses: list[int]  # general registers read inside [...] (memory addresses)
    address: int  # byte offset in the code
    text: str


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (cuobjdump --dump-sass, the one bundled with triton)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-sass", f.name], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip


_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_NO_DEST = ("ST", "BAR", "BRA", "EXIT", "RED", "ISETP", "FSETP", "PLOP3", "NOP", "RET", "MEMBAR", "WARPSYNC")


def _registers(operand: str) -> list[int]:
    """General registers named in an operand; "R4.64" names R4 and R5."""
    regs = []
    for r, wide in re.findall(r"\bR(\d+)(\.64)?\b", operand):
        regs += [int(r), int(r) + 1] if wide else [int(r)]
    return regs


def _dest_width(opcode: str) -> int:
    if opcode.startswith("IMAD.WIDE"):
        return 2
    return {".64": 2, ".128": 4}.get(re.search(r"(\.64|\.128)?$", opcode)[1] or "", 1)


def parse(sass: str) -> list[Instruction]:
    """The instructions of a one-kernel SASS listing, in code order."""
    found = []
    for line in sass.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        text = re.sub(r"^@!?U?P\w+\s+", "", m[2])  # without its predicate guard
        opcode, _, rest = text.partition(" ")
        operands = [o.strip() for o in rest.split(",")] if rest else []
        dests = []
        if operands and not opcode.startswith(_NO_DEST) and operands[0].startswith("R"):
            first = int(operands[0][1:].split(".")[0]) if operands[0][1:].split(".")[0].isdigit() else None
            dests = [] if first is None else list(range(first, first + _dest_width(opcode)))
            operands = operands[1:]
        addresses = [r for part in re.findall(r"\[([^\]]*)\]", rest) for r in _registers(part)]
        sources = _registers(re.sub(r"\[[^\]]*\]", "", ",".join(operands)))
        found.append(Instruction(opcode, dests, sources, addresses, int(m[1], 16), text))
    return found


def loop_body(instructions: list[Instruction]) -> list[Instruction] | None:
    """The instructions of the longest loop (from a backward branch's target to the branch), or None."""
    at = {ins.address: i for i, ins in enumerate(instructions)}
    best = None
    for i, ins in enumerate(instructions):
        m = re.match(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins.text)
        if m and int(m[1], 16) < ins.address and int(m[1], 16) in at:
            start = at[int(m[1], 16)]
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
    return None if best is None else instructions[best[0] : best[1] + 1]


def shared_memory_use(instructions: list[Instruction]) -> list[str]:
    """Instructions that touch shared memory or wait at a barrier."""
    return [ins.text for ins in instructions if ins.opcode.split(".")[0] in SHARED_OPCODES]


def loads_feeding_addresses(body: list[Instruction]) -> list[str]:
    """Memory instructions of one pass through `body` whose address derives (through any arithmetic) from a
    global load earlier in the same pass: each such chain costs one more memory latency per iteration."""
    tainted: set[int] = set()
    found = []
    for ins in body:
        if ins.opcode.startswith(("LDG", "LDS", "STG", "STS", "ATOM", "RED", "LD.", "ST.")) and set(ins.addresses) & tainted:
            found.append(ins.text)
        if ins.opcode.startswith("LDG"):
            tainted |= set(ins.dests)
        elif set(ins.sources) & tainted:
            tainted |= set(ins.dests)
        else:
            tainted -= set(ins.dests)
    return found


def count(instructions: list[Instruction], prefix: str) -> int:
    return sum(ins.opcode.startswith(prefix) for ins in instructions)


def dequant_gate(sass: str, shared_bytes: int, outputs_per_thread: int, double_quant: bool,
                 budget: float | None) -> tuple[dict, list[str]]:  # fmt: skip
    """(numbers, failures) of a dequantization kernel compiled for a whole number of words (n_bytes % 4 == 0).
    budget: the SASS-per-output limit to apply (None: report only)."""
    code = parse(sass)
    words = outputs_per_thread // 8
    stores = [ins.opcode for ins in code if ins.opcode.startswith("STG")]
    numbers = {"SASS/output": round(len(code) / outputs_per_thread, 2), "stores": sorted(set(stores)),
               "byte loads": count(code, "LDG.E.U8")}  # fmt: skip
    failures = []
    if shared_bytes or shared_memory_use(code):
        failures.append(f"uses shared memory ({shared_bytes} bytes; {shared_memory_use(code)[:3]}): outputs cross threads")
    if any(op != "STG.E.128" for op in stores):
        failures.append(f"stores {sorted(set(stores))}: every store must be 16 bytes (STG.E.128)")
    if numbers["byte loads"] > (words if double_quant else 0):
        failures.append(f"{numbers['byte loads']} byte loads for {words} words per thread: codes must load as words")
    if budget is not None and numbers["SASS/output"] > budget:
        failures.append(f"{numbers['SASS/output']} SASS per output, budget {budget}")
    return numbers, failures


def gemv_gate(sass: str, registers: int, spills: int, num_warps: int, weights_per_step: int,
              budget: float | None) -> tuple[dict, list[str]]:  # fmt: skip
    """(numbers, failures) of a GEMV kernel. weights_per_step: weights one thread handles per K-loop iteration.
    budget: the SASS-per-weight limit to apply (None: report only)."""
    code = parse(sass)
    body = loop_body(code)
    numbers = {"registers": registers, "spills": spills}
    failures = []
    if body is None:
        return {**numbers, "loop": "none (one step)"}, failures
    numbers["SASS/weight"] = round(len(body) / weights_per_step, 2)
    shared = shared_memory_use(body)
    if shared:
        failures.append(f"the K loop uses shared memory or barriers ({len(shared)}: {shared[:3]}): a layout conversion")
    chained = loads_feeding_addresses(body)
    if chained:
        failures.append(f"{len(chained)} loads in the K loop wait for another load of the step ({chained[:2]})")
    if budget is not None and numbers["SASS/weight"] > budget:
        failures.append(f"{numbers['SASS/weight']} SASS per weight in the K loop, budget {budget}")
    if spills:
        failures.append(f"{spills} spilled words per thread")
    if registers * 32 * num_warps * 2 > REGISTERS_PER_SM:
        failures.append(f"{registers} registers x {32 * num_warps} threads: fewer than 2 programs per SM")
    return numbers, failures
