"""The one record every dataset produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A problem with its gold worked solution and normalised final answer.

    prompt:   the question as shown to the model (options included for multiple choice)
    solution: the gold worked solution, ending in the final-answer marker ("#### 42", "#### B")
    answer:   the normalised gold final answer ("42", "-3.5", "B")
    component: the dataset it comes from (a `dataset=mix` component's name; the dataset's name otherwise)
    teacher:  the teacher that `weighting=route` sends it to, when its data names one (a jsonl `teacher` field)
    question: the prompt before the chat layout rendered it (`TaskData.render_prompts`; None: `prompt` is it), for
              teachers with their own tokenizer, which render it in their own layout
    """

    prompt: str
    solution: str
    answer: str
    component: str = ""
    teacher: str | None = None
    question: str | None = None
