import pytest

from cpl.config import SearchConfig
from cpl.formats import (
    DEMONSTRATIONS,
    END_SOLUTION,
    END_STEP,
    MARKERS,
    PromptFormat,
    Step,
    StepKind,
    demonstration_steps,
    display_text,
    few_shot_header,
    parse_generated_step,
    parse_response,
    render_prompt,
    render_response,
    render_step,
    stop_strings,
)
from cpl.grading import extract_answer
from cpl.show import outline
from cpl.tree import Tree

FORMATS = list(PromptFormat)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("demo", DEMONSTRATIONS, ids=["natalia", "circle"])
def test_render_parse_round_trip(fmt, demo):
    steps = demonstration_steps(demo, fmt)
    assert parse_response(render_response(steps, fmt), fmt) == steps


@pytest.mark.parametrize("fmt", FORMATS)
def test_demonstrations_answer_is_boxed(fmt):
    for demo in DEMONSTRATIONS:
        solution = demonstration_steps(demo, fmt)[-1]
        assert solution.kind is StepKind.SOLUTION
        assert extract_answer(solution.text) == demo.answer


def test_plain_prompt_shape():
    prompt = render_prompt("What is 2+3?", ["Plan 1: Add the numbers."], PromptFormat.PLAIN)
    assert prompt.startswith("You are a powerful agent")
    assert "Now! It's your turn." in prompt
    assert prompt.endswith("Question: What is 2+3?\n\nPlans:\nPlan 1: Add the numbers.<endstep>\n")
    assert prompt.count("Question:") == 4  # template, two demonstrations, the question


def test_xml_prompt_shape():
    prompt = render_prompt("What is 2+3?", ["Plan 1: Add."], PromptFormat.XML)
    assert prompt.startswith("<question>\nNatalia")
    assert prompt.endswith("<question>\nWhat is 2+3?\n</question>\n<plan>\n<step>\nPlan 1: Add.\n</step>\n")
    assert prompt.count("<solution>") == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_few_shot_only_the_question(fmt):
    prompt = render_prompt("Q?", [], fmt, few_shot=False)
    assert "Natalia" not in prompt and "Q?" in prompt
    assert few_shot_header(fmt) in render_prompt("Q?", [], fmt)


@pytest.mark.parametrize(
    ("fmt", "generated", "stop", "kind", "text"),
    [
        (PromptFormat.PLAIN, "Plan 2: Halve 48.", END_STEP, StepKind.PLAN, "Plan 2: Halve 48."),
        (
            PromptFormat.PLAIN,
            "\nDetailed Implementation:\n1. 48/2=24\nThe final answer is $\\boxed{24}$.",
            END_SOLUTION,
            StepKind.SOLUTION,
            "Detailed Implementation:\n1. 48/2=24\nThe final answer is $\\boxed{24}$.",
        ),
        (PromptFormat.XML, "<step>\nPlan 2: Halve 48.\n", "</step>", StepKind.PLAN, "Plan 2: Halve 48."),
        (
            PromptFormat.XML,
            "</plan>\n<solution>\n1. 48/2=24\nThe final answer is $\\boxed{24}$.\n",
            "</solution>",
            StepKind.SOLUTION,
            "1. 48/2=24\nThe final answer is $\\boxed{24}$.",
        ),
    ],
)
def test_classify_generated_steps(fmt, generated, stop, kind, text):
    assert parse_generated_step(generated, stop, fmt) == Step(kind, text)


def test_unforced_solution_without_header_is_stored_as_generated():
    generated = "\n1. 48/2=24\nThe final answer is $\\boxed{24}$."
    step = parse_generated_step(generated, END_SOLUTION, PromptFormat.PLAIN)
    assert step == Step(StepKind.SOLUTION, "1. 48/2=24\nThe final answer is $\\boxed{24}$.")
    # what training sees for this step is exactly what the policy generated, up to its stop marker
    assert render_step(step, PromptFormat.PLAIN) == generated + END_SOLUTION
    # the header is added only where the step is shown
    assert display_text(step, PromptFormat.PLAIN) == "Detailed Implementation:\n" + step.text
    with_header = Step(StepKind.SOLUTION, "Detailed Implementation:\n1. x")
    assert display_text(with_header, PromptFormat.PLAIN) == with_header.text
    plan = Step(StepKind.PLAN, "Plan 1: x")
    assert display_text(plan, PromptFormat.PLAIN) == plan.text


def test_outline_shows_the_header_the_tree_does_not_store():
    tree = Tree.new("t", "Q?", "24", SearchConfig())
    tree.root.expanded, tree.root.N = True, 1
    tree.add_child(tree.root, kind=StepKind.SOLUTION, text="1. 48/2=24", N=1, V=1.0, reward=1.0, correct=True)
    assert outline(tree).splitlines()[-1].endswith("] Detailed Implementation: / 1. 48/2=24")


@pytest.mark.parametrize("fmt", FORMATS)
def test_forced_solution_at_depth_limit(fmt):
    steps = [Step(StepKind.PLAN, f"Plan {i}: think.") for i in range(1, 6)]
    prompt = render_prompt("Q?", steps, fmt, force_solution=True)
    generated = "1. Do it.\nThe final answer is $\\boxed{3}$."
    step = parse_generated_step(generated, stop_strings(fmt)[1], fmt, forced=True)
    assert step.kind is StepKind.SOLUTION
    # The forced prompt plus the generated text is exactly the prompt plus the rendered solution step.
    full = render_prompt("Q?", [*steps, step], fmt)
    assert full.startswith(prompt) and full[len(prompt) :].startswith(generated)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stop_strings_are_markers(fmt):
    assert all(s in MARKERS for s in stop_strings(fmt))
    # Generated steps never contain their own stop marker, so a rendered step ends with exactly one.
    response = render_response(demonstration_steps(DEMONSTRATIONS[0], fmt), fmt)
    assert sum(response.count(s) for s in stop_strings(fmt)) == 4
