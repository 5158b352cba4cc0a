"""The HTTP server: OpenAI and THUDM api.py protocols, a web chat page and metrics over continuous batching.

Needs the `serve` extra (fastapi, uvicorn, sse-starlette, prometheus-client): `pip install 'glm6b[serve]'`.
Start it with `glm6b serve --model PATH` or `glm6b.serve.app.serve(...)`.
"""
