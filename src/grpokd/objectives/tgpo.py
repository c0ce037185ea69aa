"""TGPO ("Teacher-Guided Policy Optimization for LLM Distillation", 2026).

The teachers score the student's own rollout by teacher forcing; at each
completion position t the target is the teachers' next-token choice given the
student's prefix, y_t = argmax_a pbar(a | prompt, o_<t), with pbar the weighted
mixture sum_i w_i pi_Ti (one teacher: that teacher). The loss is

    loss = GRPO loss (clipped surrogate, token mean) + lam_t * token-mean of -log pi_theta(y_t | prompt, o_<t)
           - entropy_coef * token-mean entropy of pi_theta

The guidance term is plain cross-entropy on every completion token: not
multiplied by the importance ratio, not clipped, not gated by the reward.
lam_t = lam (`lam_schedule=constant`) or max(lam - lam_decay * step, 0) (`linear`).

Options (`target`):
- "argmax" (default): y_t is the mixture's most likely token.
- "sampled": y_t ~ pbar (global torch RNG, so seeded runs repeat).
- "topk": soft targets, the forward KL from the mixture's top-k tokens,
  renormalised, to the student: sum_{a in top-k} p~(a) (log p~(a) - log q(a)).

Temperatures: the teachers and the student's guidance term use temperature 1
(the raw logits, `batch.kd.logits`); the surrogate and the entropy bonus use
the sampling policy (`batch.logp`, `batch.logits`), as GRPO does.

Composition: GRPO (token-mean aggregation) plus the `parts.teacher_guide` term "guide" and, when
entropy_coef > 0, the `parts.entropy_bonus` term "entropy".
"""

from __future__ import annotations

from typing import Any

from grpokd.objectives.grpo import GRPO
from grpokd.objectives.terms.entropy_bonus import EntropyBonus
from grpokd.objectives.terms.teacher_guide import TeacherGuide, hard_guidance, teacher_targets, topk_guidance  # noqa: F401 (re-exported)


class TGPO(GRPO):
    """TGPO loss: GRPO (token mean) + lam_t * CE to the teachers' choices on the rollout - entropy bonus.

    Args:
        lam: guidance coefficient at step 0, >= 0; 0 (with entropy_coef 0) is GRPO.
        target: "argmax" | "sampled" | "topk".
        top_k: k of the "topk" target (the paper tries 5, 20, 100).
        lam_schedule: "constant" | "linear" (max(lam - lam_decay * step, 0)).
        lam_decay: per-step decrease of the linear schedule.
        entropy_coef: weight of the student's entropy bonus, >= 0.
        **grpo_args: GRPO's arguments (aggregation defaults to "token_mean", as the paper).
    """

    def __init__(
        self,
        lam: float = 0.5,
        target: str = "argmax",
        top_k: int = 20,
        lam_schedule: str = "constant",
        lam_decay: float = 0.0,
        entropy_coef: float = 0.0,
        terms: dict | None = None,
        **grpo_args: Any,
    ) -> None:
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef={entropy_coef} must be >= 0")
        self.guide = TeacherGuide(lam, target, top_k, schedule=lam_schedule, decay=lam_decay)
        self.lam, self.entropy_coef = lam, entropy_coef
        parts = {"guide": self.guide, "entropy": EntropyBonus(entropy_coef), **(terms or {})}
        super().__init__(terms=parts, **{"aggregation": "token_mean", **grpo_args})

    def coefficient(self, step: int) -> float:
        """lam_t at optimiser step `step`."""
        return self.guide.coefficient(step)
