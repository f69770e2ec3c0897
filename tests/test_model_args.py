"""ModelArgs: both config forms for the full-attention sizes, and the per-layer plan."""

import json
import shutil

import torch

import dgrun
from dgrun.models.diffusion_gemma import ModelArgs


def test_released_flat_keys_equal_per_layer_config(ckpt_a, tmp_path):
    """The released config.json has flat global_head_dim / num_global_key_value_heads, no per_layer_config."""
    flat = tmp_path / "flat"
    shutil.copytree(ckpt_a, flat)
    cfg = json.loads((flat / "config.json").read_text())
    text = cfg["text_config"]
    assert text.pop("per_layer_config") == {"5": {"head_dim": 32, "num_key_value_heads": 1}}
    text.update(global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True)
    (flat / "config.json").write_text(json.dumps(cfg))
    a, b = dgrun.load(ckpt_a), dgrun.load(flat)
    assert a.args.layers == b.args.layers
    prompt, canvas = list(range(4, 24)), torch.arange(16) + 30
    ca, cb = a.new_cache(), b.new_cache()
    a.encode(prompt, ca)
    b.encode(prompt, cb)
    assert torch.equal(a.denoise(canvas, ca), b.denoise(canvas, cb))


def test_layer_plan_of_the_released_model():
    args = ModelArgs.from_config({
        "model_type": "diffusion_gemma", "canvas_length": 256,
        "text_config": dict(hidden_size=2816, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
                            head_dim=256, global_head_dim=512, num_global_key_value_heads=2, sliding_window=1024,
                            num_experts=128, top_k_experts=8, moe_intermediate_size=704, intermediate_size=2112,
                            unknown_future_key=1),
    })
    plan = args.layers
    assert [s.sliding for s in plan] == [(i + 1) % 6 != 0 for i in range(30)]
    full, sliding = plan[5], plan[0]
    assert (full.head_dim, full.n_kv_heads, full.k_eq_v, full.rope_type, full.rope_theta) == (
        512, 2, True, "proportional", 1e6)
    assert (sliding.head_dim, sliding.n_kv_heads, sliding.k_eq_v, sliding.rope_theta) == (256, 8, False, 1e4)
    assert args.canvas_length == 256
    # 25.2B parameters in total, as the model card says (the vision tower is not counted here).
    from dgrun.models.diffusion_gemma import n_params
    assert 25.0e9 < n_params(args) < 25.5e9
