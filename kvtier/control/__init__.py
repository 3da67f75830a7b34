"""Layer 7: the management API over cached KV (operations, HTTP server, metrics, client).

``api`` the operations, ``models`` their requests and responses, ``admission``
what ``admit`` checks, ``pins`` pins with a time to live, ``app`` the FastAPI
routes, ``guard`` access and body limits, ``metrics`` Prometheus, ``server``
uvicorn on a background thread, ``client`` an HTTP client, ``vllm_plugin``
the start-up inside vLLM's workers.
"""
