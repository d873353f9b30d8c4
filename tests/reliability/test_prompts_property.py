"""Property-based tests of the texts the model is asked: arbitrary replies never crash the rating parser and give a
rating in [0, 1] or None; arbitrary questions, answers and replies (unicode, braces, `{{ }}`, `{0}`, Jinja `{% %}`)
are inserted verbatim, nothing in them is formatted or evaluated, through `leanpo_core.prompts` and through each toy
family's processor chat template; any question or answer the manifest validation accepts, and any model reply at
all (defused), adds no special token to the prompt.

    .venv/bin/python -m pytest tests/reliability/test_prompts_property.py -p no:cacheprovider
"""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from leanpo_core import models, prompts, toy
from leanpo_core.prompts import CONTROL_TOKEN, defuse

PROPERTY = settings(database=None, deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
TEMPLATE = settings(database=None, deadline=None, max_examples=60,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Fragments that break naive templating: format fields, Jinja expressions and statements, escapes, control tokens.
_NASTY = ["{", "}", "{{", "}}", "{0}", "{answer}", "{question}", "{previous}", "{response}", "{!r}", "{:>99999}",
          "{{ 7*7 }}", "{% for x in range(3) %}x{% endfor %}", "{# c #}", "{{ messages }}", "{% raw %}", "%s", "%(x)s",
          "\\", "\\n", "\n", "\r\n", "\x00", "\u202e", "\ud7ff", "😀", "ü", "日本", "<", ">", "|", "<|", "|>",
          "im_end", "<video>", "<|im_end|>", "</s>", "${x}", "$x", "`", "'", '"']
nasty_text = st.lists(st.one_of(st.sampled_from(_NASTY), st.text(max_size=12)), max_size=12).map("".join)
reply_text = st.one_of(st.text(), nasty_text, st.lists(st.one_of(
    st.integers(-20, 1000).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["/", " / ", "/10", "out of", "Rating:", "**", ".", "..", "0/0", "1e309", "٧", "١٠"]),
    st.text(max_size=5)), max_size=10).map(" ".join))


@PROPERTY
@given(reply_text)
@example("1" + "0" * 400)
@example("1e309/1e309")
@example("0/0 9/0 10/0")
def test_parse_rating_never_crashes_and_stays_in_range(reply):
    rating = prompts.parse_rating(reply)
    assert rating is None or 0.0 <= rating <= 1.0


@PROPERTY
@given(st.integers(1, 10), st.text(alphabet=st.characters(exclude_categories=["Nd"]), max_size=30))
def test_a_lone_rating_on_the_scale_is_read_exactly(value, text):
    assume(not text or not (text[-1].isalnum() or text[-1] in "._"))  # "x7" or "1.7" are not a lone 7
    assert prompts.parse_rating(f"{text}{value}") == pytest.approx((value - 1) / 9)


def _expected(template: str, **values: str) -> str:
    """The template with each field replaced by its value in one left-to-right pass (an independent reference)."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal + (values[name] if name is not None else ""))
    return "".join(out)


@PROPERTY
@given(nasty_text, nasty_text, nasty_text)
def test_prompt_values_are_inserted_verbatim(question, answer, previous):
    clean = answer.strip().rstrip(".")
    assert prompts.hint_prompt(question, answer) == _expected(prompts.HINT, answer=clean, question=question)
    assert prompts.reflection_prompt(question, answer, previous) == _expected(
        prompts.REFLECTION, previous=defuse(previous.strip()), answer=clean, question=question)
    assert prompts.judge_prompt(question, answer, previous) == _expected(
        prompts.JUDGE, question=question, answer=clean, response=defuse(previous.strip()))
    if not CONTROL_TOKEN.search(previous):
        assert defuse(previous) == previous
    assert prompts.plain_prompt(question) == question


@pytest.fixture(scope="module")
def processors():
    """family -> (adapter, processor) of every toy family, built offline without model weights (fast)."""
    out = {}
    for family in toy.FAMILIES:
        tokenizer = toy.build_tokenizer(toy._TOKENIZER_KIND[family])
        out[family] = (models.ADAPTERS[family], toy._PARTS[family](tokenizer)[1])
    return out


def test_control_token_pattern_covers_every_special_token(processors):
    for family, (adapter, processor) in processors.items():
        specials = processor.tokenizer.all_special_tokens
        assert specials and all(CONTROL_TOKEN.fullmatch(s) for s in specials), (family, specials)


def _special_ids(processor, text: str) -> list[int]:
    special = set(processor.tokenizer.all_special_ids)
    return [i for i in processor.tokenizer(text, add_special_tokens=False)["input_ids"] if i in special]


@TEMPLATE
@given(nasty_text, nasty_text, nasty_text)
@example("{{ 7*7 }} {% if true %}yes{% endif %}", "{0} {answer}", "{{ raise('x') }}")
@example("What is {{ messages[0] }}?", "{% for m in messages %}{{ m }}{% endfor %}", "ok<|im_end|>\n<|im_start|>")
@example("q", "a", "<|vision_start|><|video_pad|><|vision_end|> <video> </s><s>")
def test_chat_templates_render_user_text_verbatim_without_new_special_tokens(processors, question, answer, reply):
    assume(not CONTROL_TOKEN.search(question + "\x00" + answer))  # what the manifest validation lets through
    for text in (prompts.hint_prompt(question, answer), prompts.reflection_prompt(question, answer, reply),
                 prompts.judge_prompt(question, answer, reply)):
        for family, (adapter, processor) in processors.items():
            rendered = adapter.build_prompt(processor, text)
            assert text in rendered and rendered.count(adapter.video_placeholder) == 1, family
            assert _special_ids(processor, rendered) == _special_ids(processor, adapter.build_prompt(processor, "x")), \
                family
