"""Ask a Ray cluster what it holds; run as `python -m tests.support.ray_query ADDRESS WHAT`, prints JSON.

A child process, so the test process itself never imports Ray (2-3 s and ~100 MB, and a driver
connection that would keep state across tests). WHAT is:

- `nodes`: [{"node_id", "alive", "resources"}] for every node the GCS knows;
- `actors`: [{"name", "namespace"}] for every live named actor in every namespace.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


def main(argv: list[str]) -> int:
    address, what = argv
    import ray  # only here: see the module docstring

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)
    try:
        result: Any
        if what == "nodes":
            result = [
                {"node_id": n["NodeID"], "alive": bool(n["Alive"]), "resources": n.get("Resources", {})}
                for n in ray.nodes()
            ]
        elif what == "actors":
            result = ray.util.list_named_actors(all_namespaces=True)
        else:
            sys.stderr.write(f"unknown query {what!r}: nodes | actors\n")
            return 2
    finally:
        ray.shutdown()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
