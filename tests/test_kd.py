"""Tensor-only tests of objectives/kd.py and the teachers' mixer (grpokd.teachers.TeacherMixer): the memory-lean
mixtures against naive stacks, TA, norm_G."""

import math

import pytest
import torch
import torch.nn.functional as F

from grpokd.objectives.base import Batch, KDStates
from grpokd.objectives.functional import hinton_kd
from grpokd.objectives.kd import (
    forward_kd,
    group_normalize,
    require_kd,
    reverse_kd,
    sequence_weights,
    teacher_agreement,
)
from grpokd.teachers import TeacherMixer

N, T, V = 3, 4, 7


def logits(seed: int, scale: float = 2.0, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, T, V, generator=g) * scale).requires_grad_(grad)


def random_weights(m: int, seed: int = 100) -> torch.Tensor:
    """Position-dependent weights [M, N, T], positive, sum 1 over M."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(m, N, T, generator=g) * 2, dim=0)


def mixed(teachers: list[torch.Tensor], weights: torch.Tensor, tau: float, student: torch.Tensor) -> KDStates:
    mixer = TeacherMixer(tau, forward=True, reverse=True)
    for z, w in zip(teachers, weights):
        mixer.add(z, weight=w)
    return mixer.kd_states(student, torch.ones(N, T))


def value_and_grad(fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    student.grad = None
    value = fn()  # [N, T]
    value.sum().backward()
    return value.detach(), student.grad.clone()


# ---------------------------------------------------------------- limiting cases


@pytest.mark.parametrize("m", [1, 2, 3])
def test_kd_is_zero_when_every_teacher_is_the_student(m):
    # p_i = q for every i: forward sum_i w_i KL(q || q) = 0 and reverse likewise, whatever the weights
    student = logits(0)
    kd = mixed([student.clone() for _ in range(m)], random_weights(m), 1.5, student)
    torch.testing.assert_close(forward_kd(kd), torch.zeros(N, T), atol=1e-5, rtol=0)
    torch.testing.assert_close(reverse_kd(kd), torch.zeros(N, T), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_one_teacher_forward_kd_is_tempered_kl_times_tau_squared(tau):
    # M = 1, w = 1: pbar = p, neg_entropy = sum p log p -> tau^2 KL(softmax(z_T/tau) || softmax(z_S/tau))
    teacher, student = logits(1), logits(2)
    p = torch.softmax(teacher / tau, -1)
    q = torch.softmax(student / tau, -1)
    direct = tau**2 * (p * (p.log() - q.log())).sum(-1)  # [N, T]
    kd = mixed([teacher], torch.ones(1, N, T), tau, student)
    torch.testing.assert_close(forward_kd(kd), direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forward_kd(kd), hinton_kd(teacher, student, tau), rtol=1e-5, atol=1e-5)
    # and the reverse direction is the swap
    torch.testing.assert_close(reverse_kd(kd), hinton_kd(student, teacher, tau), rtol=1e-5, atol=1e-5)


def test_forward_kd_by_hand_two_symbols():
    # V = 2, tau = 1: teacher p = (.5, .5) (logits 0, 0), student q = (.8, .2) (logits log 4, 0)
    # KL(p || q) = .5 log(.5/.8) + .5 log(.5/.2) = .5 log(25/16) = log(5/4)
    teacher = torch.zeros(1, 1, 2)
    student = torch.tensor([[[math.log(4.0), 0.0]]])
    kd = mixed([teacher], torch.ones(1, 1, 1), 1.0, student)
    assert forward_kd(kd).item() == pytest.approx(math.log(5 / 4), rel=1e-5)
    # reverse: KL(q || p) = .8 log 1.6 + .2 log .4
    assert reverse_kd(kd).item() == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4), rel=1e-5)


# ---------------------------------------------------------------- lean mixture = naive per-teacher sum


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_mixture_equals_naive_weighted_sum_value_and_gradient(m, tau):
    teachers = [logits(10 + i) for i in range(m)]
    weights = random_weights(m)  # [M, N, T] position-dependent
    student = logits(0, grad=True)
    kd = mixed(teachers, weights, tau, student)

    def naive_forward():
        return sum(w * hinton_kd(z, student, tau) for z, w in zip(teachers, weights))  # [N, T]

    def naive_reverse():
        return sum(w * hinton_kd(student, z, tau) for z, w in zip(teachers, weights))  # [N, T]

    for lean, naive in [(lambda: forward_kd(kd), naive_forward), (lambda: reverse_kd(kd), naive_reverse)]:
        lean_value, lean_grad = value_and_grad(lean, student)
        naive_value, naive_grad = value_and_grad(naive, student)
        torch.testing.assert_close(lean_value, naive_value, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lean_grad, naive_grad, rtol=1e-5, atol=1e-6)


def test_forward_gradient_is_tau_times_q_minus_pbar():
    # d/dz_S of tau^2 (neg_entropy - sum_a pbar log softmax(z_S/tau)) = tau (q - pbar)
    tau = 2.0
    teachers, weights = [logits(10), logits(11)], random_weights(2)
    student = logits(0, grad=True)
    kd = mixed(teachers, weights, tau, student)
    forward_kd(kd).sum().backward()
    torch.testing.assert_close(student.grad, tau * (torch.softmax(student.detach() / tau, -1) - kd.pbar))


def test_mixer_keeps_only_requested_buffers_in_float32():
    mixer = TeacherMixer(1.0, forward=True, reverse=False)
    mixer.add(logits(1).half(), weight=0.5)  # a float weight broadcasts to every position
    mixer.add(logits(2).half(), weight=torch.full((N, 1), 0.5))  # [N, 1] broadcasts along T
    pbar, neg_entropy, lbar, top_k = mixer.result()
    assert lbar is None and top_k is None
    assert pbar.dtype == torch.float32 and pbar.shape == (N, T, V)
    assert neg_entropy.dtype == torch.float32 and neg_entropy.shape == (N, T)
    torch.testing.assert_close(pbar.sum(-1), torch.ones(N, T))  # a mixture of distributions
    reverse_only = TeacherMixer(1.0, forward=False, reverse=True)
    reverse_only.add(logits(1), weight=1.0)
    assert reverse_only.result().pbar is None and reverse_only.result().neg_entropy is None


def test_mixer_does_not_alias_or_track_gradients_of_its_inputs():
    teacher = logits(1, grad=True)
    weight = torch.ones(N, T)
    mixer = TeacherMixer(1.0, forward=True, reverse=True)
    mixer.add(teacher, weight=weight)
    mixer.add(logits(2), weight=torch.zeros(N, T))  # in-place accumulation must not write into the first
    result = mixer.result()
    assert not any(x.requires_grad for x in result[:3])
    torch.testing.assert_close(result.pbar, torch.softmax(teacher.detach(), -1))
    torch.testing.assert_close(weight, torch.ones(N, T))


# ---------------------------------------------------------------- unnormalised (confidence) weights


def neg_entropy_of(z: torch.Tensor, tau: float) -> torch.Tensor:
    log_p = F.log_softmax(z / tau, -1)
    return (log_p.exp() * log_p).sum(-1)  # [N, T]


@pytest.mark.parametrize("m", [1, 2, 3])
def test_log_weight_path_equals_normalised_path(m):
    # confidence weighting: w_i ∝ exp(-H(p_i)) per position; the online-softmax mixer must equal the
    # mixer fed the weights normalised up front (the naive stacked softmax over M)
    tau = 1.5
    teachers = [logits(20 + i, scale=1.0 + i) for i in range(m)]  # different sharpness -> different entropies
    log_w = torch.stack([neg_entropy_of(z, tau) for z in teachers])  # [M, N, T] = -H_i
    normalised = torch.softmax(log_w, dim=0)  # [M, N, T]
    lean = TeacherMixer(tau, forward=True, reverse=True)
    for z, s in zip(teachers, log_w):
        lean.add(z, log_weight=s)
    reference = TeacherMixer(tau, forward=True, reverse=True)
    for z, w in zip(teachers, normalised):
        reference.add(z, weight=w)
    for got, want in zip(lean.result(), reference.result()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_log_weight_path_is_stable_for_huge_log_weights_in_any_order():
    # log-weights ~ +-1000 overflow exp(); increasing then decreasing order exercises the rescaling
    teachers = [logits(30), logits(31), logits(32)]
    log_w = torch.tensor([-1000.0, 0.0, 1000.0]).view(3, 1, 1).expand(3, N, T) + random_weights(3)
    normalised = torch.softmax(log_w, dim=0)  # [M, N, T], effectively all mass on teacher 2
    for order in ([0, 1, 2], [2, 1, 0]):
        mixer = TeacherMixer(1.0, forward=True, reverse=True)
        for i in order:
            mixer.add(teachers[i], log_weight=log_w[i])
        reference = TeacherMixer(1.0, forward=True, reverse=True)
        for i in order:
            reference.add(teachers[i], weight=normalised[i])
        for got, want in zip(mixer.result()[:3], reference.result()[:3]):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_log_weight_minus_infinity_drops_a_teacher():
    # w = (0, 1) given as log-weights (-inf, 0): the mixture is the second teacher alone
    mixer = TeacherMixer(1.0, forward=True, reverse=True)
    mixer.add(logits(1), log_weight=torch.full((N, T), -math.inf))
    mixer.add(logits(2), log_weight=torch.zeros(N, T))
    log_p = F.log_softmax(logits(2), -1)
    pbar, neg_entropy, lbar, _ = mixer.result()
    torch.testing.assert_close(pbar, log_p.exp())
    torch.testing.assert_close(lbar, log_p)
    torch.testing.assert_close(neg_entropy, (log_p.exp() * log_p).sum(-1))


def test_mixer_argument_errors():
    with pytest.raises(ValueError, match="tau"):
        TeacherMixer(0.0)
    with pytest.raises(ValueError, match="forward"):
        TeacherMixer(1.0, forward=False, reverse=False)
    mixer = TeacherMixer(1.0)
    with pytest.raises(ValueError, match="before any teacher"):
        mixer.result()
    with pytest.raises(ValueError, match="exactly one"):
        mixer.add(logits(1))
    mixer.add(logits(1), weight=0.5)
    with pytest.raises(ValueError, match="not both"):
        mixer.add(logits(2), log_weight=torch.zeros(N, T))


def test_kd_needs_its_mixture():
    student = logits(0)
    with pytest.raises(ValueError, match="pbar"):
        forward_kd(KDStates(logits=student, mask=torch.ones(N, T), tau=1.0))
    with pytest.raises(ValueError, match="lbar"):
        reverse_kd(KDStates(logits=student, mask=torch.ones(N, T), tau=1.0))
    batch = Batch(logp=torch.zeros(N, T), mask=torch.ones(N, T))
    with pytest.raises(ValueError, match="batch.kd"):
        require_kd(batch, 1.0, "X")
    kd = mixed([logits(1)], torch.ones(1, N, T), 2.0, student)
    with pytest.raises(ValueError, match="tau"):
        require_kd(Batch(logp=torch.zeros(N, T), mask=torch.ones(N, T), kd=kd), 1.0, "X")


# ---------------------------------------------------------------- teacher agreement and norm_G

# M = 2 teachers, N = 2 sequences of lengths 2 and 1 (T = 2); padded logp is -inf and must be ignored
TA_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
TA_LOGP = torch.tensor(
    [
        [[-1.0, -2.0], [-0.5, -math.inf]],  # teacher 0
        [[-3.0, -1.0], [-2.5, -math.inf]],  # teacher 1
    ]
)
TA_W = torch.tensor([[0.25, 0.5], [0.75, 0.5]])  # [M, N]


def test_teacher_agreement_by_hand():
    # seq 0: log(.25 e^-3 + .75 e^-4); seq 1: log(.5 e^-.5 + .5 e^-2.5)
    expected = torch.tensor(
        [math.log(0.25 * math.exp(-3) + 0.75 * math.exp(-4)), math.log(0.5 * math.exp(-0.5) + 0.5 * math.exp(-2.5))]
    )
    torch.testing.assert_close(teacher_agreement(TA_LOGP, TA_W, TA_MASK), expected)
    # length-normalised: token means (-1.5, -2) and (-.5, -2.5)
    expected = torch.tensor(
        [math.log(0.25 * math.exp(-1.5) + 0.75 * math.exp(-2)), math.log(0.5 * math.exp(-0.5) + 0.5 * math.exp(-2.5))]
    )
    torch.testing.assert_close(teacher_agreement(TA_LOGP, TA_W, TA_MASK, length_normalize=True), expected)


def test_teacher_agreement_matches_naive_and_is_stable():
    g = torch.Generator().manual_seed(3)
    m, n, t = 3, 5, 40
    logp = -torch.rand(m, n, t, generator=g) * 30  # sequence log-probs down to ~ -600: exp underflows
    mask = (torch.rand(n, t, generator=g) > 0.3).float()
    w = torch.softmax(torch.randn(m, n, generator=g), 0)
    got = teacher_agreement(logp, w, mask)
    assert torch.isfinite(got).all()
    naive = (w.double() * (logp.double() * mask).sum(-1).exp()).sum(0).log()  # float64 naive (no underflow here)
    torch.testing.assert_close(got.double(), naive, rtol=1e-5, atol=1e-5)
    # one teacher with weight 1: TA is that teacher's sequence log-prob
    torch.testing.assert_close(teacher_agreement(logp[:1], torch.ones(1, n), mask), (logp[0] * mask).sum(-1))


def test_sequence_weights():
    # constant along each sequence: the weights themselves
    w = TA_W[:, :, None].expand(2, 2, 2)  # [M, N, T]
    torch.testing.assert_close(sequence_weights(w, TA_MASK), TA_W)
    # position-dependent: masked mean over tokens, renormalised; seq 1 sees only its first token
    w = torch.tensor([[[0.2, 0.6], [1.0, 0.0]], [[0.8, 0.4], [0.0, 1.0]]])
    torch.testing.assert_close(sequence_weights(w, TA_MASK), torch.tensor([[0.4, 1.0], [0.6, 0.0]]))
    # an empty sequence gets uniform weights, not NaN
    torch.testing.assert_close(sequence_weights(w, torch.zeros(2, 2)), torch.full((2, 2), 0.5))


def test_group_normalize():
    x = torch.tensor([1.0, 2.0, 3.0, -5.0, -5.0, -5.0])  # groups of K = 3
    y = group_normalize(x, 3, delta=1e-8)
    grouped = y.view(2, 3)
    torch.testing.assert_close(grouped.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    assert grouped[0].std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(grouped[1], torch.zeros(3))  # constant group -> 0
    # by hand: group (1, 2, 3) has mean 2, population std sqrt(2/3)
    s = math.sqrt(2 / 3)
    torch.testing.assert_close(y[:3], torch.tensor([-1 / s, 0.0, 1 / s]))
