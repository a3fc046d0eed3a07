"""The time budget: durations as users write them, settings scaled to fit a predicted
time, and the choice written into the summary and the recipe."""

from __future__ import annotations

import pytest

from datafree.toolchain import budget
from datafree.toolchain.errors import UserError
from datafree.toolchain.recipe import Recipe


@pytest.mark.parametrize("text,seconds", [("300", 300), (90, 90), ("90s", 90), ("5m", 300), ("5min", 300),
                                          ("1.5h", 5400), ("2m30s", 150), (" 2m 30s ", 150)])
def test_durations_are_read_as_users_write_them(text, seconds):
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "", "0", "-5m", "5x", "m", "nan"])
def test_a_duration_that_is_not_one_is_refused_naming_the_field(text):
    with pytest.raises(UserError, match="time_budget"):
        budget.parse_duration(text)


def test_the_recipe_holds_seconds():
    assert Recipe(time_budget="2m").time_budget == 120.0
    with pytest.raises(UserError, match="time_budget"):
        Recipe(time_budget="later")


ASKED = budget.Work(images=256, gen_steps=80, joint_steps=300)
T = 0.004   # seconds per image pass: a CIFAR ResNet-20 on 2 cores, about


def test_a_budget_the_recipe_fits_changes_nothing():
    full = budget.predict(ASKED, T, generates=True, prunes=True)
    chosen = budget.plan(ASKED, 2 * full, T, generates=True, prunes=True)
    assert chosen.work == ASKED and chosen.note is None


@pytest.mark.parametrize("generates,prunes", [(True, True), (True, False), (False, True)])
def test_a_tight_budget_gives_up_images_and_steps_until_the_prediction_fits(generates, prunes):
    full = budget.predict(ASKED, T, generates=generates, prunes=prunes)
    b = (1.0 + budget.T_FIXED + (full - budget.T_FIXED) / 3) / budget.SAFETY
    chosen = budget.plan(ASKED, b, T, generates=generates, prunes=prunes, spent=1.0)
    w = chosen.work
    assert chosen.predicted + 1.0 <= budget.SAFETY * b
    assert w.images < ASKED.images and w.joint_steps <= ASKED.joint_steps and w.gen_steps <= ASKED.gen_steps
    assert f"{w.images} synthetic images instead of 256" in chosen.note and "cannot be met" not in chosen.note
    assert ("generator steps" in chosen.note) == generates and ("joint steps" in chosen.note) == prunes
    # the richest plan that fits: a few more images and steps would not
    bigger = budget.Work(w.images + 4, w.gen_steps + 1, w.joint_steps + 5)
    assert budget.predict(bigger, T, generates=generates, prunes=prunes) + 1.0 > budget.SAFETY * b


def test_a_budget_below_the_least_work_is_said_to_be_unmet():
    chosen = budget.plan(ASKED, 1.0, T, generates=True, prunes=True)
    assert chosen.work.images == budget.MIN_IMAGES and chosen.work.gen_steps == budget.MIN_GEN_STEPS
    assert "cannot be met" in chosen.note


def test_compress_within_a_budget_says_what_it_gave_up_and_records_what_it_did(resnet20_bn, tmp_path, monkeypatch):
    """A budget far below what the recipe needs: fewer images and steps, said first in
    the summary, and the recipe in the result (written into the model) holds them."""
    from datafree.toolchain.compress import compress

    monkeypatch.setenv("DATAFREE_CACHE", str(tmp_path))
    result = compress(resnet20_bn, Recipe(prune=0.3, wbits=4, abits=8, synthetic=64, time_budget="8s"),
                      measure=False)
    note = next(h for h in result.summary.headline if h.startswith("time budget 8 s"))
    r = result.recipe
    assert r.time_budget is None and r.fit_budget == "full"
    assert r.synthetic < 64 and r.synthetic_steps < 80 and r.joint_steps < 300
    assert f"{r.synthetic} synthetic images instead of 64" in note
    assert any(h.startswith(f"{r.synthetic} synthetic images: optimised") for h in result.summary.headline)
