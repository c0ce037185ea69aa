"""The terms a `PolicyObjective` is composed of, one module each (and one YAML each in conf/term/).

- kl_reference.KLToReference: KL(theta || ref) by estimator k1/k2/k3/full (GRPO's anchor, paper Eq. 3/6).
- forward_kd.ForwardKD: sum_i w_i D_H(T_i || theta), Hinton KD to the teacher mixture (J', Eq. 7-9).
- reverse_kd.ReverseKD: sum_i w_i D_H(theta || T_i), the teachers as the anchor (J'', Eq. 11).
- teacher_kl.TeacherKL: reverse KL to the teacher mixture on the sampled tokens, k2/k3 as a loss or k1 in
  the advantage, masked by reward (KDRL; on-policy distillation).
- teacher_guide.TeacherGuide: cross-entropy on the teachers' next-token choice along the rollout (TGPO).
- entropy_bonus.EntropyBonus: -entropy of the sampling policy.
- teacher_agreement.TeacherAgreement: gamma * norm_G(log sum_i w_i pi_Ti(o|s)) in the advantage (J''', Eq. 12-13).

The named objectives (grpo, j1, j2, j3, kdrl, tgpo, opd) are compositions of these terms, defined only by
their YAML in conf/objective/ (see grpokd.objectives.policy).
Adding a term: a module here with a `Term` subclass (placement, needs, __call__), a YAML in conf/term/
and a tensor test.
"""
