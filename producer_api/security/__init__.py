"""Who may call the API: API keys with scopes, per-key rate limits, and the ownership of jobs."""
