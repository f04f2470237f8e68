"""Synthetic data, deterministic by seed, and a character tokenizer: experiments and tests with no downloads.

- ``facts``: random key → value pairs; the completions carry exactly ``n_facts * log2(num_values)`` bits, a known
  amount of information for probing how much a LoRA of a given rank can store.
- ``arithmetic``: "12+35=" → "47", with ``reward(prompt, completion)`` to check answers (for supervised targets and
  as an RL reward).
- ``corpus``: documents from a small stochastic grammar; ``pretraining_corpus`` adds chat ``dialogues`` that use every
  token and format of the fine-tuning tasks in other combinations: the study base's pretraining data.
- ``char_tokenizer``: a transformers fast tokenizer, one token per printable ASCII character plus pad/bos/eos/unk and
  the role markers of ``lora_jax.data.FALLBACK_CHAT_TEMPLATE`` (its chat template); ``save_pretrained`` works.

Every task yields records in the pipeline's formats (chat, alpaca or text), so ``lora_jax.data`` tokenises them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from lora_jax.data.formats import FALLBACK_CHAT_TEMPLATE

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")  # FALLBACK_CHAT_TEMPLATE's role markers
CHARACTERS = tuple(sorted(set(string.printable) - set("\x0b\x0c\r")))
OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

_PROBLEM = re.compile(r"^\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*$")
_ANSWER = re.compile(r"^\s*(-?\d+)(?!\d)")


@dataclasses.dataclass(frozen=True)
class Task:
  """Prompt → completion pairs, the same pairs as records, and the information (bits) the completions carry."""
  prompts: tuple[str, ...]
  completions: tuple[str, ...]
  records: tuple[dict[str, Any], ...]
  bits: float  # entropy of the completions given the prompts; 0 for a deterministic rule such as arithmetic


def as_record(prompt: str, completion: str, fmt: str = "chat") -> dict[str, Any]:
  """A prompt/completion pair as a chat, Alpaca or text record."""
  if fmt == "chat":
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
  if fmt == "alpaca":
    return {"instruction": prompt, "input": "", "output": completion}
  if fmt == "text":
    return {"text": prompt + completion}
  raise ValueError(f"unknown format {fmt!r}; valid: chat, alpaca, text")


def _task(prompts: Sequence[str], completions: Sequence[str], fmt: str, bits: float) -> Task:
  records = tuple(as_record(p, c, fmt) for p, c in zip(prompts, completions))
  return Task(tuple(prompts), tuple(completions), records, bits)


def facts(n_facts: int, num_values: int, *, seed: int, key_len: int = 6, fmt: str = "chat") -> Task:
  """Distinct random lowercase keys, each with a uniformly random value of num_values; bits = n·log2(num_values)."""
  if n_facts > 26 ** key_len // 2:
    raise ValueError(f"{n_facts} facts need longer keys than {key_len} letters")
  if num_values < 2:
    raise ValueError(f"num_values must be at least 2, got {num_values}")
  rng = np.random.default_rng(seed)
  keys: dict[str, None] = {}
  while len(keys) < n_facts:
    letters = rng.integers(0, 26, size=(n_facts - len(keys), key_len))
    for row in letters:
      keys.setdefault("".join(string.ascii_lowercase[i] for i in row))
  keys_list = list(keys)[:n_facts]
  width = len(str(num_values - 1))
  values = [f"{v:0{width}d}" for v in rng.integers(0, num_values, size=n_facts)]
  return _task(keys_list, values, fmt, n_facts * math.log2(num_values))


def arithmetic(n: int, *, seed: int, max_operand: int = 99, operators: str = "+", fmt: str = "chat") -> Task:
  """Problems 'a<op>b=' with operands in [0, max_operand] and their answers as completions."""
  unknown = set(operators) - set(OPERATORS)
  if unknown or not operators:
    raise ValueError(f"unknown operators {sorted(unknown)}; valid: {''.join(OPERATORS)}")
  rng = np.random.default_rng(seed)
  a, b = rng.integers(0, max_operand + 1, size=(2, n))
  ops = rng.choice(list(operators), size=n)
  prompts = [f"{x}{op}{y}=" for x, op, y in zip(a.tolist(), ops.tolist(), b.tolist())]
  completions = [str(OPERATORS[op](x, y)) for x, op, y in zip(a.tolist(), ops.tolist(), b.tolist())]
  return _task(prompts, completions, fmt, 0.0)


def sums(n: int, *, seed: int, max_operand: int = 99, fmt: str = "chat") -> Task:
  """n distinct problems 'a+b=' (operands in [0, max_operand]) in random order, with their sums: a held-out split of
  them holds problems never trained on (``arithmetic`` draws with replacement and repeats problems)."""
  space = (max_operand + 1) ** 2
  if n > space:
    raise ValueError(f"sums: {n} distinct problems asked, only {space} exist with operands up to {max_operand}")
  pairs = np.random.default_rng(seed).permutation(space)[:n]
  a, b = (pairs // (max_operand + 1)).tolist(), (pairs % (max_operand + 1)).tolist()
  return _task([f"{x}+{y}=" for x, y in zip(a, b)], [str(x + y) for x, y in zip(a, b)], fmt, 0.0)


def reward(prompt: str, completion: str) -> float:
  """1.0 when the completion starts with the right answer to an arithmetic prompt 'a<op>b=', else 0.0."""
  problem = _PROBLEM.match(prompt)
  if problem is None:
    raise ValueError(f"not an arithmetic prompt: {prompt!r}")
  a, op, b = int(problem[1]), problem[2], int(problem[3])
  answer = _ANSWER.match(completion)
  return float(answer is not None and int(answer[1]) == OPERATORS[op](a, b))


# A small probabilistic grammar: nonterminal → [(expansion, probability)]; terminals are words.
GRAMMAR = {
    "S": [(("NP", "VP"), 1.0)],
    "NP": [(("Det", "N"), 0.6), (("Det", "Adj", "N"), 0.3), (("Name",), 0.1)],
    "VP": [(("Vt", "NP"), 0.5), (("Vi",), 0.3), (("Vt", "NP", "PP"), 0.2)],
    "PP": [(("P", "NP"), 1.0)],
    "Det": [(("the",), 0.5), (("a",), 0.3), (("every",), 0.1), (("some",), 0.1)],
    "Adj": [((w,), 1 / 6) for w in ("small", "red", "quiet", "old", "happy", "bright")],
    "N": [((w,), 1 / 8) for w in ("cat", "dog", "bird", "river", "tree", "child", "robot", "house")],
    "Name": [((w,), 1 / 3) for w in ("Alice", "Bob", "Carol")],
    "Vt": [((w,), 1 / 5) for w in ("sees", "likes", "follows", "finds", "builds")],
    "Vi": [((w,), 1 / 4) for w in ("sleeps", "runs", "sings", "waits")],
    "P": [((w,), 1 / 4) for w in ("near", "under", "with", "behind")],
}


def _expand(symbol: str, rng: np.random.Generator, grammar: dict) -> list[str]:
  if symbol not in grammar:
    return [symbol]
  rules = grammar[symbol]
  expansion = rules[rng.choice(len(rules), p=[p for _, p in rules])][0]
  return [word for part in expansion for word in _expand(part, rng, grammar)]


# A second language for fine-tuning (``dialect``): new words over the same characters, verb-first, nouns before their
# determiners, postpositions. Nothing of it is in the pretraining corpus but its characters.
DIALECT = {
    "S": [(("Vt", "NP", "NP"), 0.5), (("Vi", "NP"), 0.3), (("Vt", "NP", "NP", "PP"), 0.2)],
    "NP": [(("N", "Det"), 0.6), (("N", "Adj", "Det"), 0.3), (("Name",), 0.1)],
    "PP": [(("NP", "P"), 1.0)],
    "Det": [(("ka",), 0.5), (("lo",), 0.3), (("sem",), 0.1), (("vu",), 0.1)],
    "Adj": [((w,), 1 / 6) for w in ("pirel", "tosk", "mavi", "quen", "dorub", "ilsa")],
    "N": [((w,), 1 / 8) for w in ("zarn", "fello", "krim", "batuw", "oprel", "genni", "thask", "mumo")],
    "Name": [((w,), 1 / 3) for w in ("aluz", "brek", "casso")],
    "Vt": [((w,), 1 / 5) for w in ("vindra", "solke", "myrre", "padun", "ekkol")],
    "Vi": [((w,), 1 / 4) for w in ("hushe", "tarbo", "linnu", "wessa")],
    "P": [((w,), 1 / 4) for w in ("ur", "zet", "onna", "bi")],
}


# The dialect's plain register, for pretraining (``pretraining_corpus(dialect_fraction=...)``): DIALECT's words and word
# order, shorter sentences (fewer adjectives, objects and postpositions). A base that has read it knows the language;
# fine-tuning on ``dialect`` (chat answers in the full register) is then a shift of format and style, not new words.
DIALECT_PLAIN = {**DIALECT,
                 "S": [(("Vt", "NP", "NP"), 0.35), (("Vi", "NP"), 0.6), (("Vt", "NP", "NP", "PP"), 0.05)],
                 "NP": [(("N", "Det"), 0.8), (("N", "Adj", "Det"), 0.1), (("Name",), 0.1)]}


def sentence(rng: np.random.Generator, grammar: dict | None = None) -> str:
  """One sentence drawn from ``grammar`` (default GRAMMAR)."""
  text = " ".join(_expand("S", rng, GRAMMAR if grammar is None else grammar))
  return text[0].upper() + text[1:] + "."


def corpus(n_docs: int, *, seed: int, max_sentences: int = 4) -> list[dict[str, str]]:
  """Text records of 1..max_sentences grammar sentences each."""
  rng = np.random.default_rng(seed)
  return [{"text": " ".join(sentence(rng) for _ in range(rng.integers(1, max_sentences + 1)))}
          for _ in range(n_docs)]


def dialogues(n: int, *, seed: int) -> tuple[dict[str, Any], ...]:
  """Chat records that use the fine-tuning tasks' tokens and formats in other combinations (``pretraining_corpus``):
  two-digit subtractions, small products, one-digit sums, facts under random keys, and grammar sentences continued.
  (A glossary of DIALECT's words here, tried at 0816f1a, raised the step-0 NLL on the sums from 2.37 to 4.12 nats and
  left the dialect's at 6.64: docs/results/calibration/.)"""
  rng = np.random.default_rng(seed)
  kinds = ("subtract", "multiply", "add1", "facts", "sentences")
  picks = rng.choice(len(kinds), size=n, p=[0.25, 0.1, 0.15, 0.25, 0.25])
  fact_task = facts(int(np.sum(picks == 3)), 16, seed=seed + 1_000_003)  # keys no fine-tuning seed draws in practice
  out, next_fact = [], iter(zip(fact_task.prompts, fact_task.completions))
  for kind in (kinds[k] for k in picks):
    if kind == "subtract":
      a, b = rng.integers(0, 100, size=2).tolist()
      prompt, answer = f"{a}-{b}=", str(a - b)
    elif kind == "multiply":
      a, b = rng.integers(0, 13, size=2).tolist()
      prompt, answer = f"{a}*{b}=", str(a * b)
    elif kind == "add1":
      a, b = rng.integers(0, 10, size=2).tolist()
      prompt, answer = f"{a}+{b}=", str(a + b)
    elif kind == "facts":
      prompt, answer = next(next_fact)
    else:
      prompt, answer = sentence(rng), sentence(rng)
    out.append(as_record(prompt, answer, "chat"))
  return tuple(out)


def dialect(n: int, *, seed: int, fmt: str = "chat") -> Task:
  """n chat records "Speak Zel." -> one DIALECT sentence: a new language (words, word order) over known characters in
  a known format, learnt as a distribution (its entropy is the NLL floor), not a skill that clicks."""
  rng = np.random.default_rng(seed)
  answers = [" ".join(_expand("S", rng, DIALECT)) + "." for _ in range(n)]  # lower case: every letter is known
  return _task(["Speak Zel."] * n, answers, fmt, math.nan)


def dialect_text(n_docs: int, *, seed: int, max_sentences: int = 4) -> list[dict[str, str]]:
  """Text records of 1..max_sentences DIALECT_PLAIN sentences each, lower case as the ``dialect`` task writes them."""
  rng = np.random.default_rng(seed)
  return [{"text": " ".join(" ".join(_expand("S", rng, DIALECT_PLAIN)) + "."
                            for _ in range(rng.integers(1, max_sentences + 1)))} for _ in range(n_docs)]


def pretraining_corpus(n_docs: int, *, seed: int, chat_fraction: float = 0.7,
                       dialect_fraction: float = 0.0) -> tuple[list[dict], tuple[dict, ...]]:
  """The study base's pretraining data: (text records of grammar sentences, chat ``dialogues``), n_docs in all.

  Every token and format of the fine-tuning tasks (digits, '+', '=', the chat template's role markers, facts' keys and
  values) appears here in other combinations, so fine-tuning teaches new skills and facts (two-digit sums, the
  fine-tuning facts), not new tokens. ``dialect_fraction`` of the text records are in the dialect's plain register
  (``dialect_text``), after the grammar's: the base then knows the language the ``dialect`` task answers in.
  """
  n_chat = int(round(chat_fraction * n_docs))
  n_dialect = int(round(dialect_fraction * (n_docs - n_chat)))
  text = corpus(n_docs - n_chat - n_dialect, seed=seed)
  if n_dialect:
    text += dialect_text(n_dialect, seed=seed + 2)
  return text, dialogues(n_chat, seed=seed + 1)


def char_tokenizer():
  """A fast tokenizer with one token per printable ASCII character, pad/bos/eos/unk, role markers, a chat template."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ROLE_TOKENS + CHARACTERS)}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
  backend.decoder = decoders.Fuse()
  backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                         special_tokens=[("<bos>", vocab["<bos>"])])
  backend.add_special_tokens(list(SPECIAL_TOKENS + ROLE_TOKENS))
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                      eos_token="<eos>", unk_token="<unk>", model_max_length=1 << 20)
  tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
  return tokenizer


SOURCE_PREFIX = "synthetic:"
SOURCE_TASKS = ("facts", "arithmetic", "sums", "dialect")  # sums: distinct two-digit sums; dialect: a new language


def materialize(spec: str, *, n: int, seed: int, cache_dir: str | os.PathLike, max_operand: int = 99) -> str:
  """Turns a ``synthetic:TASK[:weight]`` source spec into a JSONL file (written once) and its ``path[:weight]``.

  The file name depends only on task, size, seed (and ``max_operand``, the largest operand of ``sums``, when it is
  not 99), so every run with the same settings reads the same path (a data split seeded by the source name then
  agrees between runs). Other specs come back unchanged.
  """
  if not spec.startswith(SOURCE_PREFIX):
    return spec
  task, *weight = spec[len(SOURCE_PREFIX):].split(":")
  if task == "facts":
    records = facts(n, 16, seed=seed).records
  elif task == "arithmetic":
    records = arithmetic(n, seed=seed).records
  elif task == "sums":
    records = sums(n, seed=seed, max_operand=max_operand).records
  elif task == "dialect":
    records = dialect(n, seed=seed).records
  else:
    raise ValueError(f"unknown synthetic task {task!r} in {spec!r}; valid: {list(SOURCE_TASKS)}")
  suffix = f"-max{max_operand}" if task == "sums" and max_operand != 99 else ""
  path = pathlib.Path(cache_dir) / "synthetic" / f"{task}-n{n}-seed{seed}{suffix}.jsonl"
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in records))
    partial.rename(path)
  return ":".join([str(path), *weight])
