"""RAM / RAM+ (mergekit's ram, ramplus_tl): unique contributions kept, shared ones averaged."""

from __future__ import annotations

import torch

from mergewise import METHODS, merge_state_dicts
from mergewise.methods.ram import ram_merge, ramplus_tl_merge

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
# entry:      0     1     2     3      4
D1 = torch.tensor([2.0, 0.0, 4.0, 1e-6, -3.0])
D2 = torch.tensor([0.0, 0.0, 2.0, 6.0, -1.0])
D3 = torch.tensor([0.0, 5.0, 0.0, 0.0, -2.0])


def test_registration() -> None:
    for name in ("ram", "ramplus_tl"):
        m = METHODS.get(name)
        assert m.space == "delta" and m.requires_base and m.model_params == ()


def test_ram_keeps_unique_and_averages_shared() -> None:
    # counts (|tau| > 1e-5): [1, 1, 2, 1, 3]: entry 3's 1e-6 is no contribution
    # merged tau: [2, 5, (4 + 2) / 2, 6, (-3 - 1 - 2) / 3]
    out = ram_merge(BASE, [D1, D2, D3], [1.0] * 3)
    assert torch.equal(out, BASE + torch.tensor([2.0, 5.0, 3.0, 6.0, -2.0]))


def test_ramplus_boosts_unique_entries_by_each_models_overlap() -> None:
    # model 1: contributes at 0, 2, 4 (3 is below epsilon): unique {0}, shared {2, 4}
    #   rho = 2 / 1 = 2, clipped to alpha 0.2: lambda = 1 + 0.1 * 0.2 = 1.02
    # model 2: at 2, 3, 4: unique {3}, shared {2, 4}: lambda 1.02
    # model 3: at 1, 4: unique {1}, shared {4}: rho 1 -> 0.2: lambda 1.02
    out = ramplus_tl_merge(BASE, [D1, D2, D3], [1.0] * 3)
    lam = 1 + 0.1 * torch.tensor(0.2)  # float32, as mergekit
    want = torch.stack([2.0 * lam, 5.0 * lam, torch.tensor(3.0), 6.0 * lam, torch.tensor(-2.0)])
    assert torch.allclose(out, BASE + want, rtol=0, atol=1e-6)
    # a large alpha lets the ratio through: model 1's lambda = 1 + 0.1 * 2
    out = ramplus_tl_merge(BASE, [D1, D2, D3], [1.0] * 3, alpha=10.0)
    assert torch.allclose(out[0], BASE[0] + 2.0 * 1.2, rtol=0, atol=1e-6)


def test_api_and_tadrop_block() -> None:
    base = {"w": BASE.clone()}
    models = [{"w": BASE + d} for d in (D1, D2, D3)]
    out = merge_state_dicts(base, models, "ram")
    assert torch.equal(out["w"], ram_merge(BASE, [D1, D2, D3], [1.0] * 3))
    merged = merge_state_dicts(base, models, "ram", sparsify={"method": "magnitude", "density": 0.4})
    # each task vector keeps its top 2 entries first
    kept = [torch.tensor([0, 0, 4.0, 0, -3.0]), torch.tensor([0, 0, 2.0, 6.0, 0]),
            torch.tensor([0, 5.0, 0, 0, -2.0])]
    assert torch.equal(merged["w"], ram_merge(BASE, kept, [1.0] * 3))
