"""A teacher with its own tokenizer (`grpokd.teachers.cross`): the same-tokenizer teacher forced through the
cross-tokenizer path gives the direct path's signal, and hand-built chunks share their log-probs as documented."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from grpokd.models import loading
from grpokd.models.lm import Tokens, completion_logits, generate, token_logp, tokenize_prompts
from grpokd.objectives.kd import sparse_divergences
from grpokd.teachers import TeacherEnsemble, Uniform
from grpokd.teachers.cross import CrossTokenizer, Layout, spread
from grpokd.teachers.sources import InProcess, Texts

QUESTIONS = ["what is 3 + 4 ?", "what is 12 - 5 ?", "tom has 6 apples and eats 2 . how many are left ?"]


@pytest.fixture(scope="module")
def rollout():
    """3 prompts x 4 sampled completions of the embedded causal student, and its logits on them."""
    torch.manual_seed(0)
    tokenizer = loading.load_tokenizer("tiny-llama-student")
    student = loading.load_model("tiny-llama-student")
    prompts = tokenize_prompts(tokenizer, QUESTIONS, 64)
    completions = generate(student, tokenizer, prompts, 4, 24, do_sample=True, temperature=1.0, top_k=0)
    with torch.no_grad():
        logits = completion_logits(student, prompts, completions, len(tokenizer))  # [12, T, V]
    return tokenizer, prompts, completions, logits


def forced(tokenizer, teacher) -> CrossTokenizer:
    """The teacher through the cross-tokenizer path although its tokenizer is the student's."""
    return CrossTokenizer(InProcess(teacher, "m"), tokenizer, tokenizer, lambda question, _: question, True, 64, [tokenizer.eos_token_id], "model.teachers[0]")


def test_a_same_tokenizer_teacher_through_the_cross_path_equals_the_direct_path(rollout):
    tokenizer, prompts, completions, student_logits = rollout
    teacher = loading.load_model("tiny-llama-teacher-m")
    texts = Texts(QUESTIONS, [""] * 3)
    assert (completions.mask.sum(-1) > 1).all() and (completions.mask == 0).any()  # completions of several lengths
    direct = TeacherEnsemble([InProcess(teacher, "m")], Uniform(), top_k=8)
    cross = TeacherEnsemble([forced(tokenizer, teacher)], Uniform(), top_k=8)
    a = direct.score(prompts, completions, student_logits, len(tokenizer), forward=True, logp=True)
    b = cross.score(prompts, completions, student_logits, len(tokenizer), forward=True, logp=True, texts=texts)
    mask = completions.mask.bool()
    assert torch.allclose(a.logp[:, mask], b.logp[:, mask], atol=1e-5)  # every chunk is one token: exact
    top_a, top_b = a.mixture.top_k, b.mixture.top_k
    # the cross path keeps tokens with a text (no <s>, <pad>, <unk>): where the direct list holds none, the lists are equal
    mapped = cross.teachers[0].vocabulary
    mask = mask & (mapped[top_a.index] >= 0).all(-1).all(-1)  # [N, T]
    assert mask.sum() > 0.8 * completions.mask.sum()
    assert torch.equal(top_a.index[mask], top_b.index[mask])
    assert torch.allclose(top_a.logp[mask], top_b.logp[mask], atol=1e-5) and torch.allclose(top_a.tail[mask], top_b.tail[mask], atol=1e-5)
    assert torch.equal(top_b.weight[mask], torch.ones_like(top_b.weight[mask]))  # a view at every position
    assert torch.allclose(a.metrics["kl_fwd"], b.metrics["kl_fwd"], rtol=0.05)  # the metric reads a top-64 list, the direct one all V

    def kd(top_k, logits):  # forward KD from the student's logits, and its gradient
        logits = logits.clone().requires_grad_(True)
        loss = (sparse_divergences(logits, top_k.index, top_k.logp, top_k.tail, top_k.weight, 1.0, False) * mask).sum()
        loss.backward()
        return loss, logits.grad

    (loss_a, grad_a), (loss_b, grad_b) = kd(top_a, student_logits), kd(top_b, student_logits)
    assert loss_a > 0 and torch.allclose(loss_a, loss_b, atol=1e-4) and torch.allclose(grad_a, grad_b, atol=1e-6)


def test_a_chunk_shares_its_teacher_log_prob_evenly_and_positions_inside_a_teacher_token_have_no_view():
    # one row, student tokens s0 s1 | s2 (chunks 0, 0, 1), teacher tokens u0 | u1 u2 (chunks 0, 1, 1), then padding
    layout = Layout(
        teacher=Tokens(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 0]])),
        student_chunk=torch.tensor([[0, 0, 1, -1]]), teacher_chunk=torch.tensor([[0, 1, 1, -1]]),
        members=torch.tensor([[2, 1]]), where=torch.tensor([[0, 0, 1, 0]]), defined=torch.tensor([[True, False, True, False]]),
        spelled=torch.tensor([[False, False, True, False]]),
    )
    shared = spread(torch.tensor([[-1.0, -0.5, -0.25, -7.0]]), layout)
    assert shared.tolist() == [[-0.5, -0.5, -0.75, 0.0]]  # chunk 0: -1 shared by two; chunk 1: -0.5 - 0.25; padding 0


def test_the_teachers_end_token_answers_for_the_students(rollout):
    tokenizer, _, completions, _ = rollout
    source = forced(tokenizer, loading.load_model("tiny-llama-teacher-m"))
    layout = source.layout(completions)
    ended = (completions.ids == tokenizer.eos_token_id) & completions.mask.bool()
    assert ended.any()
    assert torch.equal(layout.teacher.ids[layout.teacher.mask.bool()], completions.ids[completions.mask.bool()])  # the same tokens, ends included
    assert source.vocabulary[tokenizer.eos_token_id] == tokenizer.eos_token_id


def test_a_teacher_without_a_view_at_a_position_gets_no_weight_there_and_the_others_share_it():
    """TopKMixer with two teachers, the second defined at positions 0 and 2 only: uniform weights where both
    have a view, the first alone where only it has one; with no teacher defined, no weight (no KD there)."""
    from grpokd.teachers import TopKMixer
    from grpokd.teachers.sources import Dense

    class Partly(NamedTuple):  # a signal with a view at some positions only, as a teacher with its own tokenizer has
        dense: Dense
        where: torch.Tensor

        def top_k(self, k, tau, keep=None):
            return self.dense.top_k(k, tau)

        def defined(self):
            return self.where

        def unmatched(self, k, tau):
            return None

    torch.manual_seed(0)
    a, b = Dense(torch.randn(1, 3, 10)), Dense(torch.randn(1, 3, 10))
    for given in ("weight", "log_weight"):
        mixer = TopKMixer(1.0, 4)
        for signal in (a, Partly(b, torch.tensor([[True, False, True]]))):
            mixer.add(signal, **{given: torch.full((1, 3), 0.5 if given == "weight" else 0.0)})
        assert mixer.result().top_k.weight.tolist() == [[[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]]]
    mixer = TopKMixer(1.0, 4)
    mixer.add(Partly(b, torch.tensor([[True, False, False]])), weight=torch.ones(1, 3))
    top_k = mixer.result().top_k
    assert top_k.weight.tolist() == [[[1.0], [0.0], [0.0]]]
    kd = sparse_divergences(torch.randn(1, 3, 10), top_k.index, top_k.logp, top_k.tail, top_k.weight, 1.0, False)
    assert kd[0, 0] > 0 and kd[0, 1:].tolist() == [0.0, 0.0]


def test_an_empty_completion_has_no_teacher_tokens_and_zero_log_probs(rollout):
    """A completion masked out whole (`rollout.mask_truncated_completions`) reads as empty text."""
    tokenizer, prompts, completions, _ = rollout
    masked = Tokens(completions.ids, completions.mask.clone())
    masked.mask[0] = 0
    source = forced(tokenizer, loading.load_model("tiny-llama-teacher-m"))
    signal = source.signal(prompts, masked, len(tokenizer), Texts(QUESTIONS, [""] * 3))
    assert signal.layout.teacher.mask[0].sum() == 0 and not signal.layout.defined[0].any()
    logp = signal.token_logp(masked.ids, 1.0)
    assert logp[0].eq(0).all() and logp[1:][masked.mask[1:].bool()].lt(0).all()


def test_the_subword_tokenizer_takes_numbers_digit_by_digit_and_reads_back_the_same_text():
    from grpokd.models.tokenizer import build_tokenizer

    words, subword = build_tokenizer("llama"), build_tokenizer("llama", "subword")
    text = "16 - 13 = 3 . #### 3"
    ids = subword(text, add_special_tokens=False)["input_ids"]
    assert subword.convert_ids_to_tokens(ids) == ["1", "~~6", "-", "1", "~~3", "=", "3", ".", "####", "3"]
    assert subword.decode(ids) == text == words.decode(words(text, add_special_tokens=False)["input_ids"])
    assert subword.eos_token_id != words.eos_token_id and subword.convert_ids_to_tokens(0) != words.convert_ids_to_tokens(0)  # other ids


def test_the_embedded_subword_teacher_scores_the_students_text_as_it_scores_it_on_its_own(rollout):
    """The teacher that does not share the student's tokenizer (tiny-llama-teacher-subword): a number of two digits
    is one student token and two teacher tokens, and each completion's aligned log-probs sum to the teacher's own
    log-prob of the completion's text (end token included); a one-digit token carries its teacher token's value."""
    tokenizer, prompts, completions, _ = rollout
    teacher_tok = loading.load_tokenizer("tiny-llama-teacher-subword")
    teacher = loading.load_model("tiny-llama-teacher-subword")
    source = CrossTokenizer(InProcess(teacher, "subword"), teacher_tok, tokenizer, lambda question, _: question, True, 64, [tokenizer.eos_token_id], "model.teachers[0]")
    signal = source.signal(prompts, completions, len(tokenizer), Texts([q for q in QUESTIONS for _ in range(4)], [""] * 12))
    aligned = signal.token_logp(completions.ids, 1.0)  # [N, T]
    layout = signal.layout
    assert (layout.members.max(-1).values == 1).all() and (layout.teacher.mask.sum(-1) > completions.mask.sum(-1)).any()  # some chunks have two teacher tokens
    assert layout.defined[completions.mask.bool()].all()  # every student token starts a word, so the teacher has a view there
    for row in range(len(completions.ids)):
        content = completions.ids[row][completions.mask[row].bool()].tolist()
        ended = content[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(content[:-1] if ended else content)
        own_ids = teacher_tok(text, add_special_tokens=False)["input_ids"] + ([teacher_tok.eos_token_id] if ended else [])
        own = Tokens(torch.tensor([own_ids]), torch.ones(1, len(own_ids), dtype=torch.long))
        own_prompt = tokenize_prompts(teacher_tok, [QUESTIONS[row // 4]], 64)
        with torch.no_grad():
            own_logp = token_logp(completion_logits(teacher, own_prompt, own, len(teacher_tok)), own.ids)[0]  # [T']
        assert torch.allclose(aligned[row].sum(), own_logp.sum(), atol=1e-3)
        assert layout.teacher.ids[row, : len(own_ids)].tolist() == own_ids
        chunks = layout.teacher_chunk[row, : len(own_ids)]
        for t, c in enumerate(layout.student_chunk[row, : len(content)].tolist()):
            if (chunks == c).sum() == 1:  # a one-digit number, a word, a symbol, the end: exactly its teacher token's
                assert torch.allclose(aligned[row, t], own_logp[chunks == c][0], atol=5e-4)  # batched and padded there, alone here
            else:  # a two-digit number: two teacher tokens, "1" then "~~6"
                assert (chunks == c).sum() == 2 and tokenizer.convert_ids_to_tokens(content[t]).isdigit()


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["confidence", "competence", "route"])
def test_teachers_of_two_tokenizers_are_mixed_under_each_weighting(weighting, tmp_path):
    """J' with teacher-m (the student's tokenizer) and teacher-subword (its own) in one ensemble, as a user types it;
    route sends arith to the subword teacher. Finite, non-zero KD; each teacher's mean weight is logged."""
    import csv
    import math

    from conftest import compose

    from grpokd.train import train

    routes = ["weighting.routes.arith=tiny-llama-teacher-subword"] if weighting == "route" else []
    run = tmp_path / weighting
    results = train(compose([
        "objective=j1", f"weighting={weighting}", *routes, "model.teachers=[tiny-llama-teacher-m,tiny-llama-teacher-subword]",
        "model.teacher_top_k=8", "logger=none", "log.csv=true", "eval_pass_k=0", "eval_before=false", "data.val_size=4", "data.test_size=4",
        "data.prompts_per_step=2", "group_size=2", "trainer.max_steps=2",
    ], run))
    assert results["status"] == "complete"
    rows = [r for r in csv.DictReader((run / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    assert len(rows) == 2 and all(math.isfinite(float(r["train/kd"])) and float(r["train/kd"]) > 0 for r in rows)
    weights = [[float(r[f"train/teacher/weight/{name}"]) for name in ("tiny-llama-teacher-m", "tiny-llama-teacher-subword")] for r in rows]
    assert all(abs(sum(w) - 1) < 1e-4 for w in weights), weights
    if weighting == "route":
        assert all(w == [0.0, 1.0] for w in weights), weights
    else:
        assert all(0 < w[1] < 1 for w in weights), weights


def test_a_word_the_teacher_spells_in_two_tokens_gets_the_mass_of_its_spelling_by_hand():
    """The student's "18" is the subword teacher's "1" then "~~8". Hand-set teacher views: before it p("1") = 0.6,
    p("3") = 0.4; after "1", p("~~8") = 0.5, p("~~2") = 0.25, p(".") = 0.25 (the number ends there). The student's
    list: "3" 0.4, "18" 0.6 * 0.5 = 0.3, "12" 0.15, and "1" what is left of p("1"), 0.15. Unspelled, "1" has 0.6."""
    from grpokd.models.tokenizer import build_tokenizer
    from grpokd.teachers.cross import Aligned
    from grpokd.teachers.sources import Dense

    student, teacher = build_tokenizer("llama"), build_tokenizer("llama", "subword")
    s, t = student.get_vocab(), teacher.get_vocab()
    completions = Tokens(torch.tensor([[s["18"], s["</s>"]]]), torch.ones(1, 2, dtype=torch.long))
    views = torch.full((1, 3, len(teacher)), -40.0)  # [1, T', V_teacher] log-probs; the rest of the vocabulary ~ 0
    views[0, 0, [t["1"], t["3"]]] = torch.tensor([0.6, 0.4]).log()
    views[0, 1, [t["~~8"], t["~~2"], t["."]]] = torch.tensor([0.5, 0.25, 0.25]).log()
    for spell, expected in ((True, {"3": 0.4, "18": 0.3, "12": 0.15, "1": 0.15}), (False, {"1": 0.6, "3": 0.4})):
        source = CrossTokenizer(InProcess(loading.load_model("tiny-llama-teacher-subword"), "sub"), teacher, student, lambda q, _: q, True, 8,
                                [s["</s>"]], "model.teachers[0]", spell=spell)
        layout = source.layout(completions)
        assert layout.teacher.ids[0].tolist() == [t["1"], t["~~8"], t["</s>"]] and layout.spelled[0].tolist() == [spell, False]
        index, logp, tail = Aligned(Dense(views), layout, source.vocabulary, source.spellings, len(student)).top_k(4, 1.0)
        got = {student.convert_ids_to_tokens(i): p for i, p in zip(index[0, 0].tolist(), logp[0, 0].exp().tolist()) if p > 1e-6}
        assert got.keys() == expected.keys() and all(abs(got[w] - p) < 1e-5 for w, p in expected.items()), got
        assert tail[0, 0].exp() < 1e-5
    index, logp, tail = Aligned(Dense(views), source.layout(completions), source.vocabulary, source.spellings, len(student)).top_k(2, 1.0)
    assert tail[0, 0].exp().item() == pytest.approx(0.0, abs=1e-5)  # unspelled, "1" and "3" hold it all


def test_the_spelled_split_reads_two_digit_numbers_as_the_same_teacher_with_the_students_tokenizer(rollout):
    """On gold arith solutions, the subword teacher's spelled list agrees with teacher-m (the same recipe on the
    student's tokenizer) at every two-digit number; unspelled, it names the first digit there (bench/cross_views.py)."""
    from grpokd.data import sources
    from grpokd.models.lm import tokenize_targets

    tokenizer = rollout[0]
    examples = sources.arith().test[:40]
    prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in examples], 64)
    solutions = tokenize_targets(tokenizer, [ex.solution for ex in examples], 48)
    with torch.no_grad():
        same = completion_logits(loading.load_model("tiny-llama-teacher-m"), prompts, solutions, len(tokenizer)).argmax(-1)  # [N, T]
    words = [tokenizer.convert_ids_to_tokens(row) for row in solutions.ids.tolist()]
    two_digit = torch.tensor([[w.isdigit() and len(w) == 2 for w in row] for row in words]) & solutions.mask.bool()
    assert two_digit.sum() > 20
    teacher_tok, teacher = loading.load_tokenizer("tiny-llama-teacher-subword"), loading.load_model("tiny-llama-teacher-subword")
    firsts = {}
    for spell in (True, False):
        source = CrossTokenizer(InProcess(teacher, "sub"), teacher_tok, tokenizer, lambda q, _: q, True, 64, [tokenizer.eos_token_id], "t", spell=spell)
        index, _, _ = source.signal(prompts, solutions, len(tokenizer), Texts([ex.prompt for ex in examples], [""] * len(examples))).top_k(8, 1.0)
        firsts[spell] = index[..., 0]
    mask = solutions.mask.bool()
    assert torch.equal(firsts[True][mask], same[mask])  # every position, the two-digit numbers included
    first_digit = torch.tensor([[tokenizer.convert_tokens_to_ids(w[0]) for w in row] for row in words])
    assert torch.equal(firsts[False][two_digit], first_digit[two_digit])  # unspelled: "1" where the answer is "18"


def test_golds_hybrid_reads_the_teachers_unmatched_tokens_and_the_students_by_hand():
    """model.teacher_unmatched=uld: before the student's "18" the teacher's view has p("1") = 0.5, p("3") = 0.4 and
    p("~~8") = 0.1; "~~8" (a continuing digit) has no student token of its text, so it heads the unmatched list,
    which the student's two-digit numbers face (they have no teacher token of their text), and "1" and "3" do not.
    The share of the distance is GOLD's: 1 - matched / the teacher's vocabulary. Without it, no unmatched part."""
    from grpokd.models.tokenizer import build_tokenizer
    from grpokd.teachers.cross import Aligned
    from grpokd.teachers.sources import Dense

    student, teacher = build_tokenizer("llama"), build_tokenizer("llama", "subword")
    s, t = student.get_vocab(), teacher.get_vocab()
    completions = Tokens(torch.tensor([[s["18"], s["</s>"]]]), torch.ones(1, 2, dtype=torch.long))
    views = torch.full((1, 3, len(teacher)), -40.0)
    views[0, 0, [t["1"], t["3"], t["~~8"]]] = torch.tensor([0.5, 0.4, 0.1]).log()
    model = InProcess(loading.load_model("tiny-llama-teacher-subword"), "sub")
    for uld in (False, True):
        source = CrossTokenizer(model, teacher, student, lambda q, _: q, True, 8, [s["</s>"]], "model.teachers[0]", uld=uld)
        aligned = Aligned(Dense(views), source.layout(completions), source.vocabulary, source.spellings, len(student), source.share)
        if not uld:
            assert source.share == 0.0 and aligned.unmatched(4, 1.0) is None
            continue
        matched = int((source.vocabulary >= 0).sum())
        assert 0 < matched < len(teacher) and source.share == pytest.approx(1 - matched / len(teacher))
        logp, student_side, share = aligned.unmatched(4, 1.0)
        assert logp.shape == (1, 2, 4) and share.item() == pytest.approx(source.share)
        assert logp[0, 0, 0].exp().item() == pytest.approx(0.1, abs=1e-6) and (logp[0, 0, 1:].exp() < 1e-6).all()
        assert (logp[0, 0].diff() <= 0).all()  # descending
        assert student_side[s["18"]] and student_side[s["20"]] and not student_side[s["1"]] and not student_side[s["3"]]
        assert not student_side[s["</s>"]]  # the teacher's end token answers for it
        assert int((~student_side).sum()) == len(set(source.vocabulary[source.vocabulary >= 0].tolist()))


@pytest.mark.slow
def test_a_run_with_golds_hybrid_as_a_user_types_it(tmp_path):
    """J' taught by the subword teacher with model.teacher_unmatched=uld: finite, non-zero KD in the logged metrics."""
    import csv
    import math

    from conftest import compose

    from grpokd.train import train

    results = train(compose([
        "objective=j1", "model.teachers=[tiny-llama-teacher-subword]", "model.teacher_top_k=8", "model.teacher_unmatched=uld",
        "model.teacher_spelling=false", "logger=none", "log.csv=true", "eval_pass_k=0", "eval_before=false", "data.val_size=4",
        "data.test_size=4", "data.prompts_per_step=2", "group_size=2", "trainer.max_steps=2",
    ], tmp_path))
    assert results["status"] == "complete"
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    assert len(rows) == 2 and all(math.isfinite(float(r["train/kd"])) and float(r["train/kd"]) > 0 for r in rows)
