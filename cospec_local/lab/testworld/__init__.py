"""Test world: tiny llama-architecture GGUF models, a character tokenizer and checkable tasks.

Modules:
- `gguf_export`: character vocabulary, `LlamaConfig`, `write_llama_gguf`, `make_random_llama_gguf`.
- `tasks`: seeded task families with final-answer checkers, `load_jsonl_tasks`.
"""
