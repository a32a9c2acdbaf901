"""The MQTT topics' messages parsed and answered (pure), and the MQTT keys of the config."""

import pytest

from gw.core.config import parse_config
from gw.core.errors import ConfigError, InvalidInput
from gw.cluster.mqtt import split_url
from gw.cluster import messages as M

SETTINGS = parse_config({"oakestra": {"mqtt_url": "mqtt://10.30.0.1:10003", "node_id": "n1"}})
POLICY = SETTINGS.policy()
DEPLOY = {"gateway_id": "n1", "job_name": "gw", "instance_ip": "10.30.255.1",
          "instance_ip_v6": "fdff:ffff::1", "gateway_ipv4": "198.18.0.1",
          "gateway_ipv6": "2001:db8::1"}
EXPOSE = {"gateway_id": "n1", "service_id": "s1", "exposed_port": 8080, "internal_port": 80,
          "service_ip": "10.30.0.1"}


def test_topics():
    assert M.topic("n1", "deploy") == "nodes/n1/net/gateway/deploy"
    assert M.kind_of("n1", "nodes/n1/net/gateway/expose") == "expose"
    assert M.kind_of("n1", "nodes/n2/net/gateway/expose") is None
    assert M.kind_of("n1", "nodes/n1/net/gateway/expose/result") is None


def test_deploy_and_expose_in_the_clusters_shapes():
    assert M.parse_deploy(DEPLOY, SETTINGS) == M.Deploy("10.30.255.1", "fdff:ffff::1", "gw")
    e = M.parse_expose(EXPOSE, POLICY)
    assert (e.exposed_port, e.protocol, str(e.service_ip), e.service_port, e.service_id) == \
        (8080, "tcp", "10.30.0.1", 80, "s1")
    assert M.parse_unexpose({"gateway_id": "n1", "service_id": "s1"}, POLICY) == \
        M.Unexpose("s1", None)


@pytest.mark.parametrize("doc,field", [
    ({**DEPLOY, "gateway_id": "n2"}, "gateway_id"),
    ({**DEPLOY, "instance_ip": "fdff::1"}, "instance_ip"),
    ({**DEPLOY, "instance_ip_v6": "127.0.0.1"}, "instance_ip_v6"),
    ({**DEPLOY, "instance_ip": "198.18.0.1"}, "instance_ip"),
    ({k: v for k, v in DEPLOY.items() if k != "instance_ip_v6"}, "instance_ip_v6"),
    ({**DEPLOY, "extra": 1}, "extra"),
])
def test_bad_deploys_name_the_field(doc, field):
    with pytest.raises(InvalidInput) as err:
        M.parse_deploy(doc, SETTINGS)
    assert err.value.field == field


@pytest.mark.parametrize("doc,field", [
    ({**EXPOSE, "service_ip": "192.0.2.1"}, "service_ip"),
    ({**EXPOSE, "exposed_port": 22}, "exposed_port"),
    ({**EXPOSE, "exposed_port": 70000}, "exposed_port"),
    ({**EXPOSE, "gateway_id": "n2"}, "gateway_id"),
    ({**EXPOSE, "protocol": "udp"}, "protocol"),
    ({k: v for k, v in EXPOSE.items() if k != "gateway_id"}, "gateway_id"),
])
def test_bad_exposes_name_the_field(doc, field):
    with pytest.raises(InvalidInput) as err:
        M.parse_expose(doc, POLICY)
    assert err.value.field == field


def test_json_and_answers():
    with pytest.raises(InvalidInput, match="not valid JSON"):
        M.parse_json(b"{")
    with pytest.raises(InvalidInput, match="JSON object"):
        M.parse_json(b"[1]")
    exc = InvalidInput("service_ip 192.0.2.1 is outside", field="service_ip")
    answer = M.failure("expose", exc, {**EXPOSE, "service_ip": "192.0.2.1"})
    assert answer["ok"] is False and answer["field"] == "service_ip"
    assert answer["about"]["service_ip"] == "192.0.2.1"
    assert M.result_label(exc) == "invalid"


def test_mqtt_config_keys():
    s = parse_config({"oakestra": {"mqtt_url": ["mqtt://a:10003", "mqtts://[fdff::1]"],
                                   "node_id": "n1", "mqtt_username": "u",
                                   "mqtt_password_file": "/p"}})
    assert s.mqtt_mode and not s.standalone and s.oakestra.cluster_url == ""
    assert s.oakestra.mqtt_urls == ("mqtt://a:10003", "mqtts://[fdff::1]")
    assert s.oakestra.client_id == "oakestra-gw-n1"
    assert split_url("mqtt://a:10003") == ("a", 10003, False)
    assert split_url("mqtts://[fdff::1]") == ("fdff::1", 8883, True)
    h = parse_config({"oakestra": {"cluster_url": ["http://a:1", "http://b:2/"]}})
    assert h.oakestra.cluster_urls == ("http://a:1", "http://b:2") and h.oakestra.cluster_url == "http://a:1"


@pytest.mark.parametrize("oak,field", [
    ({"mqtt_url": "mqtt://a"}, "oakestra.node_id"),
    ({"mqtt_url": "http://a", "node_id": "n"}, "oakestra.mqtt_url"),
    ({"mqtt_url": "mqtt://a", "node_id": "n", "cluster_url": "http://c"}, "oakestra.mqtt_url"),
    ({"mqtt_url": "mqtt://a", "node_id": "n", "mqtt_client_id": "n"}, "oakestra.mqtt_client_id"),
    ({"mqtt_url": "mqtt://a", "node_id": "a/b"}, "oakestra.node_id"),
    ({"mqtt_url": "mqtt://a", "node_id": "n", "mqtt_password_file": "/p"},
     "oakestra.mqtt_password_file"),
    ({"cluster_url": ["http://a", "http://a"]}, "oakestra.cluster_url"),
    ({"cluster_url": [1]}, "oakestra.cluster_url"),
])
def test_bad_mqtt_config_names_the_key(oak, field):
    with pytest.raises(ConfigError) as err:
        parse_config({"oakestra": oak})
    assert err.value.field == field
