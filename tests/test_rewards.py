"""Rewards: arithmetic exact match, GSM8K final-number and MATH \\boxed{} extraction with normalisation."""

import pytest

from lora_jax import rewards, synthetic


@pytest.mark.parametrize("completion,answer,expected", [
    ("47", "47", 1.0), (" 47 and more", "47", 1.0), ("470", "47", 0.0), ("-3", "-3", 1.0), ("x47", "47", 0.0),
    ("", "5", 0.0), ("48", "47", 0.0)])
def test_arithmetic(completion, answer, expected):
  assert rewards.arithmetic(completion, answer) == expected


def test_arithmetic_agrees_with_the_synthetic_tasks_rule():
  task = synthetic.arithmetic(20, seed=3, operators="+-*")
  for prompt, answer in zip(task.prompts, task.completions):
    for completion in (answer, answer + "1", str(int(answer) + 1), " " + answer):
      assert rewards.arithmetic(completion, answer) == synthetic.reward(prompt, completion)


GSM_SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize("completion,answer,expected", [
    ("She sold 24 in May, so 48 + 24 = 72 in total.", GSM_SOLUTION, 1.0),  # last number
    ("The answer is 72.", GSM_SOLUTION, 1.0),  # trailing period
    ("24 in May... #### 72\nThen I wonder about 5", GSM_SOLUTION, 1.0),  # '####' wins over a later number
    ("So the total is \\boxed{72}. Check: 3 steps", GSM_SOLUTION, 1.0),  # \boxed wins over a later number
    ("48 + 24 = 71", GSM_SOLUTION, 0.0),
    ("It costs $1,000.00 in all", "#### 1000", 1.0),  # commas, $, decimals
    ("It costs 1,000", "1000", 1.0),  # a bare reference
    ("The result is -5", "#### -5", 1.0),
    ("no number here", GSM_SOLUTION, 0.0),
    ("#### 72.5", "#### 72", 0.0),
    ("50%", "#### 50", 1.0)])
def test_gsm8k(completion, answer, expected):
  assert rewards.gsm8k(completion, answer) == expected


def test_gsm8k_reference_without_marker_is_a_clear_error():
  with pytest.raises(ValueError, match="####"):
    rewards.gsm8k_reference("72")


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{5}", "5"), ("\\boxed{\\frac{1}{2}} and then \\boxed{3}", "3"), ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed{a{b}c}", "a{b}c"), ("\\fbox{7}", "7"), ("\\boxed 9", "9"), ("no box", None), ("\\boxed{open", None)])
def test_last_boxed(text, expected):
  assert rewards.last_boxed(text) == expected


MATH_SOLUTION = "Half of 1 is $\\boxed{\\frac{1}{2}}$."


@pytest.mark.parametrize("completion,answer,expected", [
    ("The answer is $\\boxed{\\frac12}$", MATH_SOLUTION, 1.0),  # \frac12
    ("$\\boxed{\\dfrac{1}{2}}$", MATH_SOLUTION, 1.0),  # dfrac
    ("\\boxed{0.5}", MATH_SOLUTION, 1.0),  # 0.5 -> \frac{1}{2}
    ("\\boxed{1/2}", MATH_SOLUTION, 1.0),  # a/b
    ("\\boxed{\\frac{1}{3}}", MATH_SOLUTION, 0.0),
    ("1/2 without a box", MATH_SOLUTION, 0.0),
    ("\\boxed{90^\\circ}", "\\boxed{90}", 1.0),  # degrees
    ("\\boxed{5\\text{ cm}}", "\\boxed{5}", 1.0),  # units
    ("\\boxed{x = 3}", "\\boxed{3}", 1.0),  # short lhs
    ("\\boxed{\\left( 1, 2 \\right)}", "\\boxed{(1,2)}", 1.0),  # \left \right, spaces
    ("\\boxed{2\\sqrt2}", "\\boxed{2\\sqrt{2}}", 1.0),  # \sqrt2
    ("\\boxed{50\\%}", "\\boxed{50}", 1.0),  # percent
    ("\\boxed{10.0}", "\\boxed{10}", 1.0),  # numeric value
    ("\\boxed{\\$18.90}", "\\boxed{18.90}", 1.0),  # dollars
    ("\\boxed{(1,2)}", "\\boxed{(2,1)}", 0.0),
    ("\\boxed{3}", "3", 1.0)])  # a bare reference
def test_math(completion, answer, expected):
  assert rewards.math(completion, answer) == expected


def test_get_names_the_valid_tasks():
  assert rewards.get("math") is rewards.math
  with pytest.raises(ValueError, match="arithmetic"):
    rewards.get("aime")
