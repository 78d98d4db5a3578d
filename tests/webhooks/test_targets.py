"""Where webhooks may go, by default: public addresses only."""

import pytest

from webhooks.targets import TargetRefused, networks, resolve


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1"),
        ("http://localhost/hook", "resolves to"),
        ("http://10.0.0.7/hook", "10.0.0.7"),
        ("http://192.168.1.1/hook", "192.168.1.1"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),  # cloud metadata
        ("http://[::1]/hook", "::1"),
        ("http://[::ffff:127.0.0.1]/hook", "::ffff:127.0.0.1"),
        ("http://0.0.0.0/hook", "0.0.0.0"),
        ("http://100.64.0.1/hook", "100.64.0.1"),  # carrier-grade NAT
        ("http://224.0.0.1/hook", "224.0.0.1"),
        ("ftp://example.com/hook", "http:// or https://"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("http:///hook", "no host"),
        ("http://example.com/a\x00b", "control characters"),
        ("http://example.com/a b", "spaces"),
        ("http://example.com:99999/hook", "not a URL"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_refused_by_default(url, why):
    with pytest.raises(TargetRefused, match=why.replace("[", r"\[").replace(".", r"\.")):
        resolve(url, [])


def test_a_public_address_is_allowed_and_pinned():
    target = resolve("https://93.184.215.14:8443/a/b?x=1", [])
    assert target.address == "93.184.215.14"
    assert target.pinned_url() == "https://93.184.215.14:8443/a/b?x=1"


def test_the_operator_may_allow_a_network():
    target = resolve("http://127.0.0.1:9000/hook", networks(["127.0.0.0/8"]))
    assert target.pinned_url() == "http://127.0.0.1:9000/hook"
    with pytest.raises(TargetRefused):
        resolve("http://10.0.0.1/hook", networks(["127.0.0.0/8"]))
