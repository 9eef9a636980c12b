"""PPO's adaptive KL coefficient, by hand: Ziegler et al.'s proportional update and its floor."""

import pytest

from jaxllm.trainers.ppo import AdaptiveKL


def test_update_is_proportional_and_clipped():
    ctl = AdaptiveKL(0.1, target=2.0, horizon=100, adaptive=True)
    ctl.update(3.0, 50)  # error 0.5 → clipped to 0.2; × (1 + 0.2 · 50 / 100)
    assert ctl.coef == pytest.approx(0.1 * 1.1)
    ctl.update(1.8, 100)  # error -0.1
    assert ctl.coef == pytest.approx(0.11 * 0.9)
    fixed = AdaptiveKL(0.1, target=2.0, horizon=100, adaptive=False)
    fixed.update(50.0, 100)
    assert fixed.coef == 0.1


def test_floor_stops_the_windup_of_the_first_iterations():
    free = AdaptiveKL(0.3, target=4.0, horizon=64, adaptive=True)
    held = AdaptiveKL(0.3, target=4.0, horizon=64, adaptive=True, floor=0.3)
    for _ in range(5):  # KL near 0 at the start: below target
        free.update(0.1, 64)
        held.update(0.1, 64)
    assert free.coef == pytest.approx(0.3 * 0.8**5) and held.coef == 0.3
    held.update(8.0, 64)  # above target: it rises from the floor at once
    assert held.coef == pytest.approx(0.36)
    held.set_state({"coef": 0.5})
    assert held.get_state() == {"coef": 0.5}
