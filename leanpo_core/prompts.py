"""The texts the model is asked (docs/method.md section 5) and the parser of its self-rating.

Values are inserted with `str.format` on fixed templates, so braces or template-like text inside a question or an
answer are inserted literally and never interpreted. The chat wrapping and the video placeholder are the model
family's business (`FamilyAdapter.build_prompt`); these functions return the user turn's text only.

Tokenizers turn chat-control strings (`<|im_end|>`, `<video>`, `</s>`, ...) into special tokens wherever they occur,
user text included. Questions and answers holding one are rejected by the manifest validation (`videos.py`); the
model's own replies, which come back as `previous` and `response`, are defused instead (`defuse`).
"""

from __future__ import annotations

import math
import re

# Chat-control and media-placeholder tokens of the supported families: ChatML/Qwen `<|...|>`, LLaVA's `<image>` and
# `<video>`, Llama's `<s>`, `</s>`, `<unk>`, `<pad>`.
CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?s>|<(?:image|video|unk|pad)>")
_WORD_JOINER = "\u2060"

HINT = ("Here are some hints: {answer}. Please respond based on the given hints and the video content.\n"
        "{question}")
REFLECTION = ("Here is your previous answer to the question below: {previous}\n"
              "Your answer can be improved. Here are some hints: {answer}. Reflect on your previous answer, correct "
              "any mistakes and enrich it based on the hints and the video content, then give the improved answer.\n"
              "{question}")
JUDGE = ("Question: {question}\nReference answer: {answer}\nCandidate answer: {response}\n"
         "Rate how well the candidate answer agrees with the reference answer and with the video, on a scale from "
         "1 (wrong) to 10 (fully correct and complete). Reply with the number only.")
RATING_SCALE = (1.0, 10.0)


def hint_prompt(question: str, answer: str) -> str:
    """Prior injection: the ground-truth answer is given as a hint before the question."""
    return HINT.format(answer=_clean(answer), question=question)


def reflection_prompt(question: str, answer: str, previous: str) -> str:
    """Self-reflection: the model's previous reply, the hint again, and the question; its output is y_w."""
    return REFLECTION.format(previous=defuse(previous.strip()), answer=_clean(answer), question=question)


def plain_prompt(question: str) -> str:
    """No hint: the losing side, evaluation, and SFT all ask the bare question."""
    return question


def judge_prompt(question: str, answer: str, response: str) -> str:
    """Self-reflection judgement: the same model rates a candidate against the prior knowledge and the video."""
    return JUDGE.format(question=question, answer=_clean(answer), response=defuse(response.strip()))


def defuse(reply: str) -> str:
    """`reply` with a word joiner (U+2060, invisible) after the "<" of every control token, so a model reply that
    spells "<|im_end|>" in plain characters cannot end the user turn of the prompt it is quoted in."""
    return CONTROL_TOKEN.sub(lambda m: m.group()[0] + _WORD_JOINER + m.group()[1:], reply)


def _clean(answer: str) -> str:
    return answer.strip().rstrip(".")


_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?")


def parse_rating(reply: str) -> float | None:
    """The first rating in a reply, normalised to [0, 1], or None when there is none on the 1-10 scale.

    Accepts "7", "Rating: 7.5", "**8**", "8/10", "I'd say 6 out of 10"; a fraction "x/y" is rescaled from y.
    """
    low, high = RATING_SCALE
    for match in _NUMBER.finditer(reply):
        value = float(match.group(1))
        if match.group(2):
            denominator = float(match.group(2))
            if denominator <= 0:
                continue
            value = low + (high - low) * value / denominator if denominator != high else value
        if math.isfinite(value) and low <= value <= high:
            return (value - low) / (high - low)
    return None
