"""Serving a registered seedlm model: one generation engine for chat, serve, evaluate and the pyfunc.

- `engine`: load a model (folder or `models:/` URI), build prompts (chat template, trimming), generate.
- `sampling`: sampling settings, their validation, and choosing the next token per row.
- `decode`: the batched KV-cache decode state (left padding, rows joining and leaving between steps).
- `detok`: streaming text deltas (multi-byte safe) and stop strings.
- `batcher`: a thread that decodes queued requests together (continuous batching).
- `server`: the OpenAI-compatible HTTP API (`seedlm serve`): create_app, serve, main; `api`: its /v1 routes;
  `protocol`: its request/response shapes; `follow`: the served version, following a registry alias.
- `terminal`: the terminal chat (`seedlm chat`).
- `deps`: the only place this package imports other seedlm modules from.
"""
