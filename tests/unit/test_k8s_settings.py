"""Kubernetes flags that cannot work are usage errors (SettingsError, exit 2), never crashes."""

from __future__ import annotations

import pytest

from epp.k8s.settings import SettingsError, kubernetes_settings, load_api_client
from epp.settings import Settings


def test_a_missing_kubeconfig_is_a_settings_error(tmp_path):
    with pytest.raises(SettingsError, match="no-such-kubeconfig"):
        load_api_client(str(tmp_path / "no-such-kubeconfig"))


def test_a_kubeconfig_that_is_not_yaml_config_is_a_settings_error(tmp_path):
    bad = tmp_path / "kubeconfig"
    bad.write_text("just some text\n")
    with pytest.raises(SettingsError):
        load_api_client(str(bad))


@pytest.mark.parametrize("other", [
    {"pool_name": "pool"},
    {"endpoints": "10.0.0.1:8000"},
    {"endpoints_file": "/tmp/endpoints.yaml"},
])
def test_the_selector_is_exclusive_with_other_endpoint_sources(other):
    s = Settings(endpoint_selector="app=vllm", endpoint_target_ports=[8000], **other)
    with pytest.raises(SettingsError, match="--endpoint-selector"):
        kubernetes_settings(s)


def test_selector_alone_and_pool_alone_are_fine():
    standalone = kubernetes_settings(Settings(endpoint_selector="app=vllm",
                                              endpoint_target_ports=[8000, 8001]))
    assert standalone is not None and standalone.standalone
    assert standalone.endpoint_target_ports == (8000, 8001)
    pool = kubernetes_settings(Settings(pool_name="p", pool_namespace="ns"))
    assert pool is not None and (pool.pool_name, pool.pool_namespace) == ("p", "ns")
    # A pool name beside static endpoints only names the pool: no watches.
    assert kubernetes_settings(Settings(pool_name="p", endpoints="10.0.0.1:8000")) is None
