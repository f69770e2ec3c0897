"""Models from the hub, against a fake hub: an HTTP server on 127.0.0.1 that HF_ENDPOINT points at.

dgrun runs as a subprocess (huggingface_hub reads HF_ENDPOINT and HF_HOME when imported) with a fresh
HF_HOME, so downloads, cache reuse and HF_HUB_OFFLINE go through huggingface_hub's real code paths.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgrun.errors import DgrunError
from dgrun.hub import parse, pick_gguf
from fake_hub import FakeHub

GGUF_REPO, CKPT_REPO = "acme/tiny-GGUF", "acme/tiny"


@pytest.fixture(scope="module")
def hub(gguf_chat, ckpt_chat):
    gguf = Path(gguf_chat).read_bytes()
    ckpt = {p.name: p.read_bytes() for p in Path(ckpt_chat).iterdir() if p.is_file()}
    repos = {
        GGUF_REPO: {"tiny-BF16.gguf": gguf, "tiny-Q8_0.gguf": b"GGUF not really q8", "tiny-Q4_K_M.gguf": b"GGUF q4",
                    "mmproj-tiny-Q4_K_M.gguf": b"GGUF projector", "README.md": b"# tiny"},
        CKPT_REPO: {**ckpt, "training_args.bin": b"not needed", "README.md": b"# tiny"},
    }
    with FakeHub(repos) as server:
        yield server


def env(hub, tmp_path, offline=False):
    out = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               OMP_NUM_THREADS="1")
    out.pop("HF_HUB_OFFLINE", None)
    return dict(out, HF_HUB_OFFLINE="1") if offline else out


def dgrun(hub, tmp_path, *argv, stdin=None):
    return subprocess.run([sys.executable, "-m", "dgrun.cli", *argv], env=env(hub, tmp_path), input=stdin,
                          capture_output=True, text=True, timeout=120)


RESOLVE = """
import json, sys
from dgrun import hub
from dgrun.errors import DgrunError
for spec in sys.argv[1:]:
    try:
        print(json.dumps([spec, str(hub.resolve(spec, progress=False)), None]))
    except DgrunError as e:
        print(json.dumps([spec, None, str(e)]))
"""


def resolve(hub, tmp_path, *specs, offline=False):
    """hub.resolve on each spec in one fresh process: [(spec, path or None, error or None)]."""
    p = subprocess.run([sys.executable, "-c", RESOLVE, *specs], env=env(hub, tmp_path, offline), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


def test_quants_cache_reuse_offline_and_errors(hub, tmp_path):
    got = resolve(hub, tmp_path, f"{GGUF_REPO}:q8_0", f"{GGUF_REPO}:Q8_0", GGUF_REPO, CKPT_REPO,
                  f"{GGUF_REPO}:Q5_K_S", "acme/missing")
    (_, q8, _), (_, q8_again, _), (_, default, _), (_, snap, _), (_, _, no_quant), (_, _, missing) = got
    assert Path(q8).name == "tiny-Q8_0.gguf" and Path(q8).read_bytes() == b"GGUF not really q8"
    assert str(tmp_path / "hf") in q8
    assert q8_again == q8 and hub.downloads("tiny-Q8_0.gguf") == 1  # cache reuse: a HEAD, no second GET
    assert Path(default).name == "tiny-Q4_K_M.gguf"  # no quant, no config.json: Q4_K_M, never the projector
    names = {f.name for f in Path(snap).iterdir()}  # a checkpoint repo: only what dgrun reads
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert "training_args.bin" not in names and "README.md" not in names
    assert "no GGUF for quant 'Q5_K_S'" in no_quant and "tiny-BF16.gguf" in no_quant
    assert "no such model repository" in missing

    asked = len(hub.requests)
    (_, cached, _), (_, _, not_cached), (_, _, unknown) = resolve(
        hub, tmp_path, f"{GGUF_REPO}:q8_0", f"{GGUF_REPO}:BF16", "acme/missing", offline=True)
    assert cached == q8 and "BF16" in not_cached and "HF_HUB_OFFLINE" in unknown
    assert len(hub.requests) == asked  # HF_HUB_OFFLINE: the server is never asked


def test_pull_cli(hub, tmp_path):
    p = dgrun(hub, tmp_path, "pull", f"{GGUF_REPO}:Q4_K_M")
    assert p.returncode == 0 and Path(p.stdout.strip()).name == "tiny-Q4_K_M.gguf", p.stderr
    p = dgrun(hub, tmp_path, "pull", "acme/missing")
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("dgrun: error:")]
    assert p.returncode == 1 and len(lines) == 1 and "acme/missing" in lines[0] and "Traceback" not in p.stderr


def test_chat_from_hub_gguf(hub, tmp_path):
    p = dgrun(hub, tmp_path, "chat", "-hf", f"{GGUF_REPO}:BF16", "--steps", "2", "-n", "16",
              stdin="hello\n/stats\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() and "context:" in p.stderr  # the answer on stdout, the stats on stderr (piped)
    assert hub.downloads("tiny-BF16.gguf") == 1


def test_repo_specs():
    assert parse("user/repo") == ("user/repo", None)
    assert parse("user/repo.v2:Q4_K_M") == ("user/repo.v2", "Q4_K_M")
    assert parse("/abs/path") is None and parse("a/b/c") is None and parse("../x") is None
    files = ["m-Q4_K_M.gguf", "m-Q4_K_M_L.gguf", "m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf",
             "mmproj-m-f16.gguf", "m-BF16.gguf"]
    assert pick_gguf(files, None, "r") == ["m-Q4_K_M.gguf"]
    assert pick_gguf(files, "q8_0", "r") == ["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"]
    assert pick_gguf(files, "bf16", "r") == ["m-BF16.gguf"]
    assert pick_gguf(["only-F16.gguf"], None, "r") == ["only-F16.gguf"]
    with pytest.raises(DgrunError, match="no .gguf"):
        pick_gguf(["mmproj-x.gguf", "README.md"], None, "r")
