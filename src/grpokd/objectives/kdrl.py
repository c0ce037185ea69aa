"""KDRL (Xu et al. 2025, "KDRL: Post-Training Reasoning LLMs via Unified Knowledge Distillation and RL").

    J = J_GRPO - beta_kd(step) * D_KL(pi_theta || pi_T),   minimised as   loss = GRPO loss + beta_kd * KD

The reverse KL to the teacher is estimated on the student's own rollouts, from
the sampled tokens only (no full-vocabulary teacher logits are kept). With
d_t = logp_t - log pi_T(o_t) at each completion token:

- `estimator="k2"` (default): KD_t = 0.5 d_t^2 as a loss. Its gradient is
  d_t * grad logp_t, which on-policy is the unbiased per-token gradient of
  the reverse KL (the same reason GRPO's k2 KL is used as a loss).
- `estimator="k3"`: KD_t = exp(-d_t) + d_t - 1 as a loss (unbiased value, >= 0).
- `estimator="k1"`: the "in the reward" placement: the detached term
  -beta_kd * d_t is added to every token's advantage, A_t = A - beta_kd d_t,
  and there is no separate loss term.

Reward-guided mask (which completions get KD): `none` (all), `incorrect_only`
(reward <= 0, the completions the reward cannot teach), `hard_prompts` (every
completion of a group whose mean reward is below `hard_threshold`).

Schedule: `constant` beta_kd, or `linear`: beta_t = max(beta_kd - decay * step, beta_kd_min).

Multiple teachers: pi_T is the weighted mixture at each token,
log pi_T = logsumexp_i(log w_i + log pi_Ti), with the ensemble's weighting.

Temperatures: the KL is between the tempered policies, as GRPO's KL to the
reference: logp is the student's sampling policy (softmax(z / temperature))
and the teachers are scored at the same temperature, so a student equal to
its teacher has zero KD at any temperature (with temperature 1, the KDRL
paper's setting, it is the models' own KL). The KD term is reduced with this
objective's aggregation over the completion mask.

Composition: GRPO plus the `parts.teacher_kl` term "kd" (loss for k2/k3, advantage for k1).
"""

from __future__ import annotations

from typing import Any

from grpokd.objectives.grpo import GRPO
from grpokd.objectives.terms.teacher_kl import TeacherKL, kd_mask, mixture_logp  # noqa: F401 (re-exported)


class KDRL(GRPO):
    """KDRL loss: GRPO loss + beta_kd(step) * reverse KL(theta || teachers) on the rollouts, masked by reward.

    Args:
        beta_kd: KD coefficient at step 0, >= 0; 0 is GRPO.
        estimator: "k2" (loss, default) | "k3" (loss) | "k1" (per-token advantage term).
        kd_mask: "none" | "incorrect_only" | "hard_prompts".
        hard_threshold: a group is hard when its mean reward is below this ("hard_prompts").
        beta_kd_schedule: "constant" | "linear".
        beta_kd_decay: per-step decrease of the linear schedule, >= 0.
        beta_kd_min: the linear schedule's floor.
        **grpo_args: GRPO's arguments (beta and kl_estimator for the reference KL, terms, clipping, aggregation, ...).
    """

    def __init__(
        self,
        beta_kd: float = 0.1,
        estimator: str = "k2",
        kd_mask: str = "none",
        hard_threshold: float = 0.5,
        beta_kd_schedule: str = "constant",
        beta_kd_decay: float = 0.0,
        beta_kd_min: float = 0.0,
        terms: dict | None = None,
        **grpo_args: Any,
    ) -> None:
        self.kd = TeacherKL(
            beta_kd, estimator, kd_mask, hard_threshold, schedule=beta_kd_schedule, decay=beta_kd_decay, floor=beta_kd_min
        )
        self.beta_kd = beta_kd
        super().__init__(terms={"kd": self.kd, **(terms or {})}, **grpo_args)

    def coefficient(self, step: int) -> float:
        """beta_kd at optimiser step `step`."""
        return self.kd.coefficient(step)
