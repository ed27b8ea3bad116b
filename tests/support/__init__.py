"""Helpers shared by the whole test suite (and the benchmarks), each defined once.

- `polling`: wait for a condition with a deadline (never a fixed sleep).
- `ports`: a free 127.0.0.1 port.
- `procs`: the process table through psutil (alive, names, environ, command lines).
- `manifests`: manifest files for servers under test.
- `servers`: `agentflow-sandbox serve` subprocesses.
- `leaks`: what THIS test run left behind (processes, scratch directories), keyed by the
  per-run id `AGENTFLOW_RUN_ID` that tests/conftest.py sets before any test starts.
"""
