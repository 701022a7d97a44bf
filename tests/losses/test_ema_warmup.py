"""Mean-teacher warm-up of the EMA momentum."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunet_kd.losses.ema import ema_update, warmed_up_momentum


def test_schedule_values():
    assert [warmed_up_momentum(s, 0.99) for s in (0, 1, 3, 9)] == pytest.approx([0.0, 0.5, 0.75, 0.9])
    assert warmed_up_momentum(98, 0.99) == pytest.approx(1 - 1 / 99)
    assert warmed_up_momentum(99, 0.99) == pytest.approx(0.99)  # 1 - 1/100 reaches the configured value
    assert warmed_up_momentum(10_000, 0.99) == 0.99
    assert warmed_up_momentum(5, 0.0) == 0.0
    with pytest.raises(ValueError):
        warmed_up_momentum(-1, 0.99)
    with pytest.raises(ValueError):
        warmed_up_momentum(0, 1.5)


def test_first_update_copies_and_later_ones_average():
    torch.manual_seed(0)
    online, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    ema_update(ema, online, warmed_up_momentum(0, 0.99))
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), online.parameters()))
    first = [p.detach().clone() for p in online.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    ema_update(ema, online, warmed_up_momentum(1, 0.99))  # the mean of the two networks
    for e, a, b in zip(ema.parameters(), first, online.parameters()):
        assert torch.allclose(e, (a + b) / 2)
