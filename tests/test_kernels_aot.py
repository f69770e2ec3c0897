"""Every kernel compiled ahead of time for real GPUs (sm_80, 86, 89, 90, 120), which needs no GPU: each
`kernels/*.py` module's AOT configurations through `python -m dgrun.kernels.aot`, in a subprocess because the
other kernel tests run Triton's interpreter, which cannot compile. Fails on any compile error; prints registers,
spills and shared memory per configuration (run pytest with -s to see the table)."""

import os

# Triton reads TRITON_INTERPRET when a @jit function is defined, its own library's included: this module imports
# triton first in a full run, so it sets the knob for the interpreter tests that share the process (the compile
# below runs in a subprocess without it).
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def test_every_kernel_module_lists_its_aot_configurations():
    for f in sorted(KERNELS.glob("*.py")):
        if f.stem not in ("__init__", "aot"):
            assert "\nAOT" in f.read_text() or "\ndef AOT" in f.read_text(), f"kernels/{f.name} has no AOT list"


def test_every_configuration_compiles_for_every_target():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:  # nothing cached across runs
        env.update(TRITON_CACHE_DIR=cache, TRITON_DEFAULT_FP_FUSION="1")
        done = subprocess.run([sys.executable, "-m", "dgrun.kernels.aot", "--json"], env=env, capture_output=True,
                              text=True, timeout=600)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    from dgrun.kernels import aot

    print("\n" + aot.table(results))
    failed = [f"{r['name']} sm_{r['cc']}: {r['error']}" for r in results if "error" in r]
    assert not failed and done.returncode == 0, "\n".join(failed) or done.stderr[-3000:]
    names = {r["name"] for r in results}
    assert any(n.startswith("qmatmul.") for n in names) and any(n.startswith("dequant.") for n in names)
    assert len(results) == len(names) * len(aot.TARGETS)
    assert all(r["regs"] > 0 for r in results)  # ptxas's report was read
