"""Record formats → token ids and a loss mask: chat messages, Alpaca instructions, plain text.

Formats (one per source, detected from the first record's fields unless given):

- ``chat``: ``{"messages": [{"role", "content"}, ...], "tools"?: [...]}`` (Tulu 3, OpenThoughts, mistral-finetune).
  Rendered with the tokenizer's chat template (``FALLBACK_CHAT_TEMPLATE`` when it has none). Loss on assistant turns
  (their content and end-of-turn tokens, not the header); a per-message ``"weight": 0`` turns one assistant message's
  loss off (mistral-finetune).
- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}`` (OpenThoughts3, the study's
  reasoning data): read as ``chat`` with roles system / user / assistant; ``"weight": 0`` as in chat.
- ``alpaca``: ``{"instruction", "input"?, "output"}`` with an alpaca-lora prompt template; loss on the output and EOS.
- ``text``: ``{"text"}`` pretraining documents; loss everywhere.

``train_on_inputs`` puts loss on prompt tokens too (alpaca-lora's flag). The rendered text is tokenised once, as a
whole, and the loss mask comes from character spans via the fast tokenizer's offsets: tokenising the prompt and the
completion separately would break sentencepiece tokenizers that prepend a space to every call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

FORMATS = ("chat", "sharegpt", "alpaca", "text")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES = ("system", "user", "assistant", "tool")

# alpaca-lora's templates/*.json (prompt with input, prompt without input), plus a bare `vanilla` one.
TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "alpaca_legacy": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:",
    ),
    "alpaca_short": (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "vanilla": ("{instruction}\n{input}\n", "{instruction}\n"),
}

# For tokenizers without a chat template: role markers, assistant turns closed by EOS (the stop token at inference).
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + m['role'] + '|>\\n' + (m['content'] or '') }}"
    "{% if m['tool_calls'] %}{{ m['tool_calls'] | tojson }}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}"
)

# Stands in for an assistant message's content to find the text a chat template puts after it (its end of turn).
_SENTINEL = "\u2063lora_jax_sentinel\u2063"


class DataError(ValueError):
  """A data file or record that cannot be used; the message starts with its location (file:line)."""


class Encoded(NamedTuple):
  """One tokenised example: ids, per-token loss mask, and where the first completion starts (None: no completion)."""
  ids: np.ndarray
  mask: np.ndarray
  prompt_len: int | None


def detect_format(record: Mapping[str, Any]) -> str:
  """The format a record is written in, from its fields."""
  if record.get("messages") is not None:
    return "chat"
  if record.get("conversations") is not None:
    return "sharegpt"
  if record.get("instruction") is not None or record.get("output") is not None:
    return "alpaca"
  if record.get("text") is not None:
    return "text"
  raise DataError(f"record has none of the fields 'messages' (chat), 'conversations' (sharegpt), "
                  f"'instruction'/'output' (alpaca), 'text' "
                  f"(text); its fields: {sorted(record)}")


def check_record(record: Any, fmt: str) -> str | None:
  """What is wrong with a record for a format (missing or mistyped field), or None when it is usable."""
  if not isinstance(record, Mapping):
    return f"expected a JSON object, got {type(record).__name__}"
  if fmt == "text":
    return _check_str(record, "text")
  if fmt == "alpaca":
    for field in ("instruction", "output"):
      if problem := _check_str(record, field):
        return problem
    if record.get("input") is not None and not isinstance(record["input"], str):
      return f"field 'input' must be a string, got {type(record['input']).__name__}"
    return None
  if fmt == "sharegpt":
    return _check_turns(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
  if fmt != "chat":
    raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
  return _check_turns(record.get("messages"), "messages", "role", "content", ROLES)


def _check_turns(turns: Any, field: str, role_key: str, content_key: str, roles) -> str | None:
  """What is wrong with a conversation's list of turns (chat ``messages`` or ShareGPT ``conversations``), or None."""
  if turns is None:
    return f"missing field {field!r}"
  if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
    return f"field {field!r} must be a non-empty list"
  for i, turn in enumerate(turns):
    if not isinstance(turn, Mapping):
      return f"{field}[{i}]: expected an object, got {type(turn).__name__}"
    if turn.get(role_key) is None:
      return f"{field}[{i}]: missing field {role_key!r}"
    if turn[role_key] not in roles:
      return f"{field}[{i}]: unknown {role_key} {turn[role_key]!r} (valid: {', '.join(roles)})"
    content = turn.get(content_key)
    if content is None and not (turn[role_key] == "assistant" and turn.get("tool_calls")):
      return f"{field}[{i}]: missing field {content_key!r}"
    if content is not None and not isinstance(content, str):
      return f"{field}[{i}]: field {content_key!r} must be a string, got {type(content).__name__}"
    weight = turn.get("weight")
    if weight is not None and weight not in (0, 1):
      return f"{field}[{i}]: weight must be 0 or 1, got {weight!r}"
  return None


def sharegpt_to_chat(record: Mapping[str, Any]) -> dict[str, Any]:
  """A (checked) ShareGPT record as a chat record: ``from`` -> role, ``value`` -> content, weights kept."""
  messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"],
               **({"weight": t["weight"]} if t.get("weight") is not None else {})} for t in record["conversations"]]
  return {"messages": messages}


def _check_str(record: Mapping[str, Any], field: str) -> str | None:
  if record.get(field) is None:
    return f"missing field {field!r}"
  if not isinstance(record[field], str):
    return f"field {field!r} must be a string, got {type(record[field]).__name__}"
  return None


def resolve_template(template: str) -> tuple[str, str]:
  """An Alpaca prompt template (with input, without input) by name, or from an alpaca-lora style JSON file."""
  if template in TEMPLATES:
    return TEMPLATES[template]
  if template.endswith(".json") and os.path.isfile(template):
    with open(template) as f:
      spec = json.load(f)
    missing = [key for key in ("prompt_input", "prompt_no_input") if key not in spec]
    if missing:
      raise DataError(f"{template}: template file lacks {missing}")
    return spec["prompt_input"], spec["prompt_no_input"]
  raise DataError(f"unknown prompt template {template!r}; valid: {', '.join(sorted(TEMPLATES))} "
                  f"or the path of an alpaca-lora style .json template")


def alpaca_prompt(record: Mapping[str, Any], template: tuple[str, str]) -> str:
  """The prompt text of an Alpaca record (everything before the output)."""
  with_input, without_input = template
  if record.get("input"):
    return with_input.format(instruction=record["instruction"], input=record["input"])
  return without_input.format(instruction=record["instruction"])


def special_prefix(tokenizer) -> list[int]:
  """The ids the tokenizer puts before a text when adding special tokens (BOS for Llama/Mistral, none for Qwen)."""
  plain = tokenizer("a", add_special_tokens=False)["input_ids"]
  full = tokenizer("a", add_special_tokens=True)["input_ids"]
  for start in range(len(full) - len(plain) + 1):
    if full[start:start + len(plain)] == plain:
      return list(full[:start])
  return []


def check_tokenizer(tokenizer) -> None:
  """Fail early on a tokenizer the pipeline cannot use (no EOS, no character offsets)."""
  if tokenizer.eos_token_id is None:
    raise DataError("the tokenizer has no EOS token; set one (tokenizer.eos_token = ...)")
  if not getattr(tokenizer, "is_fast", False):
    raise DataError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; the loss mask needs "
                    "its character offsets")


def encode(record: Mapping[str, Any], tokenizer, fmt: str, *, template: tuple[str, str] = TEMPLATES["alpaca"],
           train_on_inputs: bool = False) -> Encoded:
  """Tokenise one (checked) record into ids and a 0/1 loss mask over the same tokens."""
  if fmt == "text":
    text = record["text"]
    return _tokenize(tokenizer, special_prefix(tokenizer), text, [(0, len(text), 1)], 1, eos=True)
  if fmt == "alpaca":
    prompt = alpaca_prompt(record, template)
    text = prompt + record["output"]
    return _tokenize(tokenizer, special_prefix(tokenizer), text, [(len(prompt), len(text), 1)],
                     int(train_on_inputs), eos=True)
  if fmt in ("chat", "sharegpt"):
    text, spans = chat_spans(sharegpt_to_chat(record) if fmt == "sharegpt" else record, tokenizer)
    return _tokenize(tokenizer, [], text, spans, int(train_on_inputs), eos=False)
  raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def chat_spans(record: Mapping[str, Any], tokenizer) -> tuple[str, list[tuple[int, int, int]]]:
  """The rendered conversation and the character span (start, end, loss 0/1) of each assistant turn."""
  messages = [_drop_none(m) for m in record["messages"]]
  tools = record.get("tools") or None
  chat_template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE

  def render(msgs, generation_prompt=False):
    return tokenizer.apply_chat_template(msgs, tools=tools, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=generation_prompt)

  text = render(messages)
  spans, cursor = [], 0
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    if i:
      prompt = render(messages[:i], generation_prompt=True)
    else:  # transformers renders no empty conversation: the header is what precedes the content
      marked = render([{**message, "content": _SENTINEL}])
      prompt = marked[:marked.index(_SENTINEL)]
    if not text.startswith(prompt) or len(prompt) < cursor:
      raise DataError(f"messages[{i}]: the chat template renders the conversation before this assistant message "
                      "differently from the start of the whole conversation; cannot place its loss mask")
    turn = render(messages[:i + 1])
    if text.startswith(turn) and len(turn) > len(prompt):
      end = len(turn)
    else:
      # Templates such as Qwen3's render a message differently once later turns follow (reasoning dropped):
      # the turn then ends at the template's own end-of-turn text after its header.
      marked = render(messages[:i] + [{**message, "content": _SENTINEL}])
      end_of_turn = marked[marked.rindex(_SENTINEL) + len(_SENTINEL):]
      found = text.find(end_of_turn, len(prompt)) if end_of_turn.strip() else -1
      if found < 0:
        raise DataError(f"messages[{i}]: cannot find the end of this assistant turn in the rendered "
                        "conversation")
      end = found + len(end_of_turn)
    spans.append((len(prompt), end, 0 if message.get("weight") == 0 else 1))
    cursor = end
  return text, spans


def _drop_none(message: Mapping[str, Any]) -> dict[str, Any]:
  # Arrow fills fields absent from a record with None; templates test `is defined`, so drop them.
  return {key: value for key, value in message.items() if value is not None}


def _tokenize(tokenizer, prefix: list[int], text: str, spans: list[tuple[int, int, int]], outside: int, *,
              eos: bool) -> Encoded:
  """Tokenise text; a token carries the loss of the span holding its last character, else `outside`."""
  encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  ids = list(encoding["input_ids"])
  ends = np.array([end for _, end in encoding["offset_mapping"]], dtype=np.int64) - 1
  mask = np.full(len(ids), outside, dtype=np.uint8)
  prompt_len = None
  for start, end, loss in spans:
    inside = (ends >= start) & (ends < end)
    if loss:
      mask[inside] = 1
      if prompt_len is None and inside.any():
        prompt_len = len(prefix) + int(np.argmax(inside))
    else:
      mask[inside] = 0
  mask = np.concatenate([np.full(len(prefix), outside, np.uint8), mask])
  ids = prefix + ids
  if eos:
    ids.append(tokenizer.eos_token_id)
    mask = np.append(mask, np.uint8(1))
    if prompt_len is None and spans:
      prompt_len = len(ids) - 1  # an empty completion still teaches EOS
  return Encoded(np.asarray(ids, dtype=np.int32), mask, prompt_len)


def truncate(example: Encoded, max_len: int, eos_id: int) -> tuple[Encoded, bool]:
  """Cut an example to max_len tokens, ending it with EOS (alpaca-lora dropped it); also say whether it was cut."""
  if len(example.ids) <= max_len:
    return example, False
  ids = np.append(example.ids[:max_len - 1], np.int32(eos_id))
  # EOS takes the loss of the token it replaces: cut inside a completion, the model still learns to stop.
  mask = np.append(example.mask[:max_len - 1], example.mask[max_len - 1])
  return Encoded(ids, mask, example.prompt_len), True
