"""The brokers' files for several daemons sharing the streams: deploy/nats/ (a partition
mapping and the MQTT listener) and deploy/emqx/ (shared subscriptions by topic hash)."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from detector.config import build_config
from detector.routing import Router, TopicTemplate
from tests.support import NATS_PARTITIONS
from training.demo.localbroker import find_nats_server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NATS_CONF = DEPLOY / "nats" / "nats.conf"


def _mappings(text: str) -> dict[str, str]:
    block = re.search(r"^mappings = \{\n(.*?)^\}", text, re.S | re.M)
    assert block is not None
    return dict(re.findall(r'^\s*"([^"]+)":\s*"([^"]+)"', block.group(1), re.M))


def test_the_nats_config_is_one_nats_server_accepts() -> None:
    binary = find_nats_server()
    if binary is None:
        pytest.skip("nats-server is not installed here (make setup installs it as root)")
    done = subprocess.run([binary, "-t", "-c", str(NATS_CONF)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # and -t does check: a mapping of a token the subject does not have is refused
    bad = NATS_CONF.read_text().replace("partition(3,1)", "partition(3,2)")
    refused = subprocess.run([binary, "-t", "-c", "/dev/stdin"], input=bad,
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode != 0 and "wildcard index" in refused.stderr, refused.stderr


def test_the_nats_partitions_are_those_tested_and_those_the_statefulset_reads() -> None:
    text = NATS_CONF.read_text()
    assert _mappings(text) == NATS_PARTITIONS  # what tests/e2e/test_scale_out.py runs on
    assert re.search(r"^mqtt \{\n\s+listen: ", text, re.M) and "jetstream {" in text
    (partitions,) = {int(n) for n in re.findall(r"partition\((\d+),", text)}

    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "statefulset.yaml").read_text()))
    (statefulset,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert statefulset["spec"]["replicas"] == partitions  # one daemon per partition
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    template = args[args.index("--topic") + 1]
    for pod in range(partitions):  # pod N reads the topic partition N's subject maps to
        subject = NATS_PARTITIONS["sensors.*"].replace("{{partition(3,1)}}", str(pod))
        topic = subject.replace("{{wildcard(1)}}", "pump-7").replace(".", "/")
        mine = TopicTemplate.parse(template.replace("$(POD_INDEX)", str(pod)))
        assert mine.match(topic) == "pump-7", (template, topic)

    configmap = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    config, problems = build_config(tomllib.loads(configmap["data"]["rnnsentry.toml"]))
    assert problems == [] and config.mqtt.protocol == "3.1.1"  # NATS speaks MQTT 3.1.1


def test_the_emqx_set_up_shares_by_topic_hash_and_routes_what_emqx_delivers() -> None:
    snippet = (DEPLOY / "emqx" / "emqx.conf").read_text()
    block = re.search(r"^mqtt \{\n(.*?)^\}", snippet, re.S | re.M)
    assert block is not None
    settings = dict(re.findall(r"^\s*(\w+) = (\w+)", block.group(1), re.M))
    assert settings["shared_subscription_strategy"] == "hash_topic"
    assert int(settings["max_inflight"]) >= 512  # the daemon's default batch.max

    config, problems = build_config(tomllib.loads((DEPLOY / "emqx" / "rnnsentry.toml").read_text()))
    assert problems == []
    (model,) = config.models
    router = Router([(t, 0) for t in model.topics])
    assert router.filters == ["$share/rnnsentry/sensors/#"]
    assert router.route("sensors/pump-7") == (0, "pump-7")  # delivered without the prefix
    assert config.mqtt.protocol == "5" and config.snapshot.path
