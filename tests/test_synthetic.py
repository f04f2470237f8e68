"""Tests for lora_jax.synthetic: deterministic tasks, the arithmetic checker, the character tokenizer."""

import math

import numpy as np
import pytest

from lora_jax import data, synthetic


def test_facts_deterministic_with_known_bits():
  task = synthetic.facts(100, 16, seed=0)
  assert task == synthetic.facts(100, 16, seed=0)
  assert task.prompts != synthetic.facts(100, 16, seed=1).prompts
  assert len(set(task.prompts)) == 100  # distinct keys, so every fact is independent
  assert task.bits == 100 * 4.0
  assert math.isclose(synthetic.facts(10, 10, seed=0).bits, 10 * math.log2(10))
  assert {len(c) for c in synthetic.facts(50, 100, seed=0).completions} == {2}  # fixed-width values
  values = np.array([int(c) for c in synthetic.facts(2000, 4, seed=0).completions])
  assert set(values) == {0, 1, 2, 3} and abs(np.mean(values == 0) - 0.25) < 0.05  # uniform values
  assert task.records[0] == {"messages": [{"role": "user", "content": task.prompts[0]},
                                          {"role": "assistant", "content": task.completions[0]}]}


def test_record_formats():
  assert synthetic.as_record("1+1=", "2", "alpaca") == {"instruction": "1+1=", "input": "", "output": "2"}
  assert synthetic.as_record("1+1=", "2", "text") == {"text": "1+1=2"}
  for fmt in ("chat", "alpaca", "text"):
    assert data.detect_format(synthetic.as_record("a", "b", fmt)) == fmt
  with pytest.raises(ValueError, match="unknown format"):
    synthetic.as_record("a", "b", "xml")


def test_arithmetic_deterministic_and_correct():
  task = synthetic.arithmetic(200, seed=0, operators="+-*")
  assert task == synthetic.arithmetic(200, seed=0, operators="+-*")
  assert task.prompts != synthetic.arithmetic(200, seed=1, operators="+-*").prompts
  assert {p[len(p.rstrip("=0123456789")) - 1] for p in task.prompts} <= set("+-*")
  assert all(synthetic.reward(p, c) == 1.0 for p, c in zip(task.prompts, task.completions))
  assert synthetic.arithmetic(3, seed=0).bits == 0.0


def test_reward():
  assert synthetic.reward("12+35=", "47") == 1.0
  assert synthetic.reward("12+35=", " 47<eos>") == 1.0
  assert synthetic.reward("12+35=", "47 is the answer") == 1.0
  assert synthetic.reward("12+35=", "470") == 0.0
  assert synthetic.reward("12+35=", "46") == 0.0
  assert synthetic.reward("12+35=", "forty-seven") == 0.0
  assert synthetic.reward("3-10=", "-7") == 1.0
  assert synthetic.reward("12*12=", "144") == 1.0
  with pytest.raises(ValueError, match="not an arithmetic prompt"):
    synthetic.reward("hello", "1")


def test_corpus_deterministic_from_grammar():
  docs = synthetic.corpus(50, seed=0)
  assert docs == synthetic.corpus(50, seed=0) and docs != synthetic.corpus(50, seed=1)
  words = {w for rules in synthetic.GRAMMAR.values() for expansion, _ in rules for w in expansion}
  for doc in docs:
    for sentence in doc["text"].split(". "):
      tokens = sentence.rstrip(".").split()
      assert tokens and {tokens[0].lower(), *tokens[1:]} <= words | {w.lower() for w in words}
  assert all(math.isclose(sum(p for _, p in rules), 1.0) for rules in synthetic.GRAMMAR.values())


def test_sums_are_distinct_and_correct():
  task = synthetic.sums(2000, seed=3)
  assert len(set(task.prompts)) == 2000 and task == synthetic.sums(2000, seed=3)
  assert all(synthetic.reward(p, c) == 1.0 for p, c in zip(task.prompts, task.completions))
  assert max(int(x) for p in task.prompts for x in p[:-1].split("+")) <= 99
  with pytest.raises(ValueError, match="only 100 exist"):
    synthetic.sums(101, seed=0, max_operand=9)


def test_dialect_is_a_new_language_over_known_characters():
  task = synthetic.dialect(300, seed=0)
  assert task == synthetic.dialect(300, seed=0) and set(task.prompts) == {"Speak Zel."}
  words = {w.lower() for rules in synthetic.DIALECT.values() for expansion, _ in rules for w in expansion}
  english = {w.lower() for rules in synthetic.GRAMMAR.values() for expansion, _ in rules for w in expansion}
  for answer in task.completions:
    tokens = {t.lower() for t in answer.rstrip(".").split()}
    assert tokens <= words and not tokens & english
  text, chat = synthetic.pretraining_corpus(500, seed=0)
  pretraining = " ".join(r["text"] for r in text) + " ".join(m["content"] for r in chat for m in r["messages"])
  assert set("".join(task.completions)) <= set(pretraining)  # every character known
  assert not any(f" {w} " in f" {pretraining.lower()} " for w in words - english)  # no word of it


def test_pretraining_corpus_covers_the_fine_tuning_tokens_and_formats():
  """Every character and chat marker of the fine-tuning tasks (two-digit sums, facts) appears in pretraining, in
  other combinations: no two-digit sum and none of the fine-tuning facts' keys is in it."""
  text, chat = synthetic.pretraining_corpus(3000, seed=0)
  assert len(text) == 900 and len(chat) == 2100 and (text, chat) == synthetic.pretraining_corpus(3000, seed=0)
  tok = synthetic.char_tokenizer()
  rendered = "".join(tok.apply_chat_template(r["messages"], tokenize=False) for r in chat)
  rendered += "".join(r["text"] for r in text)
  tuned = synthetic.sums(500, seed=0).records + synthetic.facts(300, 16, seed=0).records
  needed = "".join(tok.apply_chat_template(r["messages"], tokenize=False) for r in tuned)
  assert set(needed) <= set(rendered)  # every character, role markers included
  prompts = {m["content"] for r in chat for m in r["messages"] if m["role"] == "user"}
  assert {p for p in prompts if "+" in p} and all(len(p.split("+")[0]) == 1 for p in prompts if "+" in p)
  assert not prompts & set(synthetic.facts(300, 16, seed=0).prompts)
  assert {p for p in prompts if "-" in p} and {p for p in prompts if "*" in p}


def test_a_base_can_read_the_dialect_in_its_plain_register():
  """dialect_fraction of the text documents are DIALECT_PLAIN text: the dialect's words, shorter sentences; the
  grammar's documents and the dialogues are those of the corpus without it."""
  text, chat = synthetic.pretraining_corpus(3000, seed=0, dialect_fraction=0.3)
  plain_text, plain_chat = synthetic.pretraining_corpus(3000, seed=0)
  assert chat == plain_chat and len(text) == 900 and text[:630] == synthetic.corpus(630, seed=0)
  dialect_words = {w for rules in synthetic.DIALECT.values() for expansion, _ in rules for w in expansion
                   if w not in synthetic.DIALECT}
  words = {w.strip(".") for r in text[630:] for w in r["text"].split()}
  assert words <= dialect_words and len(words) > 30  # the whole vocabulary of the dialect, nothing else
  tuned = " ".join(synthetic.dialect(2000, seed=0).completions).split()
  plain = " ".join(r["text"] for r in text[630:]).split()
  assert np.mean([len(s.split()) for s in " ".join(tuned).split(".")[:-1]]) > \
      np.mean([len(s.split()) for s in " ".join(plain).split(".")[:-1]]) + 0.5  # the fine-tuning register is longer


def test_char_tokenizer_round_trip_and_save(tmp_path):
  from transformers import AutoTokenizer

  tok = synthetic.char_tokenizer()
  text = "Hello, world!\n\t12+35=47 ~"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert len(ids) == len(text) and tok.decode(ids) == text
  assert tok(text)["input_ids"][0] == tok.bos_token_id
  assert tok("<|user|>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<|user|>")]
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  tok.save_pretrained(str(tmp_path))
  loaded = AutoTokenizer.from_pretrained(str(tmp_path))
  assert loaded(text)["input_ids"] == tok(text)["input_ids"]
  assert loaded.chat_template == data.FALLBACK_CHAT_TEMPLATE
  assert len(loaded) == len(tok) == 4 + 4 + len(synthetic.CHARACTERS)


@pytest.mark.parametrize("fmt", ["chat", "alpaca", "text"])
def test_tasks_go_through_the_pipeline(tmp_path, fmt):
  tok = synthetic.char_tokenizer()
  task = synthetic.arithmetic(20, seed=0, fmt=fmt)
  path = data.write_jsonl(str(tmp_path / "a.jsonl"), task.records)
  (source,) = data.load([path], tok, seq_len=256, template="vanilla", cache_dir=str(tmp_path / "cache"))
  assert len(source) == 20 and source.stats["format"] == fmt
  ids, mask = source.example(0)
  loss = "".join(tok.convert_ids_to_tokens(ids[1:][mask[1:] == 1].tolist()))
  expected = {"chat": task.completions[0] + "<eos>", "alpaca": task.completions[0] + "<eos>",
              "text": task.prompts[0] + task.completions[0] + "<eos>"}[fmt]
  assert loss == expected


def test_the_tiny_bases_cache_key_follows_the_corpus_not_only_its_settings(monkeypatch):
  from experiments import tiny_base
  from experiments.configs import common

  c = common.tiny_base_config()
  c.corpus_documents = 50
  path, corpus = tiny_base.cache_path(c)
  assert tiny_base.cache_path(c)[0] == path and len(corpus[0]) + len(corpus[1]) == 50
  real = synthetic.pretraining_corpus
  monkeypatch.setattr(synthetic, "pretraining_corpus", lambda *a, **k: (real(*a, **k)[0], ()))  # another recipe
  assert tiny_base.cache_path(c)[0] != path
