"""Which network a session gets, and the refusal when the policy asks for one we cannot make safe.

Threat: a session reaching the server's own HTTP API or other services on the host's loopback
or private networks. `none` is a fresh network namespace with only `lo` (nothing of the host
is reachable, not even 127.0.0.1 of the host). `host` shares the host's network (an operator's
explicit choice; the session's other namespaces stay private).

`internet` would be an own namespace with user-mode networking (`pasta` from passt) whose
packets leave through the server's sockets. `pasta --no-map-gw` stops the gateway address from
meaning the host, but pasta has no destination filter: a connect to 10.x, 172.16.x, 192.168.x,
169.254.x, the host's own subnet or the host's resolver goes out as the server. Filtering needs
nftables rules inside the namespace, installed by a process with CAP_NET_ADMIN over it that the
session can never regain. Found here (Debian 12 passt 2023.06): pasta started as root drops to
`nobody` before joining a namespace, so it can only serve a namespace owned by an unprivileged
user namespace; the workable design is a per-session holder (uid U, `unshare -Urn`), pasta and
nft run as U into it, and bwrap entered through it (`nsenter -U -n`) with a nested user
namespace, plus a resolv.conf pointing at `--dns-forward`. That is not built yet, so `internet`
is refused with 5001 instead of being offered unfiltered.
"""

from __future__ import annotations

import shutil

from session.errors import ConfigurationError


def filter_tool() -> str | None:
    """A packet-filter program that could restrict an `internet` namespace (none found: refuse)."""
    return shutil.which("nft") or shutil.which("iptables")


def check_network(network: str, tier: str) -> None:
    """Raise ConfigurationError (5001) when `network` cannot be provided safely for `tier`."""
    if network == "internet":
        pasta = shutil.which("pasta")
        reason = (
            "pasta (Debian 'passt') is not installed"
            if pasta is None
            else "pasta cannot keep private and link-local ranges, the host's own addresses and its resolver "
            "unreachable, and filtering them inside the namespace is not implemented yet"
        )
        raise ConfigurationError(
            f"policy network 'internet' is unavailable for isolation {tier!r}: {reason}. "
            "Use network 'none', or 'host' if sessions may reach everything the server can."
        )
