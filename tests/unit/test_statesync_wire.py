

def test_the_precise_scorers_approximate_fallback_is_shared_too() -> None:
    from epp.config import load_config
    from epp.statesync.setup import approximate_indexes

    cfg = load_config("plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n"
                      "    kvEventsPort: 0\n    replayPort: 0\n"
                      "schedulingProfiles:\n- name: default\n  plugins:\n"
                      "  - pluginRef: precise-prefix-cache-scorer\n")
    precise = cfg.plugins["precise-prefix-cache-scorer"]
    assert approximate_indexes(cfg.plugins) == {precise.approx.name: precise.approx}
