"""Names shared by the front ends, the registry and the session hosts.

The registry never sees a handle or a client-chosen worker key: both are capabilities,
so only their SHA-256 digests are stored and compared.
"""

from __future__ import annotations

import hashlib

#: Named actors of a deployment live in the Ray namespace named after it.
REGISTRY_NAME = "agentflow-registry"
#: A node may run sessions of resource NAME iff it advertises this custom resource.
RESOURCE_PREFIX = "agentflow."
#: A manifest pin `resources.NAME.nodes = ["gpu"]` matches nodes advertising `agentflow.node.gpu`.
NODE_LABEL_PREFIX = "agentflow.node."


def digest(secret: str) -> str:
    """The registry's key for a handle or a worker key."""
    return hashlib.sha256(secret.encode()).hexdigest()


def host_name(group: str, node_id: str) -> str:
    """The named actor holding the sessions of a resource (or group of linked resources) on one node."""
    return f"host-{group}-{node_id}"


def link_groups(links: dict[str, set[str]]) -> dict[str, str]:
    """Resource -> its group: resources that link to each other (a browser drawn on a vm's display)
    share a host, since a link hands one session's live state to another's start.

    `links` maps each resource to the resources it links to; a group is named by its members
    sorted and joined with "+" ("bash", "browser+vm").
    """
    parent = {name: name for name in links}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for name, targets in links.items():
        for target in targets:
            if target in parent:
                parent[root(name)] = root(target)
    members: dict[str, list[str]] = {}
    for name in links:
        members.setdefault(root(name), []).append(name)
    return {name: "+".join(sorted(members[root(name)])) for name in links}


def node_resource(resource: str) -> str:
    return f"{RESOURCE_PREFIX}{resource}"


def node_label(label: str) -> str:
    return f"{NODE_LABEL_PREFIX}{label}"


def connection_worker(front_end: str, worker: str) -> str:
    """A connection's worker name made unique across front ends (connection ids are only unique per process).

    `_meta` keys (`key:...`) are chosen by the client to name one worker on every front
    end, so they are left as they are.
    """
    if worker.startswith("conn:"):
        return f"conn:{front_end}:{worker[5:]}"
    return worker


def front_end_of(worker_key: str) -> str | None:
    """The front end a connection worker key (`principal/conn:FE:scope`) belongs to."""
    _, _, worker = worker_key.partition("/")
    if not worker.startswith("conn:"):
        return None
    front_end, sep, _ = worker[5:].partition(":")
    return front_end if sep else None
