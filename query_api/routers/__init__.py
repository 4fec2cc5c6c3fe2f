"""One router per domain; ``query_api.app`` includes them."""
