"""The embedded zoo: built once by `python -m grpokd.zoo build`, found by recipe key, and teachers clearly better than the student."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from grpokd import zoo as builder
from grpokd.errors import ConfigError
from grpokd.models import loading, zoo

REPORT_FIELDS = {
    "name", "recipe", "params", "final_loss", "train_seconds",
    "accuracy_arith", "accuracy_arith_mc", "arith_train_pass1_t1", "arith_train_pass8_t1",
}
TINY = zoo.Recipe("t5", d_model=32, layers=1, heads=2, d_ff=64, steps=3, batch_size=4)


def test_builds_are_cached_by_recipe_and_loading_never_trains(monkeypatch, tmp_path):
    monkeypatch.setenv("GRPOKD_CACHE", str(tmp_path))
    monkeypatch.setitem(zoo.ZOO, "test-t5", TINY)
    with pytest.raises(ConfigError, match=r"recipe key \w{12}.*python -m grpokd\.zoo build test-t5"):
        zoo.ensure("test-t5")  # not built yet: finding never trains
    with torch.no_grad():  # e.g. a script that builds inside its own no_grad block
        first = builder.build("test-t5")
    assert first == tmp_path / "zoo" / f"test-t5-{zoo.recipe_key(TINY)}"
    report = json.loads((first / "build.json").read_text())
    assert set(report) == REPORT_FIELDS
    assert report["final_loss"] == report["final_loss"]  # trained (not NaN)
    assert 0 <= report["arith_train_pass1_t1"] <= report["arith_train_pass8_t1"] <= 1
    assert (first / "config.json").exists() and (first / "tokenizer.json").exists()
    assert_portable_tokenizer_config(first)
    assert zoo.ensure("test-t5") == first and loading.resolve("test-t5").where == str(first)
    stamp = (first / "build.json").stat().st_mtime_ns
    assert builder.build("test-t5") == first and (first / "build.json").stat().st_mtime_ns == stamp  # cached, not rebuilt

    monkeypatch.setitem(zoo.ZOO, "test-t5", replace(TINY, steps=4))
    with pytest.raises(ConfigError, match=r"^[^\n]*python -m grpokd\.zoo build test-t5`$"):  # one line
        zoo.ensure("test-t5")  # a changed recipe is not served the old build
    with pytest.raises(ConfigError, match=r"^model\.student: embedded model test-t5: .*python -m grpokd\.zoo build test-t5"):
        loading.check_name("test-t5", "model.student")  # so a run stops at start-up, before anything trains
    second = builder.build("test-t5")
    assert second != first and zoo.ensure("test-t5") == second


def test_a_recipes_tasks_are_in_its_key_and_its_training_data():
    """A specialist (one task) is its own build, trained on its task alone and scored on both; a recipe at the default
    tasks keeps the key it had before the field existed, so the builds shipped before it are still found."""
    specialist = replace(TINY, tasks=("arith",))
    assert len({zoo.recipe_key(TINY), zoo.recipe_key(specialist), zoo.recipe_key(replace(TINY, tasks=("arith_mc",)))}) == 3
    assert zoo.recipe_key(replace(TINY, tasks=("arith", "arith_mc"))) == zoo.recipe_key(TINY)
    for report in zoo.EMBEDDED_DIR.glob("*/build.json"):  # a report's recipe (written without `tasks` before the field) gives its folder's key
        build = json.loads(report.read_text())
        recipe = zoo.Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in build["recipe"].items()})
        assert report.parent.name == f"{build['name']}-{zoo.recipe_key(recipe)}"
    train, splits = builder.training_data(specialist)
    assert train == splits["arith"].train and set(splits) == {"arith", "arith_mc"}
    assert builder.training_data(replace(TINY, tasks=("arith_mc",)))[0] == splits["arith_mc"].train
    assert builder.training_data(TINY)[0] == splits["arith"].train + splits["arith_mc"].train


def test_ship_copies_a_build_into_the_package_and_drops_older_recipes(monkeypatch, tmp_path):
    monkeypatch.setenv("GRPOKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "EMBEDDED_DIR", tmp_path / "embedded")
    monkeypatch.setitem(zoo.ZOO, "test-t5", TINY)
    monkeypatch.setitem(zoo.ZOO, "test-t5-other", TINY)
    cached = tmp_path / "cache" / "zoo" / zoo.folder_name("test-t5")
    for folder in (cached, zoo.EMBEDDED_DIR / "test-t5-000000000000", zoo.EMBEDDED_DIR / "test-t5-other-000000000000"):
        folder.mkdir(parents=True)
        (folder / "build.json").write_text("{}")  # a build found is not rebuilt, so nothing trains here
    shipped = builder.ship("test-t5")
    assert shipped == zoo.EMBEDDED_DIR / cached.name and zoo.ensure("test-t5") == shipped
    assert sorted(p.name for p in zoo.EMBEDDED_DIR.iterdir()) == sorted([cached.name, "test-t5-other-000000000000"])


def test_the_build_command_lists_reports_and_refuses_unknown_names(capsys):
    builder.main([])  # list: one JSON report per model, all shipped
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["name"] for line in lines] == list(zoo.ZOO)
    assert all(set(json.loads(line)) == REPORT_FIELDS | {"path"} for line in lines)
    done = subprocess.run([sys.executable, "-m", "grpokd.zoo", "build", "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: unknown embedded model 'nope'; available: {', '.join(zoo.ZOO)}"]


def test_the_model_loaders_import_nothing_from_training():
    """grpokd.models finds and loads models; training code (objectives, evaluation, rollout, module, train) imports it,
    never the reverse. Covers zoo.py, loading.py and convert.py for now: lm.py and ensemble.py still import
    grpokd.objectives (being moved)."""
    upward = ("grpokd.objectives", "grpokd.evaluation", "grpokd.rollout", "grpokd.module", "grpokd.train")
    models = Path(zoo.__file__).parent
    for path in (models / "zoo.py", models / "loading.py", models / "convert.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad = [n for n in names if any(n == u or n.startswith(f"{u}.") for u in upward)]  # `from grpokd import rollout` too
            assert not bad, f"{path.name}:{node.lineno} imports {bad[0]}"


def test_every_embedded_model_ships_with_the_package():
    """A recipe or task change without `python -m grpokd.zoo build --ship` would leave a fresh install without the model."""
    for name, recipe in zoo.ZOO.items():
        shipped = zoo.EMBEDDED_DIR / f"{name}-{zoo.recipe_key(recipe)}"
        assert (shipped / "build.json").exists(), f"{name}: no shipped build for the current recipe; run python -m grpokd.zoo build --ship {name}"
        assert zoo.ensure(name) == shipped
    assert len(list(zoo.EMBEDDED_DIR.glob("*/build.json"))) == len(zoo.ZOO)  # no stale copies left behind


def assert_portable_tokenizer_config(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast", folder.name  # transformers 5 writes TokenizersBackend, which 4.x cannot load
    assert config["model_input_names"] == ["input_ids", "attention_mask"], folder.name  # else 4.x's fast tokenizer adds token_type_ids


def test_every_shipped_tokenizer_loads_under_transformers_4_and_5():
    """A rebuild under transformers 5 that skips grpokd.zoo.portable_tokenizer_config would ship tokenizers 4.x cannot load."""
    shipped = sorted(zoo.EMBEDDED_DIR.glob("*/tokenizer_config.json"))
    assert len(shipped) == len(zoo.ZOO)
    for path in shipped:
        assert_portable_tokenizer_config(path.parent)


def test_a_model_loads_in_the_dtype_asked_for():
    """from_pretrained(dtype=) arrived in transformers 4.56; older releases ignore it and load float32."""
    model = loading.load_model("tiny-t5-student", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def build(name: str) -> dict:
    return json.loads((zoo.ensure(name) / "build.json").read_text())


def test_the_causal_testbed_leaves_room_for_rl_and_distillation():
    """The issue's testbed targets, on the shipped build reports (200 held-out problems per task)."""
    student = build("tiny-llama-student")
    assert 0.15 <= student["accuracy_arith"] <= 0.40  # half-knows the numeric task
    assert student["arith_train_pass8_t1"] >= 2 * student["arith_train_pass1_t1"]  # groups carry reward variance
    for name in ("tiny-llama-teacher-s", "tiny-llama-teacher-m", "tiny-llama-teacher-subword"):
        teacher = build(name)
        for task in ("accuracy_arith", "accuracy_arith_mc"):
            assert teacher[task] >= 2.5 * student[task], (name, task, teacher[task], student[task])
        assert teacher["accuracy_arith_mc"] >= 0.6


def test_t5_teachers_are_far_better_than_the_t5_student_on_arith():
    """The issue's 2.5x holds for the T5 family on the numeric task; on arith_mc every T5 is at chance (README)."""
    student = build("tiny-t5-student")["accuracy_arith"]
    for name in ("tiny-t5-teacher-s", "tiny-t5-teacher-m"):
        assert build(name)["accuracy_arith"] >= 2.5 * student, name
