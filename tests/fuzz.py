"""A seeded mutator over the tests' own tiny GGUF, safetensors and MLX checkpoints, and a sandboxed runner.

Each case copies one seed, damages one file (bytes, or structure: a GGUF key, a safetensors header entry, a
JSON value, a packed tensor), then loads it in a forked child under a memory cap and a deadline and asks for
a 1-step generation. The outcome must be `DgrunError` or success; anything else is an escape, a hang or an
oversized allocation. Used by tests/test_fuzz.py (a few hundred cases) and benchmarks/fuzz_loaders.py.
"""

from __future__ import annotations

import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import time
import traceback
from pathlib import Path

MiB = 1 << 20
# Peak RSS growth above the forked child's start that counts as oversized: a fixed allowance (torch's and the
# tokenizer's first allocations take ~32 MiB whatever the model) plus a small multiple of the checkpoint's size.
MEMORY_FIXED = 64 * MiB
MEMORY_PER_BYTE = 16
ADDRESS_BUDGET = 4096 * MiB  # RLIMIT_AS headroom: larger requests fail at once instead of swapping

# --- seeds ------------------------------------------------------------------------------------------------


def make_seeds(root: Path) -> dict[str, Path]:
    """Tiny checkpoints in every format dgrun reads (SHAPE_A, chat tokenizer, sampler defaults)."""
    import torch

    from dgrun.convert.convert import convert
    from tiny import SHAPE_A, make_chat_tokenizer, make_checkpoint

    gen = dict(max_denoising_steps=24, t_min=0.3, t_max=0.9, sampler_config={"entropy_bound": 0.2},
               stability_threshold=2, confidence_threshold=0.01, eos_token_id=[1], pad_token_id=0)
    hf = make_checkpoint(root / "hf", SHAPE_A, canvas_length=16, seed=5, dtype=torch.bfloat16, generation=gen)
    make_chat_tokenizer(hf, SHAPE_A["vocab_size"])
    seeds = {"hf": hf}
    for to in ("gguf-bf16", "gguf-q8"):
        seeds[to] = convert(hf, to=to, out=root / f"tiny-{to}.gguf").path
    try:
        from dgrun.convert.mlx_writer import convert_mlx

        seeds["mlx-q4"] = convert_mlx(hf, to="mlx-q4", out=root / "mlx-q4").path
    except Exception:  # noqa: BLE001  (no MLX on this machine: fuzz the other formats)
        pass
    for path in seeds.values():  # in this process: imports and torch's lazy set-up are not charged to the
        load_and_step(path)      # forked children, whose growth should be the case's own
    return seeds


# --- evil values ------------------------------------------------------------------------------------------

U64 = [0, 1, 2, 3, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def evil_number(rng: random.Random):
    return rng.choice([0, -1, 1, 2, 3, 7, -(2**31), 2**31, 2**32 + 1, 10**9, 10**18, 10**30, float("nan"),
                       float("inf"), -float("inf"), 1e-30, 1e30, -0.0, 0.5, 1.5, 1e308, 513, 4096, 2**20])


def evil_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10)
    if kind < 4:
        return evil_number(rng)
    if kind == 4:
        return rng.choice(["", "abc", "0", "1e9", "nan", "\udcff" if depth else "x" * 10_000, "full_attention"])
    if kind == 5:
        return rng.choice([None, True, False])
    if kind == 6:
        return [evil_json(rng, depth + 1) for _ in range(rng.randrange(4))] if depth < 3 else []
    if kind == 7:
        return {"a": evil_json(rng, depth + 1)} if depth < 3 else {}
    if kind == 8:
        return json.loads("[" * 50 + "]" * 50)
    return [rng.randrange(-2, 40) for _ in range(rng.choice([0, 1, 5, 6, 7, 64]))]


# --- GGUF: a plain serializer so structure can be damaged consistently ------------------------------------

SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def gguf_parse(data: bytes) -> dict:
    """{version, fields: [(key, vtype, value, sub)], tensors: [(name, ne, type, offset)], align, blob}."""
    off = 4

    def take(fmt):
        nonlocal off
        v = struct.unpack_from(fmt, data, off)[0]
        off += struct.calcsize(fmt)
        return v

    def string():
        nonlocal off
        n = take("<Q")
        s = data[off:off + n]
        off += n
        return s

    def value(vtype):
        if vtype == STRING:
            return string(), None
        if vtype == ARRAY:
            sub, n = take("<I"), take("<Q")
            return [value(sub)[0] for _ in range(n)], sub
        return take(SCALAR[vtype]), None

    version, n_t, n_kv = take("<I"), take("<Q"), take("<Q")
    fields = []
    for _ in range(n_kv):
        key = string()
        vtype = take("<I")
        v, sub = value(vtype)
        fields.append([key, vtype, v, sub])
    tensors = []
    for _ in range(n_t):
        name = string()
        ne = [take("<Q") for _ in range(take("<I"))]
        tensors.append([name, ne, take("<I"), take("<Q")])
    align = next((f[2] for f in fields if f[0] == b"general.alignment"), 32)
    start = -(-off // align) * align
    return {"version": version, "fields": fields, "tensors": tensors, "align": align, "blob": data[start:]}


def gguf_write(g: dict) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", g["version"], len(g["tensors"]), len(g["fields"]))]

    def string(s):
        s = s if isinstance(s, bytes) else str(s).encode("utf-8", "surrogatepass")
        out.append(struct.pack("<Q", len(s)) + s)

    def value(vtype, v, sub):
        if vtype == STRING:
            string(v)
        elif vtype == ARRAY:
            out.append(struct.pack("<IQ", sub, len(v)))
            for x in v:
                value(sub, x, STRING if sub == ARRAY else None)
        else:
            out.append(struct.pack(SCALAR[vtype], v))

    for key, vtype, v, sub in g["fields"]:
        string(key)
        out.append(struct.pack("<I", vtype))
        value(vtype, v, sub)
    for name, ne, ttype, offset in g["tensors"]:
        string(name)
        out.append(struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne))
        out.append(struct.pack("<IQ", ttype, offset))
    head = b"".join(out)
    align = g["align"] if isinstance(g["align"], int) and 0 < g["align"] < 4096 else 32
    return head + b"\0" * (-len(head) % align) + g["blob"]


def _typed(rng: random.Random):
    """A random GGUF (vtype, value, sub), often of the wrong type for the key it lands on."""
    kind = rng.randrange(9)
    if kind == 0:
        return 4, rng.choice([u for u in U64 if u < 2**32]), None
    if kind == 1:
        return 5, rng.choice([-1, 0, -(2**31), 2**31 - 1, 1, 3]), None
    if kind == 2:
        return 6, rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e30, 3.4e38, 1e-45]), None
    if kind == 3:
        return 10, rng.choice(U64), None
    if kind == 4:
        return STRING, rng.choice([b"", b"abc", b"\xff\xfe", b"diffusion-gemma", b"1024"]), None
    if kind == 5:
        return 7, rng.choice([True, False]), None
    if kind == 6:
        return ARRAY, [rng.randrange(-3, 2**31) for _ in range(rng.choice([0, 1, 5, 6, 7]))], 5
    if kind == 7:
        return ARRAY, [rng.choice([True, False]) for _ in range(rng.choice([0, 1, 5, 6, 7, 100]))], 7
    return ARRAY, [[1, 2], [3]], ARRAY


def mutate_gguf(data: bytes, rng: random.Random) -> bytes:
    g = gguf_parse(data)
    fields, tensors = g["fields"], g["tensors"]
    op = rng.randrange(14)
    if op == 0:  # a key gets an absurd value, often of the wrong type
        f = rng.choice([f for f in fields if not f[0].startswith(b"tokenizer.ggml.")] or fields)
        f[1], f[2], f[3] = _typed(rng)
    elif op == 1:  # the same value type, an absurd value
        f = rng.choice([f for f in fields if f[1] in SCALAR])
        f[2] = {6: rng.choice([float("nan"), float("inf"), 0.0, -1.0, 1e30]), 12: float("nan"), 7: not f[2]}.get(
            f[1], rng.choice([u for u in U64 if u < 2 ** (8 * struct.calcsize(SCALAR[f[1]]) - 1)] + [0]))
    elif op == 2:
        del fields[rng.randrange(len(fields))]
    elif op == 3:
        fields.append(list(rng.choice(fields)))
        fields[-1][1:] = _typed(rng)
    elif op == 4:  # tensor dims
        t = rng.choice(tensors)
        if rng.random() < 0.3:
            t[1] = t[1][:-1] if len(t[1]) > 1 and rng.random() < 0.5 else t[1] + [rng.choice(U64)]
        else:
            t[1][rng.randrange(len(t[1]))] = rng.choice(U64)
    elif op == 5:  # tensor type
        rng.choice(tensors)[2] = rng.choice([0, 1, 2, 3, 6, 8, 10, 12, 14, 16, 24, 30, 31, 39, 40, 2**31])
    elif op == 6:  # tensor data offset: misaligned, overlapping, past the end, absurd
        t = rng.choice(tensors)
        t[3] = rng.choice([t[3] + 1, t[3] + 32, 0, rng.choice(tensors)[3], len(g["blob"]), 2**63, 2**64 - 1])
    elif op == 7:  # names: duplicate, garbage, not UTF-8
        t = rng.choice(tensors)
        t[0] = rng.choice([rng.choice(tensors)[0], b"", b"\xff\xff", b"blk.999.attn_q.weight", b"output.weight"])
    elif op == 8:  # the tokenizer arrays
        f = rng.choice([f for f in fields if f[0].startswith(b"tokenizer.ggml.")])
        if f[1] == ARRAY and f[2] and rng.random() < 0.7:
            i = rng.randrange(len(f[2]))
            v = f[2][i]
            f[2][i] = (rng.choice([b"", b"\xff", b"<0x41>", b"a b c", b" ", v + v]) if isinstance(v, bytes)
                       else rng.choice([-1, 0, 7, 2**31 - 1]) if isinstance(v, int) else v)
            if rng.random() < 0.3:
                f[2] = f[2][: rng.randrange(len(f[2]))]
        else:
            f[1], f[2], f[3] = _typed(rng)
    elif op == 9:  # alignment and version
        g["align"] = rng.choice([0, 1, 3, 7, 64, 2**31])
        fields.append([b"general.alignment", 4, g["align"], None])
    elif op == 10:
        g["version"] = rng.choice([0, 1, 2, 4, 2**31])
    elif op == 11:  # drop a tensor, or add a stray one
        if rng.random() < 0.5:
            del tensors[rng.randrange(len(tensors))]
        else:
            tensors.append([b"blk.0.extra.weight", [4, 4], 0, 0])
    elif op == 12:  # the architecture itself
        for f in fields:
            if f[0] == b"general.architecture":
                f[2] = rng.choice([b"gemma4", b"", b"diffusion-gemma\x00", b"llama"])
    else:  # a hyperparameter the loader reads, set to something absurd
        hp = [f for f in fields if f[0].startswith((b"diffusion-gemma.", b"diffusion."))]
        f = rng.choice(hp)
        f[1], f[2], f[3] = rng.choice([(4, rng.choice([0, 1, 2**31, 2**32 - 1]), None), (6, float("nan"), None),
                                       (6, float("inf"), None), (5, -1, None), (STRING, b"abc", None),
                                       (ARRAY, [0] * rng.choice([0, 5, 6, 7]), 4), (6, 1e-40, None)])
    return gguf_write(g)


def mutate_bytes(data: bytes, rng: random.Random, header: int) -> bytes:
    """Raw damage, mostly inside the first `header` bytes: truncate, flip, overwrite a word, insert, delete."""
    b = bytearray(data)
    pos = rng.randrange(min(len(b), header)) if rng.random() < 0.85 else rng.randrange(len(b))
    op = rng.randrange(5)
    if op == 0:
        return bytes(b[:pos])
    if op == 1:
        for _ in range(rng.randrange(1, 8)):
            i = rng.randrange(min(len(b), header))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 2:
        b[pos:pos + 8] = struct.pack("<Q", rng.choice(U64))
    elif op == 3:
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    else:
        del b[pos:pos + rng.randrange(1, 16)]
    return bytes(b)


# --- safetensors and JSON ---------------------------------------------------------------------------------

ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "U32", "I64", "BOOL", "F8_E4M3", "X9", ""]


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    n = struct.unpack_from("<Q", data)[0]
    header, blob = json.loads(data[8:8 + n]), data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    op = rng.randrange(7)
    if op == 0:
        header[rng.choice(names)]["dtype"] = rng.choice(ST_DTYPES)
    elif op == 1:
        e = header[rng.choice(names)]
        if rng.random() < 0.5 and e["shape"]:
            e["shape"][rng.randrange(len(e["shape"]))] = rng.choice([0, 1, 2, 2**31, 2**53, -1])
        else:
            e["shape"] = rng.choice([[], [1], list(reversed(e["shape"])), e["shape"] + [1]])
    elif op == 2:
        e = header[rng.choice(names)]
        a, b = e["data_offsets"]
        e["data_offsets"] = rng.choice([[b, a], [a + 2, b + 2], [0, b - a], [a, len(blob) + 64], [-1, b],
                                        [a, 2**63], [0, 0]])
    elif op == 3:
        del header[rng.choice(names)]
    elif op == 4:
        header["__metadata__"] = rng.choice([{"format": "mlx"}, {"format": 3}, [], "x", None])
    elif op == 5:  # a weight swapped for a consistent tensor of another shape or dtype
        return _swap_tensor(data, rng)
    else:
        header[rng.choice(names)] = rng.choice([{}, [], "x", {"dtype": "F32", "shape": [2, 2]}])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + blob


def _swap_tensor(data: bytes, rng: random.Random) -> bytes:
    import torch
    from safetensors.torch import load, save

    tensors = load(data)
    meta = json.loads(data[8:8 + struct.unpack_from("<Q", data)[0]]).get("__metadata__")
    name = rng.choice(list(tensors))
    t = tensors[name]
    op = rng.randrange(5)
    if op == 0 and t.dim() and t.shape[-1] > 1:
        t = t[..., : t.shape[-1] // 2]
    elif op == 1:
        t = t.reshape(-1)
    elif op == 2:
        t = t.to(rng.choice([torch.int8, torch.float64, torch.bool, torch.int32, torch.float16]))
    elif op == 3:
        t = t.float().fill_(rng.choice([float("nan"), float("inf"), 0.0]))
    else:
        t = t.transpose(-1, -2) if t.dim() > 1 else t.repeat(2)
    tensors[name] = t.contiguous()
    return save(tensors, metadata=meta if isinstance(meta, dict) else None)


def _json_paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in list(node.items())[:200]:
            yield from _json_paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:20]):
            yield from _json_paths(v, path + (i,))


def mutate_json(text: str, rng: random.Random, prefer: tuple[str, ...] = ()) -> str:
    op = rng.randrange(10)
    if op == 0:
        return text[: rng.randrange(len(text))]
    if op == 1:
        return rng.choice(["[" * 100_000 + "]" * 100_000, "{}", "[]", "null", "3", '"x"', "\xff", "NaN", ""])
    doc = json.loads(text)
    paths = [p for p in _json_paths(doc) if p]
    focus = [p for p in paths if any(str(x) in prefer for x in p)]
    path = rng.choice(focus if focus and rng.random() < 0.7 else paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if op == 2 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = evil_json(rng)
    return json.dumps(doc, allow_nan=True)


# --- one case ---------------------------------------------------------------------------------------------

CONFIG_KEYS = ("text_config", "canvas_length", "quantization", "quantization_config", "layer_types", "head_dim",
               "num_attention_heads", "num_key_value_heads", "sliding_window", "num_experts", "top_k_experts",
               "rope_parameters", "per_layer_config", "rms_norm_eps", "bits", "group_size", "eos_token_id")


def build_case(seeds: dict[str, Path], seed: int, out: Path) -> tuple[Path, str]:
    """Copy a seed into `out` with one file damaged; returns (path to load, description)."""
    rng = random.Random(seed)
    kind = rng.choice(sorted(seeds))
    src = seeds[kind]
    if src.is_file():
        data = src.read_bytes()
        structured = rng.random() < 0.6
        head = 8 * 1024 if rng.random() < 0.5 else struct_end(data)
        data = mutate_gguf(data, rng) if structured else mutate_bytes(data, rng, head)
        dst = out / src.name
        dst.write_bytes(data)
        return dst, f"{kind} {'structure' if structured else 'bytes'}"
    dst = out / src.name
    shutil.copytree(src, dst, copy_function=os.link)
    files = sorted(p.name for p in dst.iterdir())
    name = rng.choice(files)
    f = dst / name
    data = f.read_bytes()
    f.unlink()  # the other files stay hard links to the seed: write the damaged one anew
    if name.endswith(".safetensors"):
        data = mutate_safetensors(data, rng) if rng.random() < 0.6 else mutate_bytes(data, rng, 4096)
    elif name.endswith(".json"):
        data = mutate_json(data.decode(), rng, CONFIG_KEYS if name == "config.json" else ()).encode(
            "utf-8", "surrogatepass")
    else:
        data = mutate_bytes(data, rng, len(data))
    f.write_bytes(data)
    return dst, f"{kind} {name}"


def struct_end(data: bytes) -> int:
    """Where a GGUF's tensor data begins (so byte damage lands in the header), or the file size."""
    try:
        return len(data) - len(gguf_parse(data)["blob"])
    except Exception:  # noqa: BLE001
        return len(data)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _file_rss() -> int:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


def _peak() -> int:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def load_and_step(path: Path) -> str:
    """What the library must survive: `dgrun info` (headers only), then a load on the cpu backend and a 1-step
    generation of one canvas."""
    import dgrun
    from dgrun.errors import DgrunError
    from dgrun.info import info

    try:
        info(path)
    except DgrunError:
        pass  # the load below must then fail too, or succeed: both are checked
    m = dgrun.load(path, backend="cpu")
    canvas = m.args.canvas_length
    if m.tokenizer is not None:
        r = m.generate("def f(x):", max_new_tokens=canvas, steps=1)
    else:
        ids = [i % m.args.vocab_size for i in (2, 5, 9)]
        r = m.generate(ids, max_new_tokens=canvas, steps=1)
    return f"ok {len(r.ids)} tokens"


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _child(path: Path, wfd: int) -> None:
    import torch

    from dgrun.errors import DgrunError

    torch.set_num_threads(1)
    budget = MEMORY_FIXED + MEMORY_PER_BYTE * checkpoint_bytes(path)
    base, base_file = _rss(), _file_rss()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm + ADDRESS_BUDGET, hard))
    try:
        outcome, detail = "ok", load_and_step(path)
    except DgrunError as e:
        outcome, detail = "error", str(e)
    except MemoryError as e:
        outcome, detail = "oversized", f"MemoryError {e}"
    except BaseException as e:  # noqa: BLE001  (the point: anything else is an escape)
        text = f"{type(e).__name__}: {e}"
        alloc = isinstance(e, RuntimeError) and ("alloc" in text and "memory" in text)
        where = traceback.extract_tb(e.__traceback__)[-1]
        outcome = "oversized" if alloc else "escape"
        detail = f"{text[:300]} at {Path(where.filename).name}:{where.lineno}"
    # Library code and mapped files paged in for the first time (how much depends on the machine's page cache,
    # not on the input) are not allocations: take them out of the peak.
    grown = _peak() - base - max(0, _file_rss() - base_file)
    if outcome != "oversized" and grown > budget:
        outcome, detail = "oversized", f"peak RSS +{grown // MiB} MiB ({detail})"
    if outcome == "error" and "\n" in detail:
        outcome, detail = "escape", f"multi-line DgrunError: {detail[:300]!r}"
    os.write(wfd, json.dumps([outcome, detail[:2000], grown / budget]).encode())
    os._exit(0)


def run_case(path: Path, timeout: float) -> tuple[str, str, float, float]:
    """(outcome, detail, seconds, peak memory growth as a fraction of the budget) with outcome in
    ok / error / escape / oversized / hang / crash."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # notices such as "skipping the vision tower"
        try:
            _child(path, w)
        finally:
            os._exit(3)
    os.close(w)
    chunks, deadline = [], t0 + timeout
    while True:
        left = deadline - time.perf_counter()
        ready, _, _ = select.select([r], [], [], max(0.0, left))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return "hang", f"no result in {timeout:.0f} s", time.perf_counter() - t0, 0.0
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - t0
    if not chunks:
        return "crash", f"child died (status {status})", seconds, 0.0
    outcome, detail, memory = json.loads(b"".join(chunks))
    return outcome, detail, seconds, memory


def run_many(seeds: dict[str, Path], first: int, count: int, work: Path, timeout: float, report=None) -> dict:
    """Run cases first..first+count-1; returns the tally, the bad cases, the slowest case's seconds and the
    largest peak memory growth as a fraction of its budget."""
    tally, bad, slowest, memory = {}, [], 0.0, 0.0
    for seed in range(first, first + count):
        case = work / str(seed)
        case.mkdir(parents=True)
        try:
            path, what = build_case(seeds, seed, case)
            outcome, detail, seconds, grown = run_case(path, timeout)
        finally:
            shutil.rmtree(case, ignore_errors=True)
        tally[outcome] = tally.get(outcome, 0) + 1
        slowest, memory = max(slowest, seconds), max(memory, grown)
        if outcome not in ("ok", "error"):
            bad.append((seed, what, outcome, detail))
        if report:
            report(seed, what, outcome, detail, seconds)
    return {"tally": tally, "bad": bad, "slowest": slowest, "memory": memory}

