"""The producer API (aiohttp) and the fleet CLI. Never imports torch."""
