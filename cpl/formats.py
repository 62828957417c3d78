"""Prompt formats of the paper's appendix A.1, and how steps are rendered and parsed.

Two formats exist:

* ``plain`` (round 1): ``Plan k: ...<endstep>`` steps, then ``Detailed Implementation:`` and
  ``The final answer is \\boxed{..}.<endsolution>``.
* ``xml`` (round 2): ``<plan><step>..</step>..</plan><solution>..</solution>``.

The appendix text was extracted from a PDF and is garbled (broken stop markers, stray ``$``, a table where
``\\boxed{72}`` belongs); the demonstrations below are a faithful reconstruction. Everything that knows how a
prompt looks lives in this module.

A *step* is stored as its text without the stop marker and without surrounding whitespace: a plan step reads
``Plan 2: ...``; a solution step reads ``Detailed Implementation:\\n1. ...\\nThe final answer is \\boxed{72}.``
in the plain format and ``1. ...\\nThe final answer is \\boxed{72}.`` in the XML format. A plain-format
solution step is stored exactly as generated: when the policy wrote it without the header, it has none
(`display_text` shows it with one); a forced solution step carries the header of the forced prefix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class PromptFormat(StrEnum):
    PLAIN = "plain"
    XML = "xml"


class StepKind(StrEnum):
    PLAN = "plan"
    SOLUTION = "solution"


END_STEP = "<endstep>"
END_SOLUTION = "<endsolution>"
SOLUTION_HEADER = "Detailed Implementation:"
XML_STEP_OPEN, XML_STEP_CLOSE = "<step>", "</step>"
XML_SOLUTION_OPEN, XML_SOLUTION_CLOSE = "<solution>", "</solution>"
XML_PLAN_CLOSE = "</plan>"

# Every marker the tokenizer of a tiny model must keep as one (normal, not special) token.
MARKERS: tuple[str, ...] = (
    END_STEP,
    END_SOLUTION,
    "<question>",
    "</question>",
    "<plan>",
    XML_PLAN_CLOSE,
    XML_STEP_OPEN,
    XML_STEP_CLOSE,
    XML_SOLUTION_OPEN,
    XML_SOLUTION_CLOSE,
)


@dataclass(frozen=True)
class Step:
    kind: StepKind
    text: str


@dataclass(frozen=True)
class Demonstration:
    question: str
    plans: tuple[str, ...]
    implementation: tuple[str, ...]
    answer: str


DEMONSTRATIONS: tuple[Demonstration, ...] = (
    Demonstration(
        question=(
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?"
        ),
        plans=(
            "Analyze the total number of clips sold in April.",
            'Calculate the number of clips sold in May by applying the "half as many" condition to the '
            "number sold in April.",
            "Sum the results from April and May to determine the overall total of clips sold over the two months.",
        ),
        implementation=(
            "Natalia sold 48 clips in April.",
            "The number of clips sold in May is $\\frac{48}{2}=24$.",
            "The total number of clips sold in April and May combined is $48+24=72$.",
        ),
        answer="72",
    ),
    Demonstration(
        question="If $x^2+y^2=1$, what is the largest possible value of $|x|+|y|$?",
        plans=(
            "Understand that the equation $x^2+y^2=1$ defines a circle centered at the origin with a radius "
            "of 1. To maximize $|x|+|y|$, we need to consider points on this circle that maximize the sum of "
            "the absolute values of $x$ and $y$.",
            "Recognize that $|x|+|y|$ is maximized when both $|x|$ and $|y|$ are large. The maximum sum "
            "occurs along lines where $x$ and $y$ contribute equally, specifically along the lines $y=x$ and "
            "$y=-x$.",
            "Identify the points of intersection between the lines $y=x$ and $y=-x$ with the circle "
            "$x^2+y^2=1$. These points are expected to yield the maximum value of $|x|+|y|$.",
            "Evaluate $|x|+|y|$ for the intersection points to determine the maximum possible value.",
        ),
        implementation=(
            "The circle $x^2+y^2=1$ is centered at the origin with a radius of 1. We need to find the points "
            "on this circle that maximize the sum $|x|+|y|$.",
            "To maximize $|x|+|y|$, the sum is largest when both $|x|$ and $|y|$ are large. This occurs along "
            "the lines $y=x$ and $y=-x$, where $x$ and $y$ contribute equally to the sum.",
            "The intersection points are $\\left(\\frac{1}{\\sqrt{2}},\\frac{1}{\\sqrt{2}}\\right)$, "
            "$\\left(\\frac{1}{\\sqrt{2}},-\\frac{1}{\\sqrt{2}}\\right)$, "
            "$\\left(-\\frac{1}{\\sqrt{2}},\\frac{1}{\\sqrt{2}}\\right)$, and "
            "$\\left(-\\frac{1}{\\sqrt{2}},-\\frac{1}{\\sqrt{2}}\\right)$.",
            "For these points, calculate $|x|+|y|$. For $\\left(\\frac{1}{\\sqrt{2}},\\frac{1}{\\sqrt{2}}"
            "\\right)$, $|x|+|y|=\\sqrt{2}$. The same value applies to the other points. Therefore, the "
            "maximum value is $\\sqrt{2}$.",
        ),
        answer="\\sqrt{2}",
    ),
)

PLAIN_INSTRUCTIONS = """\
You are a powerful agent with advanced reasoning and planning capabilities. Answer the questions as best you can.

!!!Remember:
1. Your answer should have two sections: "Plans" and "Detailed Implementation".
2. In the "Plans" section, you should outline step-by-step plans for solving the problem. These plans might \
include extracting key information, forming sub-questions, analyzing aspects, etc. Each step should introduce new \
insights, avoid overly abstract or generic actions. End each step with "<endstep>".
3. In the "Detailed Implementation" section, provide detailed steps that correspond to each plan, and conclude \
with "The final answer is \\boxed{answer}.<endsolution>"

The following is a template for your answer:

Question: The input question

Plans:
Plan 1: Describe the first plan step.<endstep>
Plan 2: Describe the second plan step.<endstep>
...
Plan N: Describe the final plan step.<endstep>

Detailed Implementation:
1. Execute the first plan step
2. Execute the second plan step
...
N. Execute the final plan step
The final answer is \\boxed{answer}.<endsolution>

The following are 2 demonstration examples.

"""

PLAIN_TURN = "Now! It's your turn.\n\n"


def solution_text(implementation: Sequence[str], answer: str, fmt: PromptFormat) -> str:
    """The text of a final solution step: numbered implementation lines and the boxed answer."""
    lines = [f"{i}. {line}" for i, line in enumerate(implementation, start=1)]
    lines.append(f"The final answer is $\\boxed{{{answer}}}$.")
    body = "\n".join(lines)
    return f"{SOLUTION_HEADER}\n{body}" if fmt is PromptFormat.PLAIN else body


def plan_text(index: int, plan: str) -> str:
    """Plan steps carry their number in both formats (``Plan 2: ...``)."""
    return f"Plan {index}: {plan}"


def demonstration_steps(demo: Demonstration, fmt: PromptFormat) -> list[Step]:
    steps = [Step(StepKind.PLAN, plan_text(i, p)) for i, p in enumerate(demo.plans, start=1)]
    steps.append(Step(StepKind.SOLUTION, solution_text(demo.implementation, demo.answer, fmt)))
    return steps


# --- rendering -------------------------------------------------------------------------------------------


def render_step(step: Step, fmt: PromptFormat) -> str:
    """One step as it appears in a prompt or a response, with its stop marker."""
    if fmt is PromptFormat.PLAIN:
        if step.kind is StepKind.PLAN:
            return f"{step.text}{END_STEP}\n"
        return f"\n{step.text}{END_SOLUTION}"
    if step.kind is StepKind.PLAN:
        return f"{XML_STEP_OPEN}\n{step.text}\n{XML_STEP_CLOSE}\n"
    return f"{XML_PLAN_CLOSE}\n{XML_SOLUTION_OPEN}\n{step.text}\n{XML_SOLUTION_CLOSE}"


def response_head(question: str, fmt: PromptFormat) -> str:
    """The part of a prompt that opens the answer to ``question`` (before any step)."""
    if fmt is PromptFormat.PLAIN:
        return f"Question: {question.strip()}\n\nPlans:\n"
    return f"<question>\n{question.strip()}\n</question>\n<plan>\n"


def render_response(steps: Sequence[Step], fmt: PromptFormat) -> str:
    """The steps as one response (what SFT trains on, after ``render_prompt(question, [])``)."""
    return "".join(render_step(s, fmt) for s in steps)


def few_shot_header(fmt: PromptFormat) -> str:
    demos = "".join(
        response_head(d.question, fmt) + render_response(demonstration_steps(d, fmt), fmt) + "\n\n"
        for d in DEMONSTRATIONS
    )
    if fmt is PromptFormat.PLAIN:
        return PLAIN_INSTRUCTIONS + demos + PLAIN_TURN
    return demos


def forced_solution_prefix(fmt: PromptFormat) -> str:
    """Appended to a prompt at the depth limit so that the only possible action is the solution step."""
    if fmt is PromptFormat.PLAIN:
        return f"\n{SOLUTION_HEADER}\n"
    return f"{XML_PLAN_CLOSE}\n{XML_SOLUTION_OPEN}\n"


def render_prompt(
    question: str,
    steps: Sequence[Step | str],
    fmt: PromptFormat,
    *,
    few_shot: bool = True,
    force_solution: bool = False,
) -> str:
    """The prompt for the next step of a state (question + plan steps so far).

    Plain strings in ``steps`` are plan steps. With ``force_solution`` the prompt ends in the solution opener,
    so the model can only write the final solution step.
    """
    rendered = [s if isinstance(s, Step) else Step(StepKind.PLAN, s) for s in steps]
    head = few_shot_header(fmt) if few_shot else ""
    prompt = head + response_head(question, fmt) + render_response(rendered, fmt)
    return prompt + forced_solution_prefix(fmt) if force_solution else prompt


def stop_strings(fmt: PromptFormat) -> list[str]:
    if fmt is PromptFormat.PLAIN:
        return [END_STEP, END_SOLUTION]
    return [XML_STEP_CLOSE, XML_SOLUTION_CLOSE]


# --- parsing ---------------------------------------------------------------------------------------------


def display_text(step: Step, fmt: PromptFormat) -> str:
    """A step as shown to a reader: a plain-format solution step always under its ``Detailed Implementation:``
    header, also when the policy went straight to the implementation (the stored text is what it generated)."""
    if fmt is PromptFormat.PLAIN and step.kind is StepKind.SOLUTION and not step.text.startswith(SOLUTION_HEADER):
        return f"{SOLUTION_HEADER}\n{step.text}"
    return step.text


def parse_generated_step(generated: str, stop_reason: str | None, fmt: PromptFormat, *, forced: bool = False) -> Step:
    """Classify and normalise one generated step (the text the model wrote before its stop marker).

    ``stop_reason`` is the stop string that ended generation (None for end-of-sequence). A step written after
    the forced solution prefix is a solution step whatever it contains, and the prefix becomes part of its text
    so that stored steps look the same whether or not they were forced.
    """
    text = generated
    if fmt is PromptFormat.PLAIN:
        if forced:
            text = f"{SOLUTION_HEADER}\n{text.strip()}"
        text = text.strip()
        # An unforced solution that skipped the header keeps its text as generated: SFT and Step-APO train on
        # the stored text, so adding the header here would train on tokens the policy never produced.
        # `display_text` adds it where a step is shown.
        is_solution = forced or stop_reason == END_SOLUTION or text.startswith(SOLUTION_HEADER)
        return Step(StepKind.SOLUTION if is_solution else StepKind.PLAN, text)

    text = text.strip()
    is_solution = forced or stop_reason == XML_SOLUTION_CLOSE or XML_SOLUTION_OPEN in text
    if is_solution:
        _, _, body = text.rpartition(XML_SOLUTION_OPEN)
        return Step(StepKind.SOLUTION, body.strip())
    if text.startswith(XML_STEP_OPEN):
        text = text[len(XML_STEP_OPEN) :]
    return Step(StepKind.PLAN, text.strip())


_PLAIN_SPLIT = re.compile(rf"({re.escape(END_STEP)}|{re.escape(END_SOLUTION)})")
_XML_ITEM = re.compile(r"<step>\n?(.*?)\n?</step>|<solution>\n?(.*?)\n?</solution>", re.S)


def parse_response(response: str, fmt: PromptFormat) -> list[Step]:
    """Split a whole response (the inverse of ``render_response``) into its steps."""
    steps: list[Step] = []
    if fmt is PromptFormat.PLAIN:
        parts = _PLAIN_SPLIT.split(response)
        for body, marker in zip(parts[0::2], parts[1::2], strict=False):
            steps.append(parse_generated_step(body, marker, fmt))
        return steps
    for match in _XML_ITEM.finditer(response):
        plan, solution = match.groups()
        if plan is not None:
            steps.append(Step(StepKind.PLAN, plan.strip()))
        else:
            steps.append(Step(StepKind.SOLUTION, solution.strip()))
    return steps
