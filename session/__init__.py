"""The session engine: workers, sessions, TTLs and the result envelope.

Knows nothing of MCP. Kept import-light on purpose: backends import
`session.errors`, and the engine imports `backends.base`.
"""
