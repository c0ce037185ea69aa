"""The embedded zoo: built once, cached by recipe, and teachers clearly better than the student."""

from __future__ import annotations

import json

import pytest
import torch

from grpokd.models import zoo


def test_builds_are_cached_by_recipe_even_when_first_used_under_no_grad(monkeypatch, tmp_path):
    monkeypatch.setenv("GRPOKD_CACHE", str(tmp_path))
    monkeypatch.setitem(zoo.ZOO, "test-t5", zoo.Recipe("t5", d_model=32, layers=1, heads=2, d_ff=64, steps=3, batch_size=4))
    with torch.no_grad():  # e.g. a scoring helper that loads a teacher for the first time
        first = zoo.ensure("test-t5")
    report = json.loads((first / "build.json").read_text())
    assert report["final_loss"] == report["final_loss"]  # trained (not NaN)
    assert (first / "config.json").exists() and (first / "tokenizer.json").exists()
    stamp = (first / "build.json").stat().st_mtime_ns
    assert zoo.ensure("test-t5") == first and (first / "build.json").stat().st_mtime_ns == stamp  # cached
    monkeypatch.setitem(zoo.ZOO, "test-t5", zoo.Recipe("t5", d_model=32, layers=1, heads=2, d_ff=64, steps=4, batch_size=4))
    assert zoo.ensure("test-t5") != first  # a changed recipe rebuilds


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_embedded_teachers_are_clearly_better_than_the_student(family):
    accuracy = {name: json.loads((zoo.ensure(name) / "build.json").read_text())["accuracy_arith"] for name in zoo.ZOO if f"-{family}-" in name}
    student = accuracy.pop(f"tiny-{family}-student")
    assert accuracy and all(acc >= 2 * student for acc in accuracy.values()), (student, accuracy)
