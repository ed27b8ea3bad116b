"""The egress proxy's decisions, without a browser: which addresses count as private, how
`allow_private_hosts` entries read, and what a forwarded request keeps (fast, pure functions)."""

from __future__ import annotations

import ipaddress

import pytest

from backends.browser.proxy import AllowRule, Grant, Refused, _origin_request, is_public, parse_rules

PRIVATE = [
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.169.254",
    "224.0.0.251",
    "255.255.255.255",
    "::1",
    "::",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "ff02::1",
]
PUBLIC = ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", PRIVATE)
def test_loopback_private_link_local_and_special_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


def grant(rules: list[str], network: str = "internet") -> Grant:
    return Grant(label="t", username="u", password="p", rules=parse_rules(rules), network=network)


def test_every_resolved_address_is_checked() -> None:
    g = grant([])
    g.check("example.com", ["93.184.216.34"], 443)
    with pytest.raises(Refused, match="private"):
        g.check("rebound.example", ["93.184.216.34", "127.0.0.1"], 443)  # DNS rebinding: one bad answer is enough


def test_rules_by_address_network_port_and_name() -> None:
    g = grant(["127.0.0.1:8080", "10.0.0.0/8", "[::1]:9000", "intranet.example"])
    g.check("127.0.0.1", ["127.0.0.1"], 8080)
    g.check("localhost", ["127.0.0.1"], 8080)  # the rule names the address, whatever the name
    with pytest.raises(Refused):
        g.check("127.0.0.1", ["127.0.0.1"], 8081)  # another port of an allowed address
    g.check("10.9.8.7", ["10.9.8.7"], 22)
    g.check("::1", ["::1"], 9000)
    with pytest.raises(Refused):
        g.check("::1", ["::1"], 9001)
    g.check("intranet.example", ["192.168.7.7"], 443)  # a name rule allows what that name resolves to
    with pytest.raises(Refused):
        g.check("evil.example", ["192.168.7.7"], 443)
    with pytest.raises(Refused):
        g.check("169.254.169.254", ["169.254.169.254"], 80)


def test_network_none_refuses_all_and_host_allows_all() -> None:
    with pytest.raises(Refused, match="network 'none'"):
        grant([], "none").check("example.com", ["93.184.216.34"], 443)
    grant([], "host").check("localhost", ["127.0.0.1"], 22)


@pytest.mark.parametrize("entry", ["", "a/b c", "10.0.0.0/33", "127.0.0.1:0", "127.0.0.1:70000", ".example"])
def test_malformed_rules_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message names the entry
        AllowRule.parse(entry)


def test_a_forwarded_request_loses_proxy_headers_and_carries_one_request() -> None:
    head = _origin_request(
        "GET",
        "http://example.com/a?b=1",
        "HTTP/1.1",
        ["Host: example.com", "Proxy-Authorization: Basic c2VjcmV0", "Proxy-Connection: keep-alive", "Accept: */*"],
    )
    text = head.decode()
    assert text.startswith("GET /a?b=1 HTTP/1.1\r\n")
    assert "Proxy-" not in text
    assert "Connection: close\r\n" in text
    assert "Accept: */*" in text
