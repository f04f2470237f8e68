"""The data pipeline: records (chat, Alpaca, text) → token ids and loss masks → packed, shuffled, resumable batches.

    sources = data.load(["train.jsonl:0.8", "extra.jsonl:0.2"], tokenizer, seq_len=2048, cache_dir="/tmp/tok")
    splits = [data.split(s, eval_size=200, seed=0) for s in sources]
    train = data.BatchIterator([t for t, _ in splits], batch_size=16, seq_len=2048, seed=0,
                               process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(train)      # inputs, targets, loss_mask, segment_ids, positions: numpy [16 / hosts, 2048]
    saved = train.state()    # {"epoch": 0, "index": 1}; train.restore(saved) resumes exactly

Modules: ``formats`` (record → ids and mask), ``sources`` (reading files and hub datasets), ``dataset`` (tokenised
sources, disk cache, train/eval split), ``pack`` (mixing, shuffling, packing, host slices, iterator state),
``validate`` (the data checker; its command line is ``python -m lora_jax.cli.validate``).
"""

from lora_jax.data.dataset import OVERFLOW, TokenizedSource, load, split, tokenize, tokenizer_fingerprint
from lora_jax.data.formats import (
    FALLBACK_CHAT_TEMPLATE,
    FORMATS,
    TEMPLATES,
    DataError,
    Encoded,
    check_record,
    detect_format,
    encode,
    resolve_template,
    truncate,
)
from lora_jax.data.pack import BATCH_KEYS, BatchIterator, Plan, eval_batches, mixture, pack_rows
from lora_jax.data.sources import (
    Records,
    Source,
    load_records,
    parse_source,
    parse_sources,
    scan_json,
    write_jsonl,
)

__all__ = [
    "BATCH_KEYS", "FALLBACK_CHAT_TEMPLATE", "FORMATS", "OVERFLOW", "TEMPLATES", "BatchIterator", "DataError", "Encoded",
    "Plan", "Records", "Source", "TokenizedSource", "check_record", "detect_format", "encode", "eval_batches", "load",
    "load_records", "mixture", "pack_rows", "parse_source", "parse_sources", "resolve_template", "scan_json", "split",
    "tokenize", "tokenizer_fingerprint", "truncate", "write_jsonl",
]
