"""The GPT-judge protocol of Video-ChatGPT's quantitative evaluation (mbzuai-oryx/Video-ChatGPT,
quantitative_evaluation/evaluate_activitynet_qa.py), against any OpenAI-compatible chat-completions endpoint the
user names. Off unless asked for (``--judge-url``): nothing leaves the machine otherwise.

Each (question, reference, prediction) triple goes to the judge with the protocol's system and user messages; the
judge answers a Python-dict string ``{'pred': 'yes'|'no', 'score': 0..5}``. Accuracy is the share of "yes",
the score the mean of the scores: the two numbers Video-LLaMA's published MSVD/MSRVTT/ActivityNet figures are.
"""
from __future__ import annotations

import ast
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..errors import VllamaError

SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine if "
    "they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the "
    "meaningful match between the predicted answer and the correct answer.\n- Consider synonyms or paraphrases as "
    "valid matches.\n- Evaluate the correctness of the prediction compared to the answer.")

USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion: {question}\n"
    "Correct Answer: {answer}\nPredicted Answer: {prediction}\n\nProvide your evaluation only as a yes/no and "
    "score where the score is an integer value between 0 and 5, with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', where "
    "value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE "
    "ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. For example, your response "
    "should look like this: {{'pred': 'yes', 'score': 4.8}}.")


class JudgeError(VllamaError, RuntimeError):
    """The judge endpoint failed or answered outside the protocol (the row keeps the error, the run goes on)."""


@dataclass(frozen=True)
class Verdict:
    correct: bool
    score: float


def parse_verdict(text: str) -> Verdict:
    """The judge's ``{'pred': ..., 'score': ...}`` (a Python-dict or JSON string, possibly inside other text)."""
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        raise JudgeError(f"judge answer is not a dictionary: {text[:200]!r}")
    try:
        d = ast.literal_eval(m.group(0))
    except (ValueError, SyntaxError):
        try:
            d = json.loads(m.group(0))
        except ValueError:
            raise JudgeError(f"judge answer is not a dictionary: {text[:200]!r}") from None
    if not isinstance(d, dict) or "pred" not in d or "score" not in d:
        raise JudgeError(f"judge answer lacks 'pred' / 'score': {text[:200]!r}")
    pred = str(d["pred"]).strip().lower()
    if pred not in ("yes", "no"):
        raise JudgeError(f"judge 'pred' is {d['pred']!r}, not yes/no")
    try:
        score = float(d["score"])
    except (TypeError, ValueError):
        raise JudgeError(f"judge 'score' is {d['score']!r}, not a number") from None
    return Verdict(pred == "yes", score)


class Judge:
    """A chat-completions client for the protocol. url: the endpoint's base (``http://host:port/v1``) or its full
    ``.../chat/completions`` address; model: the judge model's name (Video-ChatGPT used gpt-3.5-turbo);
    api_key: sent as a bearer token when given."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 2) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries

    def messages(self, question: str, answer: str, prediction: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer,
                                                               prediction=prediction)}]

    def __call__(self, question: str, answer: str, prediction: str) -> Verdict:
        body = json.dumps({"model": self.model, "messages": self.messages(question, answer, prediction),
                           "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for _ in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply: Any = json.loads(resp.read().decode("utf-8"))
                return parse_verdict(reply["choices"][0]["message"]["content"])
            except JudgeError:
                raise  # a well-formed reply outside the protocol: asking again gives the same
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                last = e
        raise JudgeError(f"judge {self.url}: {type(last).__name__}: {last}")


__all__ = ["Judge", "JudgeError", "SYSTEM_PROMPT", "USER_PROMPT", "Verdict", "parse_verdict"]
