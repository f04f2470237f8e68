"""Command lines over the library (``python -m lora_jax.cli.export | generate | validate``); the library never
imports them."""
