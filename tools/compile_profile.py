"""Where a TPU compile spends its time: libtpu's stage durations and the slowest HLO passes of each program.

    python -m tools.compile_profile --log profile.log -- --config configs/iconface_klein4b.py \\
        --topology v5p-8 --references=0 --norestoration
    python -m tools.compile_profile --log profile.log          # summarise a log written before

Runs `python -m iconface_jax.aot` with the arguments after `--`, with libtpu's own logging on (its stage
durations, and every HLO pass's time through `hlo_pass_pipeline`'s log), keeps that log in `--log`, and prints
for each compiled module: instruction count, the HLO_PASSES, BACKEND_PASSES (LLO scheduling and the
kernels, Mosaic's among them), CODE_GENERATION and END_TO_END stage seconds, the `--top` slowest passes
summed over their calls (a sub-pipeline such as `simplification-1` counts its passes again), and the
child's peak host memory. Without arguments after `--` it reads `--log`.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterable, Sequence

# libtpu reads these at load; hlo_pass_pipeline logs each pass's time at verbosity 2.
LOG_ENV = dict(TF_CPP_MIN_LOG_LEVEL="0", TPU_STDERR_LOG_LEVEL="0", TPU_MIN_LOG_LEVEL="0",
               TPU_VMODULE="hlo_pass_pipeline=2,deepsea_compiler_backend=1")

_MODULE = re.compile(r"XLA::TPU running hlo passes for ([\d,]+) instructions, module: (\S+)")
_PASS = re.compile(r"HLO pass: (\S+) time: ([\d.]+) (ms|s|us)")
_STAGE = re.compile(r"(HLO_PASSES|BACKEND_PASSES|CODE_GENERATION|END_TO_END) stage duration: "
                    r"((?:[\d.]+(?:ms|us|h|m|s))+)")
_LINE = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):([\d.]+)\s+(\d+) ")  # glog: time of day, thread
_FUSION = re.compile(r"deepsea_compiler_backend\.cc:\d+\] \[(\S+)\] LLO optimizing")
_RETRY = re.compile(r"Successful retry compilation of (\S+) after retry_count=(\d+)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclasses.dataclass
class ModuleProfile:
    """One compiled module's figures, in seconds."""
    name: str
    instructions: int
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    passes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kernels: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # backend s per kernel
    retried: dict[str, int] = dataclasses.field(default_factory=dict)  # kernels the backend compiled again


def parse(lines: Iterable[str]) -> list[ModuleProfile]:
    """The modules of a libtpu log in the order compiled (a module starts at libtpu's 'running hlo passes').

    A kernel's backend time runs from its 'LLO optimizing' line to the next one on the same compiler thread
    (the backend compiles kernels on a few threads at once), or to that thread's last line."""
    modules: list[ModuleProfile] = []
    open_kernels: dict[str, tuple[str, float]] = {}  # thread -> (kernel, start second of day)
    last_seen: dict[str, float] = {}  # thread -> its latest line's second of day

    def close(thread: str, now: float) -> None:
        if thread in open_kernels:
            name, start = open_kernels.pop(thread)
            modules[-1].kernels[name] += (now - start) % 86400

    for line in lines:
        if t := _LINE.match(line):
            thread, now = t[4], int(t[1]) * 3600 + int(t[2]) * 60 + float(t[3])
            last_seen[thread] = now
        if m := _MODULE.search(line):
            modules.append(ModuleProfile(m[2], int(m[1].replace(",", ""))))
            open_kernels.clear()
        elif modules and t and (m := _FUSION.search(line)):
            close(thread, now)
            open_kernels[thread] = (m[1], now)
        elif modules and (m := _PASS.search(line)):
            modules[-1].passes[m[1]] += float(m[2]) * _UNIT[m[3]]
            modules[-1].calls[m[1]] += 1
        elif modules and (m := _RETRY.search(line)):
            modules[-1].retried[m[1]] = int(m[2])
        elif modules and (m := _STAGE.search(line)):
            modules[-1].stages[m[1]] = _seconds(m[2])
            if m[1] == "BACKEND_PASSES":
                for thread in list(open_kernels):
                    close(thread, last_seen[thread])
    return modules


def _seconds(text: str) -> float:
    """libtpu's durations: '55.5s', '5m22.6s', '1h2m3s', '943.9ms'."""
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", text):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


# A kernel's part of the model: the first of these found in its source stack (innermost frame first).
PARTS = (("splash_attention", "splash attention"), ("optax", "optimizer"), ("models/vae.py", "VAE"),
         ("models/adaface.py", "AdaFace"), ("models/recognition.py", "AdaFace"), ("models/iconface.py", "IConFace"),
         ("models/flux2.py", "transformer"), ("models/layers.py", "transformer"), ("models/attention.py", "attention"),
         ("flow.py", "flow matching"), ("train.py", "train step"))


def kernel_parts(hlo_text: Iterable[str]) -> dict[str, str]:
    """Instruction name -> part of the model, from an optimised HLO dump's source stacks
    (`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`, the `*after_optimizations.txt` file).
    Collectives name themselves (all-reduce, all-gather, ...)."""
    files, locations, frames, frame_of = {}, {}, {}, {}
    section = ""
    for line in hlo_text:
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line.strip()
        elif section == "FileNames" and (m := re.match(r"(\d+) \"(.*)\"", line)):
            files[int(m[1])] = m[2]
        elif section == "FileLocations" and (m := re.match(r"(\d+) \{file_name_id=(\d+)", line)):
            locations[int(m[1])] = int(m[2])
        elif section == "StackFrames" and (m := re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)",
                                                          line)):
            frames[int(m[1])] = (int(m[2]), int(m[3]))
        elif m := re.match(r"\s+(?:ROOT )?%(\S+) = .*stack_frame_id=(\d+)", line):
            frame_of.setdefault(m[1], int(m[2]))
    parts = {}
    for name, frame in frame_of.items():
        stack, seen = [], set()
        while frame in frames and frame not in seen:  # innermost first
            seen.add(frame)
            stack.append(files.get(locations.get(frames[frame][0], 0), ""))
            frame = frames[frame][1] - 1  # the dump writes a parent as its index + 1 (0: none)
        parts[name] = next((part for key, part in PARTS if any(key in f for f in stack)), "other")
    return parts


def _part(name: str, parts: dict[str, str]) -> str:
    collective = re.match(r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)", name)
    return collective[1] if collective else parts.get(name, "other")


def report(modules: list[ModuleProfile], top: int, parts: dict[str, str] | None = None) -> str:
    """One block per module: stages, then the slowest passes with their share of HLO_PASSES."""
    out = []
    for mod in modules:
        stages = "  ".join(f"{k} {v:.1f} s" for k, v in mod.stages.items())
        out.append(f"{mod.name}: {mod.instructions:,} instructions; {stages}")
        hlo = mod.stages.get("HLO_PASSES") or sum(mod.passes.values()) or 1.0
        for name, seconds in mod.passes.most_common(top):
            out.append(f"  {seconds:8.1f} s {100 * seconds / hlo:5.1f} %  x{mod.calls[name]:<4} {name}")
        if mod.kernels:
            out.append(f"  backend: {len(mod.kernels)} kernels, {sum(mod.kernels.values()):.0f} thread-s; slowest:")
            for name, seconds in mod.kernels.most_common(top):
                retry = f"  (compiled {mod.retried[name] + 1} times)" if name in mod.retried else ""
                part = f"  [{_part(name, parts)}]" if parts else ""
                out.append(f"  {seconds:8.1f} s  {name}{part}{retry}")
            if parts:
                by_part = collections.Counter()
                for name, seconds in mod.kernels.items():
                    by_part[_part(name, parts)] += seconds
                out.append("  backend thread-s by part: " + ", ".join(f"{p} {s:.0f}" for p, s in by_part.most_common()))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    aot_args = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="libtpu's log: written when aot arguments follow --, else read")
    parser.add_argument("--top", type=int, default=15, help="passes listed per module")
    parser.add_argument("--dump", default="", help="an optimised HLO text dump (*after_optimizations.txt) to name "
                        "each kernel's part of the model by its source")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if aot_args:
        with open(args.log, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "iconface_jax.aot", *aot_args], stderr=log,
                                  env={**os.environ, **LOG_ENV})
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # Linux: KiB
        print(f"aot exited {proc.returncode}; peak host memory {peak_gb:.1f} GB; libtpu's log in {args.log}")
    elif not os.path.exists(args.log):
        sys.exit(f"--log {args.log}: no such file (give aot arguments after -- to write it)")
    with open(args.log, errors="replace") as log:
        modules = parse(log)
    if not modules:
        sys.exit(f"--log {args.log}: no libtpu compile in it (was libtpu's logging on? see LOG_ENV)")
    parts = None
    if args.dump:
        with open(args.dump, errors="replace") as f:
            parts = kernel_parts(f)
    print(report(modules, args.top, parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
