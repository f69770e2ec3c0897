"""
Ahead-of-time compilation of every kernel, for real GPUs, without one
=====================================================================

Triton lowers a kernel to PTX and assembles it with its bundled ptxas, and none of that needs a GPU:
`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`. This harness compiles
every launch configuration the cuda backend uses, for each target it supports, and reports what ptxas says of it:
registers per thread, bytes spilled, and the shared memory Triton allotted (pipelined tiles live there).

Each kernel module (`kernels/*.py`) lists its configurations in `AOT`: a list, or a function returning one, of
`(jit_fn, signature, constexprs)` triples, optionally with a fourth dict of compile options (`num_warps`,
`num_stages`) and `divisible_by_16`: the arguments the launch will pass as multiples of 16. That last one matters:
at launch, Triton's JIT specializes every pointer and integer argument that is a multiple of 16 (torch allocations
are; so are most strides), and its alignment analysis then turns byte-by-byte loads into 16-byte vector loads with
far fewer registers. An AOT entry must declare the same facts, or it compiles a different, worse kernel than the
one that will run. The signature maps every argument to a Triton type ("*bf16", "*u8", "i32", ...) or
"constexpr".

Run it as `python -m dgrun.kernels.aot` (markdown table; `--json` for one JSON object per line; `--targets 90`;
`--jobs N` processes). It exits 1 if any configuration fails to compile. It must run with TRITON_INTERPRET unset
(the interpreter replaces the kernels with Python functions), so tests call it in a subprocess, with a fresh
Triton cache so that nothing carries over between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

TARGETS = (80, 86, 89, 90, 120)  # Ampere A100 / RTX 30, Ada RTX 40, Hopper H100/H200, Blackwell RTX 50
_SKIP = {"aot", "__init__"}


def entries() -> list[tuple[str, object, dict, dict, dict]]:
    """(name, jit_fn, signature, constexprs, options) for every AOT configuration of every kernel module."""
    import dgrun.kernels

    out = []
    for info in sorted(pkgutil.iter_modules(dgrun.kernels.__path__), key=lambda i: i.name):
        if info.name in _SKIP:
            continue
        module = importlib.import_module(f"dgrun.kernels.{info.name}")
        configs = getattr(module, "AOT", None)
        for cfg in (configs() if callable(configs) else configs or []):
            fn, sig, const, *opts = cfg
            opts = opts[0] if opts else {}
            consts = ",".join(f"{k}={v}" for k, v in const.items())
            ptrs = ",".join(v[1:] for v in sig.values() if v.startswith("*"))
            div = ",".join(a for a in opts.get("divisible_by_16", ()) if not sig[a].startswith("*"))
            out.append((f"{info.name}.{fn.__name__}[{consts}|{ptrs}|16 divides {div or 'no int'}]", fn, sig, const,
                        opts))
    return out


def _ptxas_stats(log: str) -> tuple[int, int]:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return (int(regs[-1]) if regs else -1), (int(spills[-1]) if spills else 0)


_ENTRIES = None


def compile_one(index: int, cc: int) -> dict:
    """Compile entry `index` for sm_`cc`; a dict of its figures, or of the error."""
    global _ENTRIES
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _ENTRIES is None:
        _ENTRIES = entries()
    name, fn, sig, const, opts = _ENTRIES[index]
    opts = dict(opts)
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in opts.pop("divisible_by_16", ())}
    knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v itself; keep its log
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, signature=sig, constexprs=const, attrs=attrs),
                               target=GPUTarget("cuda", cc, 32), options=opts)
    except Exception as e:  # any failure is reported, with the entry's name
        return {"name": name, "cc": cc, "error": f"{type(e).__name__}: {str(e).strip()[-2000:]}"}
    regs, spills = _ptxas_stats(log.getvalue())
    return {"name": name, "cc": cc, "regs": regs, "spills": spills, "shared": int(k.metadata.shared),
            "warps": int(k.metadata.num_warps), "seconds": round(time.perf_counter() - start, 2)}


def run(targets=TARGETS, jobs: int = 2) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("dgrun.kernels.aot: unset TRITON_INTERPRET (the interpreter cannot compile)")
    n = len(entries())
    tasks = [(i, cc) for i in range(n) for cc in targets]
    if jobs <= 1:
        return [compile_one(i, cc) for i, cc in tasks]
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(ex.map(compile_one, *zip(*tasks)))


def table(results: list[dict]) -> str:
    lines = ["| kernel [constexprs, pointer types] | sm | regs | spills (B) | shared (B) | warps | s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['cc']} | FAILED: {r['error'].splitlines()[0][:120]} | | | | |")
        else:
            lines.append(f"| {r['name']} | {r['cc']} | {r['regs']} | {r['spills']} | {r['shared']} | {r['warps']}"
                         f" | {r['seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dgrun.kernels.aot", description=__doc__.split("\n")[1])
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    start = time.perf_counter()
    results = run(tuple(int(t) for t in a.targets.split(",")), a.jobs)
    if a.json:
        for r in results:
            print(json.dumps(r))
    else:
        print(table(results))
        print(f"\n{len(results)} compiles in {time.perf_counter() - start:.1f} s")
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"FAILED {r['name']} sm_{r['cc']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
