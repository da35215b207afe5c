"""Domain names and addresses: normalised to lower-case A-labels, or refused with the reason."""

import pytest

from mailadmin.addresses import normalise_address, normalise_domain


@pytest.mark.parametrize(
    ("name", "normalised"),
    [
        ("Example.TEST.", "example.test"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a1.b2.example", "a1.b2.example"),
        ("mail.123.example", "mail.123.example"),
    ],
)
def test_domains_are_normalised_to_lower_case_a_labels(name, normalised):
    assert normalise_domain(name) == normalised


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("xn--zz.test", "'xn--zz.test' has a label 'xn--zz' that is not a valid A-label"),
        ("mail.xn--a.test", "'mail.xn--a.test' has a label 'xn--a' that is not a valid A-label"),
        ("127.0.0.1", "'127.0.0.1' is an address, not a domain name"),
        ("10.1", "'10.1' is an address, not a domain name"),
        ("localhost", "'localhost' is not a fully qualified domain name"),
        ("-bad.test", "'-bad.test' has an invalid label '-bad'"),
        ("", "domain name is empty"),
    ],
)
def test_unusable_domain_names_are_refused_with_the_reason(name, error):
    with pytest.raises(ValueError) as refused:
        normalise_domain(name)
    assert str(refused.value) == error


def test_an_address_gets_the_same_domain_rules():
    assert normalise_address("Info@Bücher.Example") == "info@xn--bcher-kva.example"
    with pytest.raises(ValueError, match="is an address, not a domain name"):
        normalise_address("root@192.168.0.1")
