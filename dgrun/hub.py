"""Models from the Hugging Face Hub: `user/repo` (a checkpoint or GGUF repo) or `user/repo:QUANT` (one GGUF).

Resolution goes through huggingface_hub, so its cache is reused, HF_ENDPOINT / HF_HOME / HF_TOKEN apply, and
HF_HUB_OFFLINE=1 resolves from the cache alone. A quant is picked from the GGUF file names as llama.cpp's
`-hf` does: the tag (Q4_K_M, q8_0, BF16, ...) case-insensitively, Q4_K_M when none is given.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from dgrun.errors import DgrunError

REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<quant>[\w.-]+))?$")
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0", "BF16", "F16")  # llama.cpp's default first, then the common ones
SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# What a checkpoint directory needs; the vision tower and other weights are not fetched twice.
CHECKPOINT_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json"]


def parse(spec: str) -> tuple[str, str | None] | None:
    """'user/repo[:QUANT]' -> (repo, quant); None when `spec` is not shaped like a repo id."""
    m = REPO.match(spec)
    if m is None or ".." in spec:
        return None
    return m.group("repo"), m.group("quant")


def is_repo_id(spec: str) -> bool:
    """Shaped like user/repo and not a local path; `models/foo` is a mistyped path when ./models exists."""
    path = Path(spec).expanduser()
    return not path.exists() and not path.parent.is_dir() and parse(spec) is not None


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def quant_of(name: str, quant: str) -> bool:
    """Q4_K_M matches model-Q4_K_M.gguf and model.q4_k_m-00001-of-00002.gguf, not model-Q4_K_M_L.gguf."""
    return re.search(rf"(?:^|[-_.]){re.escape(quant)}(?:[-.]|$)", Path(name).name, re.IGNORECASE) is not None


def pick_gguf(files: list[str], quant: str | None, repo: str) -> list[str]:
    """The GGUF file(s) for `quant` (every shard of a split file), projector files left out."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in Path(f).name.lower())
    if not ggufs:
        raise DgrunError(f"{repo}: no .gguf files in the repository")
    wanted = [quant] if quant else list(DEFAULT_QUANTS)
    for q in wanted:
        hits = [f for f in ggufs if quant_of(f, q)]
        if hits:
            first = hits[0]
            shard = SHARD.search(first)
            return [f for f in hits if SHARD.sub("", f) == SHARD.sub("", first)] if shard else [first]
    if quant is None:
        return [ggufs[0]]
    have = ", ".join(Path(f).name for f in ggufs)
    raise DgrunError(f"{repo}: no GGUF for quant {quant!r} (files: {have})")


def cached_files(repo: str) -> tuple[list[str], Path] | None:
    """The files of the repo's cached snapshot (the ref "main"), if any."""
    from huggingface_hub import snapshot_download

    try:
        snap = Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: nothing cached
        return None
    return [str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()], snap


def list_files(repo: str) -> tuple[list[str], Path | None]:
    """The repo's file names; with HF_HUB_OFFLINE=1 or no network, those of its cached snapshot (returned too)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if offline():
        cached = cached_files(repo)
        if cached is None:
            raise DgrunError(f"{repo}: not in the Hugging Face cache, and HF_HUB_OFFLINE is set")
        return cached
    try:  # model_info makes one request (no retry loop), so a missing network fails fast
        return [s.rfilename for s in HfApi().model_info(repo).siblings or []], None
    except RepositoryNotFoundError:
        raise DgrunError(f"{repo}: no such model repository on the hub (or it is private: set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise DgrunError(f"{repo}: hub request failed ({str(e).splitlines()[0]})") from None
    except Exception as e:  # no network (httpx connection errors): fall back to the cache as hf_hub does
        cached = cached_files(repo)
        if cached is None:
            raise DgrunError(f"{repo}: cannot reach the hub ({type(e).__name__}: {e}) and it is not cached") from None
        return cached


def download(repo: str, files: list[str] | None, progress: bool) -> Path:
    """One file per name (the path of the first), or the checkpoint files of the repo (its snapshot dir)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    from dgrun.progress import RichTqdm

    bar = RichTqdm if progress else None
    try:
        if files is None:
            return Path(snapshot_download(repo, allow_patterns=CHECKPOINT_FILES, tqdm_class=bar))
        paths = [Path(hf_hub_download(repo, f, tqdm_class=bar)) for f in files]
        return paths[0]
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, disk): one line each
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DgrunError(f"{repo}: download failed ({type(e).__name__}: {first})") from None


def resolve(spec: str, quant: str | None = None, progress: bool | None = None, gguf: bool = False) -> Path:
    """A local path as it is; `user/repo[:QUANT]` downloaded (or found in the cache) and its local path.
    A GGUF is picked when a quant is named, when the repo has no config.json, or when `gguf` is set (-hf)."""
    local = Path(spec).expanduser()
    if local.exists():
        return local
    parsed = parse(spec)
    if parsed is None or not is_repo_id(spec):
        raise DgrunError(f"{spec}: no such file or directory (and not a hub repo id like user/repo)")
    repo, tag = parsed
    quant = quant or tag
    progress = sys.stderr.isatty() if progress is None else progress
    files, snapshot = list_files(repo)
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if quant or gguf or (ggufs and "config.json" not in files):
        chosen = pick_gguf(files, quant, repo)
        if snapshot is not None:
            return snapshot / chosen[0]
        return download(repo, chosen, progress)
    if "config.json" not in files:
        raise DgrunError(f"{repo}: neither a checkpoint (config.json) nor GGUF files")
    return snapshot if snapshot is not None else download(repo, None, progress)
