"""The HTTP server: SGLang's native API and the OpenAI-compatible API on aiohttp.

Map: `launch` (process, signals) → `app` (routes, middlewares) → handlers in `native`,
`openai_completions`, `openai_chat`, `openai_common`; they validate with `protocol`
structs and `limits`, tokenize with `prompts`, and run engine requests through
`generation`, streaming with `sse`. `metrics` serves Prometheus, `openapi` the schema.
"""
