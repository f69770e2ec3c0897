"""The weights `dgrun bench` runs on, and the backend over them: a checkpoint (-m) or random weights built on the
device (--random-weights), moved where each backend reads them."""

from __future__ import annotations

import torch

from dgrun.errors import DgrunError


def to_device(weights: dict, device) -> dict:
    """For the cuda backend: QTensor (a GGUF's memory map) -> DevicePacked and tensors to `device`, one at a
    time, so no whole-model host copy is made; DevicePacked stays as it is."""
    from dgrun.packed import DevicePacked, QTensor

    def one(v):
        if isinstance(v, QTensor):
            return DevicePacked.upload(v, device)
        return v.to(device) if isinstance(v, torch.Tensor) else v
    return {k: one(v) for k, v in weights.items()}


def to_host(weights: dict) -> dict:
    """For backends that read host weights (cpu, mlx): DevicePacked -> QTensor, tensors to the CPU."""
    from dgrun.packed import DevicePacked, QTensor

    def one(v):
        if isinstance(v, DevicePacked):
            return QTensor(v.data.cpu().numpy(), v.qtype, v.shape)
        return v.cpu() if isinstance(v, torch.Tensor) else v
    return {k: one(v) for k, v in weights.items()}


def make_backend(name: str, args, weights: dict, dtype: str | None = None, device: str | None = None):
    """The backend `name` over `weights`: on cuda as DevicePacked / device tensors (on `device`: "cuda" by default,
    "cpu" for the cuda backend's test mode under TRITON_INTERPRET=1), else on the host."""
    from dgrun.backends import create, pick

    name = pick(name)
    if name == "cuda":
        device = device or "cuda"
        return create(name, args, to_device(weights, device), dtype, device=device)
    return create(name, args, to_host(weights), dtype)


def load_weights(model: str | None, random_spec: str | None, backend: str, device: str | None = None):
    """(args, weights, description, path or None) for -m MODEL or --random-weights ARCH:MIX."""
    from dgrun.backends import pick

    if model is not None and random_spec is not None:
        raise DgrunError("give -m/--model or --random-weights, not both")
    if random_spec is not None:
        from dgrun.random_weights import parse_spec, random_weights

        args, mix = parse_spec(random_spec)
        device = (device or "cuda") if pick(backend) == "cuda" else "cpu"
        return args, random_weights(args, mix, device), f"random {random_spec} (speed does not depend on weight " \
            "values)", None
    from dgrun import checkpoint

    ckpt = checkpoint.load(model)
    return ckpt.args, ckpt.weights, str(model), model
