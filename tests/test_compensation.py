import copy

import torch

from flap_exp.arch import ArchView
from flap_exp.calibrate import collect_stats
from flap_exp.compensation.bias import compensation_bias, compensation_biases
from flap_exp.selection import Selection
from flap_exp.surgery import prune_model

from helpers.models import tiny_model


def test_projection_with_constant_pruned_channels_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    x = torch.randn(50, 10, generator=g, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    x[:, ~keep] = torch.tensor([0.7, -2.0, 3.5], dtype=torch.float64)  # pruned channels constant over tokens
    b = compensation_bias(w, keep, x.mean(0))
    torch.testing.assert_close(x[:, keep] @ w[:, keep].T + b, x @ w.T, rtol=1e-12, atol=1e-12)
    # and with a non-constant pruned channel it is only approximate: the test can fail
    x[:, 1] = torch.randn(50, generator=g, dtype=torch.float64)
    assert not torch.allclose(x[:, keep] @ w[:, keep].T + compensation_bias(w, keep, x.mean(0)), x @ w.T)


def test_whole_model_logits_match_when_pruned_units_are_constant():
    """Make one k/v group's values and one MLP channel's input constant; pruning them with
    compensation must leave the logits unchanged, and without compensation must change them."""
    model = tiny_model(heads=4, kv=2, attention_bias=True, mlp_bias=True)
    arch = ArchView.from_config(model.config)
    with torch.no_grad():
        for layer in model.model.layers:
            v = layer.self_attn.v_proj
            rows = slice(arch.head_dim, 2 * arch.head_dim)  # group 1's value rows
            v.weight[rows] = 0
            v.bias[rows] = torch.linspace(-1, 1, arch.head_dim)  # softmax-weighted sum of a constant = constant
            mlp = layer.mlp
            for lin, b in ((mlp.gate_proj, 0.8), (mlp.up_proj, -1.3)):
                lin.weight[5] = 0
                lin.bias[5] = b  # channel 5's input: silu(0.8) * -1.3 for every token
    windows = torch.randint(0, 101, (6, 16), generator=torch.Generator().manual_seed(3))
    stats = collect_stats(model, windows, progress=False)
    keep_g = [torch.tensor([True, False])] * arch.num_layers
    keep_c = [torch.arange(arch.intermediate_size) != 5] * arch.num_layers
    sel = Selection(keep_g, keep_c)
    x = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = model(x).logits
        comp, plain = copy.deepcopy(model), copy.deepcopy(model)
        prune_model(comp, sel, compensation_biases(model, stats, sel, arch), arch)
        prune_model(plain, sel, None, arch)
        torch.testing.assert_close(comp(x).logits, dense, rtol=1e-4, atol=1e-4)
        assert (plain(x).logits - dense).abs().max() > 1e-2
