"""The OpenAI-compatible server: `optiq serve` and `python -m optiq.http`."""
