"""Tests for lora_jax.data: formats and loss masks, reading and errors, caching, batching, mixing, hosts, resume."""

import json
import os

import numpy as np
import pytest

from lora_jax import data, synthetic
from lora_jax.cli import validate as validate_cli
from lora_jax.data import validate as validate_module


@pytest.fixture(scope="module")
def tok():
  return synthetic.char_tokenizer()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
  """Keep the Arrow files `datasets` writes out of the user's cache."""
  import datasets

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def tokens(tokenizer, ids):
  return "".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def loss_text(tokenizer, example):
  return tokens(tokenizer, example.ids[example.mask == 1])


def write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def make_source(lengths, name="src", weight=None, first_id=0):
  """A TokenizedSource whose example e is ids first_id + [offset .. offset + length), mask 1 on odd ids."""
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  ids = np.arange(first_id, first_id + offsets[-1], dtype=np.int32)
  mask = (ids % 2).astype(np.uint8)
  return data.TokenizedSource(name, weight, ids, mask, offsets, np.arange(len(lengths)), {})


# --- formats and loss masks ---

CHAT = {"messages": [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo", "weight": 0},
    {"role": "user", "content": "ok"},
    {"role": "assistant", "content": "go"},
]}


def test_chat_mask_by_hand(tok):
  example = data.encode(CHAT, tok, "chat")
  assert tokens(tok, example.ids) == ("<bos><|system|>\nS\n<|user|>\nhi\n<|assistant|>\nyo<eos>\n"
                                      "<|user|>\nok\n<|assistant|>\ngo<eos>")
  # Only the last assistant turn: its content and EOS, not its header; the weight-0 turn carries no loss.
  expected = np.zeros(len(example.ids), np.uint8)
  expected[-3:] = 1
  np.testing.assert_array_equal(example.mask, expected)
  assert example.prompt_len == len(example.ids) - 3


def test_sharegpt_records_encode_as_the_same_chat(tok, tmp_path):
  share = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "yo", "weight": 0}, {"from": "human", "value": "ok"},
                             {"from": "gpt", "value": "go"}]}
  assert data.detect_format(share) == "sharegpt" and data.check_record(share, "sharegpt") is None
  a, b = data.encode(share, tok, "sharegpt"), data.encode(CHAT, tok, "chat")
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_array_equal(a.mask, b.mask)
  assert "conversations[1]: unknown from 'bot'" in data.check_record(
      {"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}, "sharegpt")
  assert "conversations[0]: missing field 'value'" in data.check_record({"conversations": [{"from": "gpt"}]}, "sharegpt")
  path = write(tmp_path, "ot3.jsonl", [json.dumps(share), json.dumps({"conversations": [{"from": "gpt", "value": 3}]})])
  with pytest.raises(data.DataError, match=rf"{path}:2: .*conversations\[0\]: field 'value'"):
    data.tokenize(data.Source(path), tok, max_len=64)


def test_chat_mask_train_on_inputs(tok):
  example = data.encode(CHAT, tok, "chat", train_on_inputs=True)
  masked = [t for t, m in zip(tok.convert_ids_to_tokens(example.ids.tolist()), example.mask) if m == 0]
  assert masked == ["y", "o", "<eos>"]  # only the weight-0 assistant message stays off


def test_chat_mask_with_weight_one_everywhere(tok):
  record = {"messages": [dict(m, weight=1) if m["role"] == "assistant" else m for m in CHAT["messages"]]}
  assert loss_text(tok, data.encode(record, tok, "chat")) == "yo<eos>go<eos>"


def test_chat_template_not_prefix_consistent(tok):
  # Like Qwen3: the last assistant turn renders an (empty) think block that earlier turns drop.
  template = ("{% for m in messages %}{{ '[' + m['role'] + ']' }}"
              "{% if m['role'] == 'assistant' and loop.last %}{{ '<think></think>' }}{% endif %}"
              "{{ m['content'] + '|E|' }}{% endfor %}{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}")
  qwen_like = synthetic.char_tokenizer()
  qwen_like.chat_template = template
  record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "B"},
                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "D"}]}
  example = data.encode(record, qwen_like, "chat")
  assert tokens(qwen_like, example.ids) == "[user]a|E|[assistant]B|E|[user]c|E|[assistant]<think></think>D|E|"
  assert loss_text(qwen_like, example) == "B|E|<think></think>D|E|"


def test_chat_starting_with_assistant(tok):
  example = data.encode({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
                        tok, "chat")
  assert tokens(tok, example.ids) == "<bos><|assistant|>\nhi<eos>\n<|user|>\nx"
  assert loss_text(tok, example) == "hi<eos>"


def test_chat_without_template_uses_fallback(tok):
  bare = synthetic.char_tokenizer()
  bare.chat_template = None
  assert data.encode(CHAT, bare, "chat").ids.tolist() == data.encode(CHAT, tok, "chat").ids.tolist()


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_mask(tok, with_input):
  record = {"instruction": "Add.", "input": "1 2" if with_input else "", "output": "3"}
  prompt = data.TEMPLATES["alpaca"][0 if with_input else 1].format(instruction="Add.", input="1 2")
  example = data.encode(record, tok, "alpaca")
  assert tokens(tok, example.ids) == "<bos>" + prompt + "3<eos>"
  assert loss_text(tok, example) == "3<eos>"
  assert example.prompt_len == 1 + len(prompt)
  on_inputs = data.encode(record, tok, "alpaca", train_on_inputs=True)
  assert on_inputs.mask.all()


def test_alpaca_vanilla_template(tok):
  template = data.resolve_template("vanilla")
  example = data.encode({"instruction": "Hi", "output": "yo"}, tok, "alpaca", template=template)
  assert tokens(tok, example.ids) == "<bos>Hi\nyo<eos>"
  assert loss_text(tok, example) == "yo<eos>"


def test_alpaca_template_from_file(tok, tmp_path):
  path = tmp_path / "mine.json"
  path.write_text(json.dumps({"prompt_input": "Q: {instruction} {input}\nA: ",
                              "prompt_no_input": "Q: {instruction}\nA: "}))
  example = data.encode({"instruction": "x", "output": "y"}, tok, "alpaca", template=data.resolve_template(str(path)))
  assert tokens(tok, example.ids) == "<bos>Q: x\nA: y<eos>"


def test_unknown_template_lists_valid_ones():
  with pytest.raises(data.DataError, match=r"unknown prompt template 'alpacca'.*alpaca.*vanilla"):
    data.resolve_template("alpacca")


def test_text_mask(tok):
  example = data.encode({"text": "ab c"}, tok, "text")
  assert tokens(tok, example.ids) == "<bos>ab c<eos>"
  assert example.mask.all()


def test_mask_from_offsets_with_bpe_tokenizer():
  # Multi-character tokens: the mask follows character spans through the tokenizer's offsets.
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  texts = [r["text"] for r in synthetic.corpus(200, seed=0)] + [data.TEMPLATES["alpaca"][1]] * 20
  backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  bpe = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
  output = "The small cat sees a red tree."
  example = data.encode({"instruction": "Write a sentence.", "output": output}, bpe, "alpaca")
  assert example.mask.sum() < len(output) // 2  # tokens span several characters
  assert bpe.decode(example.ids[example.mask == 1]) == output + "<eos>"
  assert example.ids[0] != bpe.eos_token_id  # this tokenizer adds no BOS


def test_eos_kept_on_truncation(tok):
  example = data.encode({"instruction": "I", "output": "a long answer"}, tok, "alpaca")
  cut, was_cut = data.truncate(example, len(example.ids) - 4, tok.eos_token_id)
  assert was_cut and len(cut.ids) == len(example.ids) - 4
  assert cut.ids[-1] == tok.eos_token_id and cut.mask[-1] == 1
  assert loss_text(tok, cut) == "a long an<eos>"  # 'swer<eos>' cut, EOS put back
  same, was_cut = data.truncate(example, len(example.ids), tok.eos_token_id)
  assert not was_cut and same is example


def test_detect_format():
  assert data.detect_format({"messages": []}) == "chat"
  assert data.detect_format({"instruction": "a", "output": "b"}) == "alpaca"
  assert data.detect_format({"text": "a"}) == "text"
  with pytest.raises(data.DataError, match="none of the fields.*'prompt'"):
    data.detect_format({"prompt": "a"})


# --- reading: errors with file:line ---

def test_corrupt_jsonl_line_reports_file_and_line(tok, tmp_path):
  path = write(tmp_path, "bad.jsonl", ['{"text": "ok"}', "", '{"text": "broken"', '{"text": "ok"}'])
  with pytest.raises(data.DataError, match=rf"^{path}:3: invalid JSON"):
    data.tokenize(data.Source(path), tok, max_len=64)


def test_missing_field_is_named(tok, tmp_path):
  path = write(tmp_path, "alpaca.jsonl", [json.dumps({"instruction": "a", "output": "b"}),
                                          json.dumps({"instruction": "a", "input": "x"})])
  with pytest.raises(data.DataError, match=rf"^{path}:2: missing field 'output'"):
    data.tokenize(data.Source(path), tok, max_len=64)
  chat = write(tmp_path, "chat.jsonl", [json.dumps({"messages": [{"role": "user", "content": "a"}]}),
                                        json.dumps({"messages": [{"content": "a"}]})])
  with pytest.raises(data.DataError, match=rf"^{chat}:2: messages\[0\]: missing field 'role'"):
    data.tokenize(data.Source(chat), tok, max_len=64)


def test_json_array_file_locations(tok, tmp_path):
  path = tmp_path / "alpaca.json"
  path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
  with pytest.raises(data.DataError, match=rf"^{path}:3: missing field 'output'"):
    data.tokenize(data.Source(str(path)), tok, max_len=64)
  problems = []
  source = data.tokenize(data.Source(str(path)), tok, max_len=64, template="vanilla", problems=problems)
  assert len(source) == 1 and problems == [f"{path}:3: missing field 'output'"]


def test_missing_file(tok, tmp_path):
  with pytest.raises(data.DataError, match="no such file"):
    data.tokenize(data.Source(str(tmp_path / "nope.jsonl")), tok, max_len=64)


def test_unsupported_extension_names_the_file_the_extension_and_the_supported_ones(tok, tmp_path):
  path = tmp_path / "train.csv"
  path.write_text("instruction,output\nhi,yo\n")
  with pytest.raises(data.DataError, match=rf"^{path}: unsupported file extension '.csv'; supported: .jsonl, .json, "
                                           r".parquet files, a dataset directory or a hub dataset name"):
    data.load([str(path)], tok, seq_len=32)


def test_prompt_longer_than_seq_len(tok, tmp_path):
  records = [{"instruction": "short", "output": "x"}, {"instruction": "a much longer instruction", "output": "y"}]
  path = data.write_jsonl(str(tmp_path / "a.jsonl"), records)
  seq_len = len(data.encode(records[0], tok, "alpaca", template=data.resolve_template("alpaca_short")).ids) + 2
  with pytest.raises(data.DataError, match=rf"^{path}:2: the prompt is \d+ tokens"):
    data.load([path], tok, seq_len=seq_len, template="alpaca_short")
  (source,) = data.load([path], tok, seq_len=seq_len, template="alpaca_short", overflow="skip")
  assert len(source) == 1 and source.stats["skipped"] == 1
  # The checker agrees with the run: a problem under overflow='error', a counted skip under 'skip'.
  strict = validate_module.validate([path], tok, seq_len, 1, template="alpaca_short")
  assert len(strict["errors"]) == 1 and "the prompt is" in strict["errors"][0]
  skipping = validate_module.validate([path], tok, seq_len, 1, template="alpaca_short", overflow="skip")
  assert skipping["errors"] == [] and skipping["skipped"] == 1


def test_parquet_matches_jsonl(tok, tmp_path):
  import datasets

  records = synthetic.arithmetic(5, seed=0, fmt="alpaca").records
  jsonl = data.write_jsonl(str(tmp_path / "a.jsonl"), records)
  parquet = str(tmp_path / "a.parquet")
  datasets.Dataset.from_list(list(records)).to_parquet(parquet)
  a, b = (data.tokenize(data.Source(p), tok, max_len=256) for p in (jsonl, parquet))
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_array_equal(a.mask, b.mask)


def test_chat_file_matches_encode(tok, tmp_path):
  # Arrow fills fields that only some messages have (weight, tool_calls) with None; they must not change tokens.
  tool_use = {"messages": [
      {"role": "user", "content": "weather?"},
      {"role": "assistant", "content": None, "tool_calls": [{"name": "get", "arguments": "{}"}]},
      {"role": "tool", "content": "sun"},
      {"role": "assistant", "content": "sunny"},
  ]}
  path = data.write_jsonl(str(tmp_path / "chat.jsonl"), [CHAT, tool_use])
  source = data.tokenize(data.Source(path), tok, max_len=256)
  for i, record in enumerate([CHAT, tool_use]):
    expected = data.encode(record, tok, "chat")
    ids, mask = source.example(i)
    np.testing.assert_array_equal(ids, expected.ids)
    np.testing.assert_array_equal(mask, expected.mask)
  assert loss_text(tok, data.encode(tool_use, tok, "chat")) == '[{"name": "get", "arguments": "{}"}]<eos>sunny<eos>'


def test_dataset_directory_source(tok, tmp_path):
  # A directory goes to datasets.load_dataset(path) like a hub name (which needs the network).
  (tmp_path / "ds").mkdir()
  data.write_jsonl(str(tmp_path / "ds" / "train.jsonl"), synthetic.corpus(7, seed=0))
  source = data.tokenize(data.Source(str(tmp_path / "ds")), tok, max_len=512)
  assert len(source) == 7 and source.stats["format"] == "text"


def test_parse_sources():
  assert data.parse_source("data/a.jsonl:0.25") == data.Source("data/a.jsonl", 0.25)
  assert data.parse_source("allenai/tulu-3-sft-mixture") == data.Source("allenai/tulu-3-sft-mixture")
  assert data.parse_source("open-thoughts/OpenThoughts3-1.2M@train[:10000]:2") == data.Source(
      "open-thoughts/OpenThoughts3-1.2M", 2.0, "train[:10000]")
  assert data.parse_source("a/b@test") == data.Source("a/b", None, "test")
  with pytest.raises(data.DataError, match="every source or to none"):
    data.parse_sources(["a.jsonl:1", "b.jsonl"])
  with pytest.raises(data.DataError, match="positive"):
    data.parse_source("a.jsonl:0")


# --- tokenised sources: cache and split ---

def test_tokenize_cache(tok, tmp_path):
  path = data.write_jsonl(str(tmp_path / "a.jsonl"), synthetic.facts(20, 10, seed=0).records)
  cache = str(tmp_path / "cache")
  first = data.tokenize(data.Source(path), tok, max_len=64, cache_dir=cache)
  again = data.tokenize(data.Source(path), tok, max_len=64, cache_dir=cache)
  assert isinstance(again.ids, np.memmap) and not isinstance(first.ids, np.memmap)
  for name in ("ids", "mask", "offsets"):
    np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
  assert again.stats == first.stats
  on_inputs = data.tokenize(data.Source(path), tok, max_len=64, cache_dir=cache, train_on_inputs=True)
  assert on_inputs.mask.sum() > first.mask.sum()  # other settings, other cache entry
  data.write_jsonl(path, synthetic.facts(20, 10, seed=1).records)  # other content, other cache entry
  changed = data.tokenize(data.Source(path), tok, max_len=64, cache_dir=cache)
  assert not np.array_equal(changed.ids, first.ids)
  assert len(os.listdir(os.path.join(cache, "tokens"))) == 3


def test_tokenize_stats(tok, tmp_path):
  task = synthetic.facts(10, 100, seed=0, fmt="alpaca")
  path = data.write_jsonl(str(tmp_path / "a.jsonl"), task.records)
  source = data.tokenize(data.Source(path), tok, max_len=256, template="vanilla")
  # <bos> key \n value <eos>: the value's 2 digits and EOS are loss targets.
  assert source.stats["tokens"] == 10 * (1 + 6 + 1 + 2 + 1)
  assert source.stats["loss_tokens"] == 10 * 3
  assert source.stats["examples"] == 10 and source.stats["truncated"] == 0


def test_split_disjoint_covering_and_seeded():
  source = make_source([3] * 50)
  train, evaluation = data.split(source, eval_size=10, seed=0)
  assert len(evaluation) == 10 and len(train) == 40
  assert set(train.index).isdisjoint(evaluation.index)
  assert set(train.index) | set(evaluation.index) == set(range(50))
  again, _ = data.split(source, eval_size=10, seed=0)
  other, _ = data.split(source, eval_size=10, seed=1)
  np.testing.assert_array_equal(train.index, again.index)
  assert not np.array_equal(train.index, other.index)
  assert len(data.split(source, eval_size=0.2, seed=0)[1]) == 10
  with pytest.raises(data.DataError, match="no training examples"):
    data.split(source, eval_size=50, seed=0)


# --- batching ---

def test_packing_segments_positions_and_shift():
  source = make_source([4, 3, 5])  # 3, 2, 4 positions
  iterator = data.BatchIterator([source], batch_size=2, seq_len=6, seed=0, shuffle=False)
  batch = next(iterator)
  assert {k: v.dtype for k, v in batch.items()} == {
      "inputs": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
      "positions": np.int32}
  # Row 0: examples 0 and 1 (3 + 2 positions) and one pad; row 1: example 2 and two pads.
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
  np.testing.assert_array_equal(batch["inputs"], [[0, 1, 2, 4, 5, 0], [7, 8, 9, 10, 0, 0]])
  np.testing.assert_array_equal(batch["targets"], [[1, 2, 3, 5, 6, 0], [8, 9, 10, 11, 0, 0]])
  # The loss mask is the target token's mask (odd ids here), zero on padding.
  np.testing.assert_array_equal(batch["loss_mask"], [[1, 0, 1, 1, 0, 0], [0, 1, 0, 1, 0, 0]])


def test_padding_mode_one_example_per_row():
  source = make_source([4, 3, 5])
  iterator = data.BatchIterator([source], batch_size=3, seq_len=6, seed=0, shuffle=False, packing=False, pad_id=-1)
  batch = next(iterator)
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(batch["inputs"][1], [4, 5, -1, -1, -1, -1])


def test_example_longer_than_seq_len_is_refused():
  with pytest.raises(data.DataError, match="does not fit seq_len 4"):
    data.BatchIterator([make_source([6])], batch_size=1, seq_len=4, seed=0)


def batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(x[key], y[key])


def test_shuffle_deterministic_by_seed_and_epoch():
  source = make_source(list(range(2, 40)))
  make = lambda seed: data.BatchIterator([source], batch_size=2, seq_len=64, seed=seed)
  assert_same(batches(make(0), 6), batches(make(0), 6))
  first, other = make(0), make(1)
  assert not np.array_equal(next(first)["inputs"], next(other)["inputs"])
  plan0, plan1 = first.plan(0), first.plan(1)
  assert not np.array_equal(plan0.example, plan1.example)
  np.testing.assert_array_equal(np.sort(plan0.example), np.arange(len(source)))  # each example once per epoch


def test_mixing_proportions():
  source, example = data.mixture([100, 1000], [1.0, 3.0], seed=0, epoch=0, shuffle=True)
  assert len(source) == 1100
  assert (source == 0).sum() == 275 and (source == 1).sum() == 825
  # The small source is upsampled: all its examples, each 2 or 3 times.
  counts = np.bincount(example[source == 0], minlength=100)
  assert counts.min() == 2 and counts.max() == 3
  # The subsampled source continues its stream across epochs: no repeats within one, all seen within two.
  s1, e1 = data.mixture([100, 1000], [1.0, 3.0], seed=0, epoch=1, shuffle=True)
  seen = np.concatenate([example[source == 1], e1[s1 == 1]])
  assert len(np.unique(example[source == 1])) == 825 and len(np.unique(seen)) == 1000
  unweighted, _ = data.mixture([100, 1000], None, seed=0, epoch=0, shuffle=True)
  assert (unweighted == 0).sum() == 100 and (unweighted == 1).sum() == 1000


def test_mixing_in_batches_follows_weights():
  small, large = make_source([3] * 20, "small", 1.0), make_source([3] * 200, "large", 1.0, first_id=10_000)
  iterator = data.BatchIterator([small, large], batch_size=4, seq_len=3, seed=0)
  inputs = np.concatenate([b["inputs"] for b in batches(iterator, iterator.plan(0).num_batches)])
  # Equal weights: 110 examples from each per epoch (half of 220), one example per row here.
  assert len(inputs) == 220 and (inputs[:, 0] < 10_000).sum() == 110


def test_host_slices_disjoint_and_covering():
  source = make_source(list(range(2, 30)))
  whole = data.BatchIterator([source], batch_size=4, seq_len=32, seed=3)
  hosts = [data.BatchIterator([source], batch_size=4, seq_len=32, seed=3, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(5):
    global_batch = next(whole)
    local = [next(h) for h in hosts]
    assert local[0]["inputs"].shape == (2, 32)
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), global_batch[key])
  with pytest.raises(data.DataError, match="not divisible"):
    data.BatchIterator([source], batch_size=3, seq_len=32, seed=0, process_count=2)


def test_state_restore_gives_identical_batches():
  source = make_source(list(range(2, 20)))
  iterator = data.BatchIterator([source], batch_size=2, seq_len=24, seed=0)
  per_epoch = iterator.plan(0).num_batches
  batches(iterator, per_epoch - 1)
  state = iterator.state()
  assert state == {"epoch": 0, "index": per_epoch - 1}
  expected = batches(iterator, 4)  # crosses into epoch 1
  assert iterator.state()["epoch"] == 1
  resumed = data.BatchIterator([source], batch_size=2, seq_len=24, seed=0)
  resumed.restore(json.loads(json.dumps(state)))
  assert_same(batches(resumed, 4), expected)


def test_finite_eval_pass_pads_last_batch():
  source = make_source([3] * 5)
  iterator = data.BatchIterator([source], batch_size=2, seq_len=2, seed=0, shuffle=False, num_epochs=1,
                                drop_remainder=False)
  out = list(iterator)
  assert len(out) == 3
  assert out[-1]["segment_ids"][1].sum() == 0 and out[-1]["loss_mask"][1].sum() == 0


def test_end_to_end_chat_file(tok, tmp_path):
  task = synthetic.facts(30, 10, seed=0)
  path = data.write_jsonl(str(tmp_path / "facts.jsonl"), task.records)
  (source,) = data.load([path], tok, seq_len=64, cache_dir=str(tmp_path / "cache"))
  train, evaluation = data.split(source, eval_size=5, seed=0)
  batch = next(data.BatchIterator([train], batch_size=2, seq_len=64, seed=0))
  # Loss on exactly the value digit and EOS of each packed conversation.
  targets = batch["targets"][batch["loss_mask"] == 1]
  assert set(tok.convert_ids_to_tokens(targets.tolist())) <= set("0123456789") | {"<eos>"}
  assert (batch["loss_mask"].sum(axis=1) == 2 * batch["segment_ids"].max(axis=1)).all()


# --- validator ---

def test_validate_report(tok, tmp_path):
  good = [json.dumps({"text": "abcd"}) for _ in range(10)]
  path = write(tmp_path, "text.jsonl", good[:4] + ['{"text": oops}'] + good[4:] + [json.dumps({"txt": "x"})])
  report = validate_module.validate([path], tok, seq_len=10, batch_size=2, steps=5)
  assert report["errors"] == [f"{path}:5: invalid JSON: Expecting value (column 10)",
                              f"{path}:12: missing field 'text'"]
  # Each example: <bos> abcd <eos> = 6 tokens, 5 positions, all 5 targets loss-bearing; two per row of 10.
  assert (report["records"], report["examples"], report["bad"]) == (12, 10, 2)
  assert (report["tokens"], report["loss_tokens"]) == (60, 50)
  assert (report["rows"], report["fill"], report["steps_per_epoch"]) == (5, 1.0, 2)
  assert report["epochs"] == 2.5
  text = validate_module.format_report(report)
  assert f"{path}:5: invalid JSON" in text and "2.50 epochs" in text


def test_validate_cli(tok, tmp_path, capsys):
  tok.save_pretrained(str(tmp_path / "tok"))
  path = data.write_jsonl(str(tmp_path / "a.jsonl"), synthetic.arithmetic(8, seed=0).records)
  code = validate_cli.main(["--data", f"{path}:1", "--tokenizer", str(tmp_path / "tok"), "--seq-len", "32",
                               "--batch-size", "2", "--steps", "10", "--json"])
  report = json.loads(capsys.readouterr().out)
  assert code == 0 and report["errors"] == [] and report["examples"] == 8 and report["sources"][0]["weight"] == 1
  bad = write(tmp_path, "bad.jsonl", ["{"])
  assert validate_cli.main(["--data", bad, "--tokenizer", str(tmp_path / "tok"), "--seq-len", "32",
                               "--batch-size", "2"]) == 1
  assert f"{bad}:1: invalid JSON" in capsys.readouterr().out


def test_validate_cli_from_an_experiment_config(tmp_path, capsys):
  config = tmp_path / "exp.py"
  config.write_text(
      "from experiments.configs import finetune\n"
      "def get_config(arg):\n"
      "  c = finetune.get_config(arg)\n"
      f"  c.data.cache_dir = {str(tmp_path / 'cache')!r}\n"
      "  c.data.synthetic_examples = 100\n"
      "  return c\n")
  assert validate_cli.main(["--config", f"{config}:tiny"]) == 0
  out = capsys.readouterr().out
  assert "arithmetic-n100-seed0.jsonl (chat): 100 records, 100 examples, 0 bad" in out
  assert "batch 16" in out and "300 steps = " in out
  with pytest.raises(SystemExit):
    validate_cli.main(["--seq-len", "8"])  # neither --config nor the data flags


def test_synthetic_sources_are_materialized_once_by_task_size_and_seed(tmp_path):
  spec = synthetic.materialize("synthetic:facts:0.5", n=10, seed=3, cache_dir=tmp_path)
  path, weight = spec.rsplit(":", 1)
  assert weight == "0.5" and path.endswith("facts-n10-seed3.jsonl")
  first = open(path).read()
  assert len(first.splitlines()) == 10
  assert synthetic.materialize("synthetic:facts:0.5", n=10, seed=3, cache_dir=tmp_path) == spec
  assert open(path).read() == first
  assert synthetic.materialize("data.jsonl:2", n=10, seed=3, cache_dir=tmp_path) == "data.jsonl:2"
  with pytest.raises(ValueError, match="unknown synthetic task 'fcts'"):
    synthetic.materialize("synthetic:fcts", n=10, seed=3, cache_dir=tmp_path)


def test_sums_with_smaller_operands_are_their_own_file(tmp_path):
  default = synthetic.materialize("synthetic:sums", n=50, seed=0, cache_dir=tmp_path)
  small = synthetic.materialize("synthetic:sums", n=50, seed=0, cache_dir=tmp_path, max_operand=9)
  assert default.endswith("sums-n50-seed0.jsonl") and small.endswith("sums-n50-seed0-max9.jsonl")
  prompts = [json.loads(line)["messages"][0]["content"] for line in open(small)]
  assert len(set(prompts)) == 50 and all(max(map(int, p.rstrip("=").split("+"))) <= 9 for p in prompts)
  with pytest.raises(ValueError, match="only 100 exist"):
    synthetic.materialize("synthetic:sums", n=101, seed=0, cache_dir=tmp_path, max_operand=9)


def test_split_does_not_depend_on_the_directory(tok, tmp_path):
  records = [{"text": f"document number {i}"} for i in range(40)]
  parts = []
  for d in ("a", "b/c"):
    path = tmp_path / d / "docs.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (source,) = data.load([str(path)], tok, seq_len=32)
    _, evaluation = data.split(source, 8, seed=0)
    parts.append([evaluation.example(i)[0].tolist() for i in range(len(evaluation))])
  assert parts[0] == parts[1]
