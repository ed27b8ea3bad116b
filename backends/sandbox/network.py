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
session can never regain. What was tried on Debian 12 (passt 2023.06):
- pasta started as root drops to `nobody` before it joins a namespace, so it cannot serve a
  namespace that root owns ("Couldn't open user namespace", "Couldn't switch to pasta
  namespaces"), with or without `--runas 0`, by pid or by a bind-mounted netns file;
- rootless pasta (uid U, joining a holder `unshare --user --map-root-user --net` that U owns,
  nft loaded through `nsenter --preserve-credentials -U -n`, bwrap entered the same way with a
  nested user namespace) is the workable design, but it needs /dev/net/tun open to U, and on this
  host the node is 0600 root ("Failed to open tun socket in namespace").
So `internet` is refused with 5001 instead of being offered unfiltered.
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
