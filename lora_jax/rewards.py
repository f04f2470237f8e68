"""Rewards for RL: exact-match answer checking for the synthetic arithmetic task, GSM8K and MATH.

Every reward is ``reward(completion, answer) -> 1.0 | 0.0``: the completion is the decoded text the policy generated
(up to EOS), the answer the reference as the dataset gives it.

- ``arithmetic``: the completion starts with the right integer (``lora_jax.synthetic``'s rule).
- ``gsm8k``: the reference answer is the number after ``####``; the completion's answer is its own ``#### N``, else
  its last ``\\boxed{N}``, else the last number in it. Numbers compare by value after removing thousands commas,
  ``$``, ``%`` and a trailing period (``1,000.00`` == ``1000``).
- ``math``: the last ``\\boxed{...}`` (or ``\\fbox{...}``) of both, with balanced braces; compared after the MATH
  dataset's normalisation (Hendrycks et al.'s ``strip_string``: spaces, ``\\left``/``\\right``, ``dfrac``/``tfrac``,
  units in ``\\text{}``, degrees, ``\\%``, ``\\$``, ``0.5`` -> ``\\frac{1}{2}``, ``a/b`` -> ``\\frac{a}{b}``,
  ``\\sqrt2`` -> ``\\sqrt{2}``, ``\\frac12`` -> ``\\frac{1}{2}``, a short ``x =`` prefix), or by numeric value when
  both are plain numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

_LEADING_INT = re.compile(r"^\s*(-?\d+)(?!\d)")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_GSM_MARK = re.compile(r"####\s*([^\n]*)")


def arithmetic(completion: str, answer: str) -> float:
  """1.0 when the completion starts with the integer ``answer`` (e.g. "47", then anything), else 0.0."""
  m = _LEADING_INT.match(completion)
  return float(m is not None and int(m[1]) == int(answer))


def parse_number(text: str) -> Decimal | None:
  """A number written as text (commas, ``$``, ``%``, a trailing period and spaces ignored), or None."""
  cleaned = re.sub(r"[,\s$%]", "", text).rstrip(".")
  if cleaned.startswith("\\$"):
    cleaned = cleaned[2:]
  try:
    value = Decimal(cleaned)
  except InvalidOperation:
    return None
  return value if value.is_finite() else None


def gsm8k_reference(answer: str) -> str:
  """The final answer of a GSM8K reference solution (the text after ``####``)."""
  m = _GSM_MARK.search(answer)
  if m is None:
    raise ValueError(f"a GSM8K reference answer ends in '#### N'; got {answer[-80:]!r}")
  return m[1].strip()


def gsm8k_extract(completion: str) -> str | None:
  """The answer a completion gives: its ``#### N``, else its last ``\\boxed{}``, else its last number; or None."""
  marks = _GSM_MARK.findall(completion)
  if marks:
    numbers = _NUMBER.findall(marks[-1])
    return numbers[0] if numbers else marks[-1].strip() or None
  boxed = last_boxed(completion)
  if boxed is not None:
    return boxed
  numbers = _NUMBER.findall(completion)
  return numbers[-1] if numbers else None


def gsm8k(completion: str, answer: str) -> float:
  """1.0 when the completion's final number equals the reference's (``answer`` may be a whole GSM8K solution)."""
  reference = gsm8k_reference(answer) if "####" in answer else answer
  got = gsm8k_extract(completion)
  if got is None:
    return 0.0
  a, b = parse_number(got), parse_number(reference)
  return float(a is not None and b is not None and a == b)


def last_boxed(text: str) -> str | None:
  """The contents of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces; ``\\boxed 5`` too), or None."""
  starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
  for m in reversed(starts):
    i = m.end()
    if i < len(text) and text[i] == "{":
      depth = 0
      for j in range(i, len(text)):
        if text[j] == "{":
          depth += 1
        elif text[j] == "}":
          depth -= 1
          if depth == 0:
            return text[i + 1:j]
      continue  # unbalanced: try an earlier one
    if text[m.start():m.end()].startswith("\\boxed") and m.end() > m.start() + len("\\boxed"):  # "\boxed 5"
      rest = re.match(r"[^\s$]+", text[i:])
      if rest:
        return rest[0]
  return None


def _fix_fracs(s: str) -> str:
  r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{2}`` -> ``\frac{1}{2}``."""
  parts = s.split("\\frac")
  out = parts[0]
  for part in parts[1:]:
    out += "\\frac"
    if part.startswith("{") or len(part) < 2:
      out += part
      continue
    a, b, rest = part[0], part[1], part[2:]
    out += "{" + a + "}" + (("{" + b + "}" + rest) if b != "{" else (b + rest))
  return out


def _fix_slash(s: str) -> str:
  r"""``3/4`` -> ``\frac{3}{4}`` for two integers."""
  m = re.fullmatch(r"(-?\d+)/(\d+)", s)
  return f"\\frac{{{m[1]}}}{{{m[2]}}}" if m else s


def _fix_sqrt(s: str) -> str:
  r"""``\sqrt2`` -> ``\sqrt{2}``."""
  return re.sub(r"\\sqrt(?!\{)(\w)", r"\\sqrt{\1}", s)


def normalize_math(s: str) -> str:
  """A MATH answer in canonical form (Hendrycks et al.'s ``strip_string``, see the module docstring)."""
  s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
  s = s.replace("tfrac", "frac").replace("dfrac", "frac")
  s = s.replace("\\left", "").replace("\\right", "")
  s = s.replace("^{\\circ}", "").replace("^\\circ", "")
  s = s.replace("\\$", "").replace("$", "")
  s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}\s*$", "", s).rstrip()  # trailing units, e.g. "5\text{ cm}"
  s = re.sub(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
  s = s.replace("\\%", "").replace("%", "")
  s = s.replace(" .", " 0.").replace("{.", "{0.")
  if s.startswith("."):
    s = "0" + s
  lhs = s.split("=")
  if len(lhs) == 2 and len(lhs[0].strip()) <= 2:  # "x = 5" -> "5"
    s = lhs[1]
  s = _fix_sqrt(s)
  s = s.replace(" ", "")
  s = _fix_fracs(s)
  if s == "0.5":
    s = "\\frac{1}{2}"
  s = _fix_slash(s)
  return s


def math_equal(a: str, b: str) -> bool:
  """Whether two MATH answers are the same after ``normalize_math`` (or as numbers, when both are numbers)."""
  na, nb = normalize_math(a), normalize_math(b)
  if na == nb:
    return True
  x, y = parse_number(na), parse_number(nb)
  return x is not None and y is not None and x == y


def math(completion: str, answer: str) -> float:
  """1.0 when the completion's last ``\\boxed{}`` equals the reference's (``answer``: a solution with a ``\\boxed{}``,
  or the bare answer)."""
  reference = last_boxed(answer)
  reference = answer if reference is None else reference
  got = last_boxed(completion)
  return float(got is not None and math_equal(got, reference))


REWARDS: dict[str, Callable[[str, str], float]] = {"arithmetic": arithmetic, "gsm8k": gsm8k, "math": math}


def unscorable(task: str, answer) -> str | None:
  """Why a reference ``answer`` can never earn a reward under ``task`` (no number to compare, no answer at all), or
  None when it can: checked on every record before an RL run starts, not discovered as a reward stuck at 0."""
  if not isinstance(answer, str) or not answer.strip():
    return f"the reference answer is {answer!r}, not text"
  if task in ("arithmetic", "gsm8k"):
    reference = answer
    if task == "gsm8k" and "####" in answer:
      m = _GSM_MARK.search(answer)
      reference = m[1].strip() if m else ""
    if parse_number(reference) is None:
      return (f"no number in the reference answer {answer[-80:]!r} (expected a number, or a solution ending in "
              "'#### N')")
  elif task == "math":
    boxed = last_boxed(answer)
    if boxed is not None and not boxed.strip():
      return f"the reference's \\boxed{{}} is empty in {answer[-80:]!r}"
  return None


def get(name: str) -> Callable[[str, str], float]:
  """The reward function of a task name (``REWARDS``)."""
  if name not in REWARDS:
    raise ValueError(f"unknown reward/task {name!r}; valid: {sorted(REWARDS)}")
  return REWARDS[name]
