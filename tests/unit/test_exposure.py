"""Exposure parsing and validation: every rejection names its field; valid input round-trips."""

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from gw.core.errors import InvalidInput
from gw.core.exposure import (DeleteRequest, Exposure, Policy, parse_delete, parse_exposures, parse_port_notation, parse_reserved)

POLICY = Policy()
OK = {"exposed_port": 8080, "service_ip": "10.30.0.1", "service_port": 80}


def rejected(doc, field, policy=POLICY, contains=""):
    with pytest.raises(InvalidInput) as info:
        parse_exposures(doc, policy)
    assert info.value.field == field, info.value.message
    assert contains in info.value.message
    return info.value


def test_minimal_exposure_defaults_to_tcp_and_derives_family():
    (e,) = parse_exposures(OK, POLICY)
    assert e == Exposure(8080, "tcp", ipaddress.ip_address("10.30.0.1"), 80)
    assert e.family == "ipv4" and e.key == ("ipv4", "tcp", 8080)
    assert e.to_dict() == {**OK, "protocol": "tcp", "family": "ipv4"}


def test_ipv6_udp_with_label_and_internal_port_alias():
    (e,) = parse_exposures({"exposed_port": 53, "service_ip": "fdff:2000::1",
                            "internal_port": 5353, "protocol": "UDP", "service_id": "s1"},
                           POLICY)
    assert (e.family, e.protocol, e.service_port, e.service_id) == ("ipv6", "udp", 5353, "s1")


@pytest.mark.parametrize("value", [True, False, 80.0, 80.5, "80", None, [80], {"p": 80},
                                   0, -1, 65536, 2**64, "80; flush ruleset"])
@pytest.mark.parametrize("field", ["exposed_port", "service_port"])
def test_bad_ports_are_rejected_naming_the_field(field, value):
    rejected({**OK, field: value}, field)


@pytest.mark.parametrize("ip,why", [
    ("10.31.0.1", "outside the service ranges"), ("192.0.2.1", "outside"),
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("::ffff:10.30.0.1", "IPv4-mapped"),
    ("10.30.0.1; flush ruleset", "not an IP address"), ("", "not an IP address"),
    ("10.30.0.0/16", "not an IP address"), ("fdff::1%eth0", "scoped"),
])
def test_bad_service_ips(ip, why):
    rejected({**OK, "service_ip": ip}, "service_ip", contains=why)


@pytest.mark.parametrize("value", [1, None, True, ["10.30.0.1"]])
def test_service_ip_must_be_a_string(value):
    rejected({**OK, "service_ip": value}, "service_ip")


@pytest.mark.parametrize("port,proto", [(22, "tcp"), (50103, "udp"), (11022, "tcp")])
def test_reserved_ports(port, proto):
    rejected({**OK, "exposed_port": port, "protocol": proto}, "exposed_port", contains="reserved")


def test_the_gateways_own_addresses_are_never_a_target():
    own = Policy(own_addresses=frozenset({ipaddress.ip_address("10.30.255.1"),
                                          ipaddress.ip_address("fdff::ffff:1")}))
    for ip in ("10.30.255.1", "fdff::ffff:1"):
        rejected({**OK, "service_ip": ip, "service_port": 22}, "service_ip", own, "own internal")


def test_reserved_is_per_protocol():
    assert parse_exposures({**OK, "exposed_port": 22, "protocol": "udp"}, POLICY)


def test_ports_a_local_process_listens_on_are_reserved():
    policy = Policy(listening=lambda: [(9000, "tcp")])
    rejected({**OK, "exposed_port": 9000}, "exposed_port", policy, "in use")
    assert parse_exposures({**OK, "exposed_port": 9000, "protocol": "udp"}, policy)


@pytest.mark.parametrize("doc,field", [
    ({"service_ip": "10.30.0.1", "service_port": 80}, "exposed_port"),
    ({"exposed_port": 1, "service_port": 80}, "service_ip"),
    ({"exposed_port": 1, "service_ip": "10.30.0.1"}, "service_port"),
    ({**OK, "color": "red"}, "color"),
    ({**OK, "protocol": "sctp"}, "protocol"),
    ({**OK, "protocol": 6}, "protocol"),
    ({**OK, "family": "ipv6"}, "family"),
    ({**OK, "family": "ipx"}, "family"),
    ({**OK, "internal_port": 81}, "internal_port"),
    ({**OK, "service_id": "x; drop"}, "service_id"),
    ({**OK, "service_id": ""}, "service_id"),
    ({**OK, "service_id": 5}, "service_id"),
    ({"exposures": []}, "exposures"),
    ({"exposures": "nope"}, "exposures"),
    ({"exposures": [OK], "extra": 1}, "extra"),
    ({"exposures": [OK, {**OK, "service_ip": "10.30.0.2"}]}, "exposures[1].exposed_port"),
    ({"exposures": [OK, {**OK, "exposed_port": "x"}]}, "exposures[1].exposed_port"),
    ({"exposures": [OK, 5]}, "exposures[1]"),
])
def test_document_errors_name_the_field(doc, field):
    rejected(doc, field)


def test_non_object_body_is_rejected():
    for body in ([OK], "x", 5, None):
        with pytest.raises(InvalidInput):
            parse_exposures(body, POLICY)


def test_same_port_once_per_family_in_a_batch():
    batch = parse_exposures({"exposures": [OK, {**OK, "service_ip": "fdff:2000::1"}]}, POLICY)
    assert [e.family for e in batch] == ["ipv4", "ipv6"]


def test_matching_internal_and_service_port_are_accepted():
    (e,) = parse_exposures({**OK, "internal_port": 80}, POLICY)
    assert e.service_port == 80


def test_oakestra_port_notation():
    exposures = parse_port_notation("8080:80/tcp;5353:53/udp; 9000", "10.30.0.7", POLICY, "svc")
    assert [(e.exposed_port, e.service_port, e.protocol) for e in exposures] == [
        (8080, 80, "tcp"), (5353, 53, "udp"), (9000, 9000, "tcp")]
    assert {e.service_id for e in exposures} == {"svc"}


@pytest.mark.parametrize("spec,field", [("", "ports"), ("80:abc", "ports"), (";;", "ports"),
                                        ("99999:80", "exposures[0].exposed_port"),
                                        ("80/sctp", "exposures[0].protocol"),
                                        ("80;80", "exposures[1].exposed_port"), (5, "ports")])
def test_bad_port_notation(spec, field):
    with pytest.raises(InvalidInput) as info:
        parse_port_notation(spec, "10.30.0.7", POLICY)
    assert info.value.field == field


def test_delete_requests():
    assert parse_delete({"exposed_port": 80}) == DeleteRequest(80, "tcp", None)
    req = parse_delete({"exposed_port": 80, "protocol": "udp", "family": "ipv6"})
    assert req.keys() == [("ipv6", "udp", 80)]
    assert DeleteRequest(80, "tcp", None).keys() == [("ipv4", "tcp", 80), ("ipv6", "tcp", 80)]
    for doc, field in (({}, "exposed_port"), ({"exposed_port": 80, "x": 1}, "x"),
                       ({"exposed_port": True}, "exposed_port"),
                       ({"exposed_port": 80, "family": "v4"}, "family")):
        with pytest.raises(InvalidInput) as info:
            parse_delete(doc)
        assert info.value.field == field


def test_reserved_entries():
    assert parse_reserved("22/tcp") == (22, "tcp")
    assert parse_reserved("53/UDP") == (53, "udp")
    assert parse_reserved("8080") == (8080, "tcp")
    for bad in ("x/tcp", "70000/tcp", "22/icmp", 1.5):
        with pytest.raises(InvalidInput):
            parse_reserved(bad)


# -- properties -------------------------------------------------------------------------------

ports = st.integers(1, 65535).filter(lambda p: p not in (22, 11022, 50103))
v4 = st.integers(1, 2**16 - 2).map(lambda n: str(ipaddress.ip_address("10.30.0.0") + n))
v6 = st.integers(1, 2**100).map(lambda n: str(ipaddress.ip_address("fdff::") + n))
valid_docs = st.fixed_dictionaries(
    {"exposed_port": ports, "service_ip": st.one_of(v4, v6), "service_port": st.integers(1, 65535)},
    optional={"protocol": st.sampled_from(["tcp", "udp"]),
              "service_id": st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)})


@given(valid_docs)
def test_valid_documents_round_trip(doc):
    (e,) = parse_exposures(doc, POLICY)
    again = parse_exposures(e.to_dict(), POLICY)[0]
    assert again == e == Exposure.from_dict(e.to_dict())
    assert e.exposed_port == doc["exposed_port"] and e.service_port == doc["service_port"]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c,
                                                                               max_size=3),
                           max_leaves=8)


FIELDS = sorted(["exposed_port", "service_ip", "service_port", "protocol", "service_id",
                 "internal_port", "family", "exposures", "junk"])
any_json_docs = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
# A valid document with one field replaced: rejected or accepted for the right reason.
near_valid_docs = st.tuples(valid_docs, st.sampled_from(FIELDS), json_values).map(
    lambda t: {**t[0], t[1]: t[2]})
mixed_docs = st.one_of(valid_docs, valid_docs.map(lambda d: {"exposures": [d]}),
                       near_valid_docs, any_json_docs)


def test_any_json_is_accepted_or_rejected_cleanly():
    outcomes = {"accepted": 0, "rejected": 0}

    # Derandomized: the share below is a property of the strategy, and a random draw of
    # which branches hypothesis favours must not decide whether the test passes.
    @settings(derandomize=True)
    @given(mixed_docs)
    def check(doc):
        try:
            result = parse_exposures(doc, POLICY)
        except InvalidInput as exc:
            assert exc.message
            outcomes["rejected"] += 1
        else:
            outcomes["accepted"] += 1
            for e in result:  # whatever passes is a sane, typed exposure
                assert isinstance(e.exposed_port, int) and 1 <= e.exposed_port <= 65535
                assert any(e.service_ip in net for net in POLICY.service_ranges)

    check()
    # Both branches really ran: about half the inputs are valid by construction.
    share = outcomes["accepted"] / sum(outcomes.values())
    assert 0.3 <= share <= 0.9, outcomes
