"""Layer 0: talking to other processes over HTTP, and waiting after failures.

``http`` is the one HTTP client of the product (httpx, bounded and without
redirects); ``backoff`` the one reconnect backoff.
"""
