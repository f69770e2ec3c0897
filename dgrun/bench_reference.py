"""`dgrun bench --against-transformers`: transformers' own denoising step, timed in the same run.

The reference is `DiffusionGemmaForBlockDiffusion._denoising_step` (transformers 5.23): the decoder forward over
B canvases attending to the prompts' KV cache, then its sampler classes. bf16 on cuda, float32 on the CPU. From
an HF checkpoint directory it loads the same weights; otherwise (a GGUF file, random weights) it builds the same
config with transformers' random init: the ratio is about speed, which does not depend on the values.
It runs after dgrun's figures, once dgrun's weights are freed, so both never share the device's memory.
"""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dgrun.errors import DgrunError

REF_STEPS = 4  # timed reference steps per repetition (it is slow; ms/step is what is compared)
VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=8)  # never run; the config requires one


def require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise DgrunError("--against-transformers needs transformers: pip install transformers==5.23.0")


def hf_config(args):
    """The DiffusionGemmaConfig of a ModelArgs (its field names are the checkpoint's)."""
    from transformers import DiffusionGemmaConfig

    text = {f.name: getattr(args, f.name) for f in fields(args) if f.name not in ("canvas_length", "per_layer_config")}
    if args.per_layer_config:
        text["per_layer_config"] = {str(k): v for k, v in args.per_layer_config.items()}
    return DiffusionGemmaConfig(text_config=text, vision_config=dict(VISION), canvas_length=args.canvas_length)


def build(args, path, device: str, dtype) -> tuple[object, str]:
    """(the reference model on `device`, how it was made)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    if path is not None and (Path(path) / "config.json").is_file():
        ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).to(device)
        how = f"from_pretrained({path})"
    else:
        with torch.device(device):
            ref = DiffusionGemmaForBlockDiffusion._from_config(hf_config(args), dtype=dtype)
        how = "random init of the same config (speed does not depend on weight values)"
    return ref.eval(), how


def step_fn(ref, prompt: torch.Tensor, canvas_length: int, steps: int):
    """A closure running one reference denoising step of prompt.shape[0] rows over the prompts' cache."""
    from transformers import DynamicCache
    from transformers.generation import LogitsProcessorList
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSampler, EntropyBoundSamplerConfig, LinearTemperatureScheduleLogitsProcessor,
        StableAndConfidentStoppingCriteria)

    from dgrun.generate import SamplerConfig

    cfg = SamplerConfig(steps=steps)
    b, n, device = prompt.shape[0], prompt.shape[1], prompt.device
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    with torch.no_grad():
        ref.model.encoder(input_ids=prompt, past_key_values=cache)
    vocab = ref.config.text_config.vocab_size
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(cfg.entropy_bound), canvas_length, vocab, cfg.steps)
    stop = StableAndConfidentStoppingCriteria(cfg.stability_threshold, cfg.confidence_threshold)
    procs = LogitsProcessorList([LinearTemperatureScheduleLogitsProcessor(cfg.t_min, cfg.t_max, cfg.steps)])
    pos = torch.arange(n, n + canvas_length, device=device)[None].expand(b, -1)
    s = SimpleNamespace(canvas=sampler.initialize_canvas(b, device), sc=None,
                        done=torch.zeros(b, dtype=torch.bool, device=device))
    s.argmax = s.canvas

    @torch.no_grad()
    def step():
        s.canvas, s.argmax, s.sc, _ = ref._denoising_step(
            ref.forward, s.canvas, s.argmax, prompt, pos, s.sc, None, cache, s.done, cfg.steps - 1, sampler,
            procs, stop)
    return step


def compare(args, path, rows: list[dict], clock: str, reps: int, seed: int = 0) -> tuple[str, list[list[float]]]:
    """(how the reference was made, its ms/step per repetition at each (prompt, batch) of `rows`), with the same
    random prompts as dgrun's."""
    from dgrun.bench_device import timed

    device = "cuda" if clock == "cuda" else "cpu"
    ref, how = build(args, path, device, torch.bfloat16 if device == "cuda" else torch.float32)
    out = []
    for r in rows:
        rng = np.random.default_rng(seed)
        prompt = torch.tensor(np.stack([rng.integers(0, args.vocab_size, r["prompt"]) for _ in range(r["batch"])]),
                              device=device)
        step = step_fn(ref, prompt, args.canvas_length, r["steps"])
        step()  # warm-up
        out.append([timed(lambda: [step() for _ in range(REF_STEPS)], clock) / REF_STEPS * 1e3 for _ in range(reps)])
    import transformers

    dtype = "bf16" if device == "cuda" else "fp32"
    return f"transformers {transformers.__version__}, {dtype}, {how}, {REF_STEPS} timed steps per repetition", out
