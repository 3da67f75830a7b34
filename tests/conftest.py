from tests.redis_server import redis_cluster, redis_server  # noqa: F401
