"""grpokd: GRPO with multi-teacher knowledge distillation for small language models.

Shape legend used in comments throughout the package:
  B prompts, K group size (completions per prompt), N = B*K completions,
  P prompt tokens, T completion tokens, V vocabulary, M teachers.
"""

__version__ = "0.1.0"
