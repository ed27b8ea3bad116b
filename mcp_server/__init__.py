"""The MCP edge: translates MCP requests into engine calls and envelopes into MCP results.

The only package that imports `mcp`; `session/` and `backends/` never do.
"""
