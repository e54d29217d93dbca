"""The OpenAI-compatible HTTP API over a splitnet pipeline (``splitnet api``; see docs/api.md).

- :mod:`.app`: the FastAPI routes; :mod:`.schemas`: request validation; :mod:`.errors`:
  OpenAI-shaped errors; :mod:`.auth`: bearer keys; :mod:`.metrics`: Prometheus collectors;
- :mod:`.pipeline`: what is served (model, kind, context, tokenizer); :mod:`.sessions`: the
  pool of SDK sessions; :mod:`.generation`: stop sequences and incremental text;
  :mod:`.sdk_adapter`: the SDK's return types; :mod:`.chat_template`: chat messages -> prompt.
"""
