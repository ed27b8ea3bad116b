"""Backends: the resources a session can hold (shell, desktop, browser, ...).

A backend knows nothing of MCP or of other workers; see `backends.base` for the
contract and `backends.bash` for a complete example.
"""
