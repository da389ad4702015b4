"""The README's examples work as written."""

from __future__ import annotations

import re

from epp.config import load_config
from epp.kvevents.bound import BoundKVEventsSubscriber
from epp.settings import build_parser
from tests.support import ROOT

README = (ROOT / "README.md").read_text()


def test_config_example_loads() -> None:
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if "EndpointPickerConfig" in b]
    cfg = load_config(block)
    assert "flowControl" in cfg.feature_gates


def test_every_flag_in_the_table_exists() -> None:
    known = {o for a in build_parser()._actions for o in a.option_strings}
    for row in re.findall(r"^\| `(--[a-z-]+)`", README, re.M):
        assert row in known, row


def test_precise_prefix_examples_load() -> None:
    connect, bound = [b for b in re.findall(r"```yaml\n(.*?)```", README, re.S)
                      if "precise-prefix-cache-scorer" in b]
    scorers = [load_config("apiVersion: inference.networking.x-k8s.io/v1alpha1\n"
                           "kind: EndpointPickerConfig\nplugins:\n" + block
                           ).plugin("precise-prefix-cache-scorer") for block in (connect, bound)]
    # The examples' tokenizer directory does not exist here: loading falls back, no crash.
    assert scorers[0].block_size == 16 and scorers[0].subscriber.replay_port == 5558
    assert not isinstance(scorers[0].subscriber, BoundKVEventsSubscriber)
    assert isinstance(scorers[1].subscriber, BoundKVEventsSubscriber)
    assert (scorers[1].subscriber.bind, scorers[1].subscriber.topic_filter) == ("tcp://*:5557", "kv@")
