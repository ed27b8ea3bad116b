"""The ray executor: sessions on a Ray cluster behind stateless front ends.

The only package that imports `ray` (the local executor never loads it). Pieces:
`executor.RayExecutor` (the front end, with the Engine surface `mcp_server` uses),
`host.SessionHost` (an actor running a normal local Engine), `registry.Registry` (where
each session lives, by digest, and the front ends' leases), `placement` (nodes, hosts),
`faults` (Ray's failures as the spec's codes), `merge` (fan-out replies as one).

Sessions live in one host actor per (node, resource); resources that link to each other
(a browser drawn on a vm's display) share one host per node, since a link hands one
session's live state to the other's start. The caps per principal and per worker span the
cluster (the registry counts them); `max_sessions` and the per-resource caps apply per
host, i.e. per node, which on one node is exactly the local executor's.

Why one host actor per (node, resource) holding many sessions, not an actor per session
(measured on this 2-core machine, Ray 2.60, single node, while other work ran):

| | actor per session | call into a running host |
| --- | --- | --- |
| start | new actor 626 ms p50 (notes: ~265 ms idle) | create_session on a host: ~1 ms of Ray + the backend's start |
| memory | 89 MB RSS / 47 MB USS per actor process | one process per (node, resource); a shell adds ~0.3 MB |
| call | ~1.4 ms per actor call | the same actor call (explicit bash_run through a front end: 2.1 ms p50) |

An actor per session would add a Python process (~50-90 MB) to every 0.3 MB shell and
put ~0.3-0.6 s of actor start in front of every create_session and every temporary call
(a temporary session would need an actor too): 200 sessions would need 10-18 GB and
minutes of actor starts on 2 cores. A host holding many sessions pays the process once per
node and resource, keeps the local engine's start path (~1-5 ms for a shell), shares
per-node backends (the browser's Chromium) between its sessions as the local server does,
and runs every semantic (TTL, grace, adoption, limits, tiers) as the same local code. What
it gives up: sessions of one resource on one node share one process (one core for their
Python side; the shells themselves are separate processes), and a crashed host loses all
its sessions (answered as 1003, like a lost node).
"""
