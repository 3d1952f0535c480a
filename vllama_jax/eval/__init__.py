"""Video-QA benchmarks in their published formats (``vllama-jax eval``; docs/eval.md): the task loaders
(`tasks`), the scoring (`metrics`), the optional GPT judge (`judge`), the batched resumable runner (`runner`), and
an adapter for the lmms-eval harness (`lmms_adapter`, needs the optional ``lmms-eval`` package)."""
from .judge import Judge, JudgeError
from .metrics import markdown_table
from .runner import EvalResult, evaluate
from .tasks import TASKS, AnnotationError, Question, Task, get_task, load_questions

__all__ = ["AnnotationError", "EvalResult", "Judge", "JudgeError", "Question", "TASKS", "Task", "evaluate",
           "get_task", "load_questions", "markdown_table"]
