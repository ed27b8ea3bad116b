"""One reply from the replies of several hosts (fan-out calls, multi-resource creates)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from session.envelope import ResultMeta, success
from session.meta_tools import CreatedSession, CreateSessionResult
from session.models import Caller
from session.tool_calls import CallOutcome

if TYPE_CHECKING:
    from cluster.placement import Host


def _first_failure(outcomes: list[CallOutcome]) -> CallOutcome | None:
    return next((o for o in outcomes if not o.envelope.ok), None)


def merge_listed(
    results: list[tuple[Host, CallOutcome]], key: str, meta: ResultMeta, *, order: list[str] | None = None
) -> CallOutcome:
    """Concatenate the session views under `key`, oldest first (or in `order` of resources);
    listed sessions say which node and host hold them."""
    failed = _first_failure([o for _, o in results])
    if failed is not None:
        return failed
    views: list[dict[str, Any]] = []
    for host, outcome in results:
        for view in outcome.envelope.data.get(key, []):
            if key == "sessions":
                view["details"] = {**view.get("details", {}), "node_id": host.node_id, "host": host.name}
            views.append(view)
    if order is not None:
        views.sort(key=lambda v: order.index(v["resource_type"]) if v["resource_type"] in order else len(order))
    else:
        views.sort(key=lambda v: v.get("created_at") or "")
    data: dict[str, Any] = {key: views}
    if key != "sessions":
        data = {"status": "success", **data}
    return CallOutcome(success(data, meta))


def merge_created(outcomes: list[CallOutcome], caller: Caller, meta: ResultMeta) -> CallOutcome:
    """Several single-resource creates as the one multi-resource create the caller made."""
    sessions = [CreatedSession(**s) for o in outcomes for s in o.envelope.data.get("sessions", [])]
    result = CreateSessionResult(sessions=sessions)
    if caller.worker is None:
        result.note = "this connection has no lasting identity: pass session_id to every call to use this session"
    return CallOutcome(success(result, meta))


def merge_warmup(results: list[tuple[Host, CallOutcome]], meta: ResultMeta) -> CallOutcome:
    failed = _first_failure([o for _, o in results])
    if failed is not None:
        return failed
    per_resource: dict[str, dict[str, str]] = {}
    for host, outcome in results:
        for name, state in outcome.envelope.data.get("backends", {}).items():
            per_resource.setdefault(name, {})[host.node_id] = state
    backends = {
        name: next(iter(states.values()))
        if len(set(states.values())) == 1
        else "; ".join(f"node {node[:12]}: {state}" for node, state in states.items())
        for name, states in per_resource.items()
    }
    return CallOutcome(success({"status": "success", "backends": backends}, meta))


def merge_status(
    front_end: dict[str, Any], schema: dict[str, Any], results: list[tuple[Host, CallOutcome]], meta: ResultMeta
) -> CallOutcome:
    """get_status across the cluster: sums of the hosts' counts, each backend as its hosts describe it."""
    data: dict[str, Any] = {
        "status": "running",
        "session_ttl": schema["session_ttl"],
        "disconnect_grace": schema["disconnect_grace"],
        "workers": 0,
        "live_sessions": 0,
        "backends": dict(schema["backends"]),
        "your_sessions": [],
        **{k: v for k, v in front_end.items() if k in ("executor", "front_end", "deployment")},
        "hosts": [],
    }
    for host, outcome in sorted(results, key=lambda r: r[0].name):
        status = outcome.envelope.data
        if not outcome.envelope.ok:
            data["hosts"].append({"host": host.name, "node_id": host.node_id, "error": outcome.envelope.message})
            continue
        data["workers"] += status.get("workers", 0)
        data["live_sessions"] += status.get("live_sessions", 0)
        data["backends"].update(status.get("backends", {}))
        data["your_sessions"] += status.get("your_sessions", [])
        entry = {
            "host": host.name,
            "node_id": host.node_id,
            "resource": host.resource,
            "live_sessions": status.get("live_sessions", 0),
        }
        if "warm_pools" in status:  # each host keeps its own pools (members are started on its node)
            entry["warm_pools"] = status["warm_pools"]
        data["hosts"].append(entry)
    return CallOutcome(success(data, meta))
