"""How far a teacher with its own tokenizer reads as the same teacher would with the student's, token by token.

    python bench/cross_views.py                 # the embedded pair: tiny-llama-teacher-subword against tiny-llama-teacher-m
    python bench/cross_views.py --solutions 200 --top-k 8

The two embedded teachers are one recipe (architecture, seed, data, steps) built with two tokenizers: the
student's word level (teacher-m) and the subword one that takes numbers digit by digit (teacher-subword). Both
solve arith. Both read the gold solutions of arith's test split as the student tokenizes them: teacher-m directly,
teacher-subword through `teachers.cross` (its mapped top-k list and tail bucket). At each student token the
forward KL from the subword teacher's list to teacher-m's distribution, and whether their most likely tokens
agree, by kind of token, with each teacher token's mass on the student token of its own text and with the
spelled split (`teachers.cross.Aligned._spell`, model.teacher_spelling): what the cross-tokenizer reading costs
where the two tokenizers cut alike and where they do not. Runs both teachers' forwards on the CPU (seconds).
"""

from __future__ import annotations

import argparse
from collections import defaultdict


def kind(token: str) -> str:
    if token.isdigit():
        return "number, 2 digits (2 subword tokens)" if len(token) > 1 else "number, 1 digit"
    return "end of sequence" if token == "</s>" else "word or symbol"


def main() -> None:
    import torch

    from grpokd.data import sources
    from grpokd.models import loading
    from grpokd.models.lm import completion_logits, tokenize_prompts, tokenize_targets
    from grpokd.objectives.kd import sparse_divergences
    from grpokd.objectives.logits import per_position
    from grpokd.teachers.cross import CrossTokenizer
    from grpokd.teachers.sources import InProcess, Texts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solutions", type=int, default=200, help="arith test solutions read")
    parser.add_argument("--top-k", type=int, default=8, help="the subword teacher's list (model.teacher_top_k)")
    args = parser.parse_args()
    student_tok = loading.load_tokenizer("tiny-llama-student")
    same = loading.load_model("tiny-llama-teacher-m")
    subword_tok, subword = loading.load_tokenizer("tiny-llama-teacher-subword"), loading.load_model("tiny-llama-teacher-subword")
    examples = sources.arith().test[: args.solutions]
    prompts = tokenize_prompts(student_tok, [ex.prompt for ex in examples], 64)
    solutions = tokenize_targets(student_tok, [ex.solution for ex in examples], 48)
    with torch.no_grad():
        logits = completion_logits(same, prompts, solutions, len(student_tok))  # [N, T, V]
    rows = defaultdict(lambda: [0, {}, {}])  # kind -> [tokens, {spell: KL sum}, {spell: agreements}]
    for spell in (False, True):
        cross = CrossTokenizer(InProcess(subword, "subword"), subword_tok, student_tok, lambda question, _: question, True, 64,
                               [student_tok.eos_token_id], "tiny-llama-teacher-subword", spell=spell)
        signal = cross.signal(prompts, solutions, len(student_tok), Texts([ex.prompt for ex in examples], [""] * len(examples)))
        index, logp, tail = signal.top_k(args.top_k, 1.0)  # [N, T, k] in the student's tokens
        top_k = (index[..., None, :], logp[..., None, :], tail[..., None], torch.ones_like(tail[..., None]))
        kl = per_position(logits, lambda z, *sig: sparse_divergences(z, *sig, tau=1.0, reverse=False), *top_k)  # [N, T]
        agree = index[..., 0] == logits.argmax(-1)  # [N, T]
        for n, ids in enumerate(solutions.ids.tolist()):
            for t, token in enumerate(student_tok.convert_ids_to_tokens(ids)):
                if solutions.mask[n, t]:
                    row = rows[kind(token)]
                    row[0] += not spell
                    row[1][spell] = row[1].get(spell, 0.0) + float(kl[n, t])
                    row[2][spell] = row[2].get(spell, 0) + bool(agree[n, t])
    print("| student token | tokens | KL, unspelled | most likely agrees | KL, spelled | most likely agrees |")
    print("|---|---|---|---|---|---|")
    for name, (count, kl_sum, agreed) in sorted(rows.items()):
        print(f"| {name} | {count} | {kl_sum[False] / count:.3f} | {agreed[False] / count:.1%} | {kl_sum[True] / count:.3f} | {agreed[True] / count:.1%} |")
    print(f"({len(examples)} arith test solutions; KL(the subword teacher's top-{args.top_k} list and tail || teacher-m))")


if __name__ == "__main__":
    main()
