"""Scheduled runs and the UI: the served deployment's schedule and parameters, prefect.yaml, `tracecore
ui`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tracecore.flows.cli import build_parser
from tracecore.tasks.runtime.registry import load_config

REPO = Path(__file__).resolve().parents[1]


def test_deployment_has_the_cron_schedule_and_profile_parameters(prefect_harness):
    from prefect.client.orchestration import get_client
    from tracecore.flows.deploy import pipeline_deployment

    deployment = pipeline_deployment("tiny", ["finetune.seeds=[0]"], "/tmp/tc-store", "0 3 * * *",
                                     name="nightly-test")
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
        flow = client.read_flow(stored.flow_id)
    assert flow.name == "tracecore-profile" and stored.name == "nightly-test"
    assert [s.schedule.cron for s in stored.schedules] == ["0 3 * * *"]
    assert stored.parameters == {"profile": "tiny", "overrides": ["finetune.seeds=[0]"],
                                 "store": "/tmp/tc-store"}
    assert "profile:tiny" in stored.tags


def test_bad_profile_fails_when_the_deployment_is_built():
    from tracecore.configs.schema import ConfigError
    from tracecore.flows.deploy import pipeline_deployment

    with pytest.raises(ConfigError, match="finetune.epochs"):
        pipeline_deployment("tiny", ["finetune.epochs=0"], None, "0 3 * * *")


def test_prefect_yaml_deployments_point_at_real_flows_and_valid_profiles():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"]: d for d in spec["deployments"]}
    assert {"tracecore-nightly", "tracecore-finetune-gpu", "tracecore-eval-gpu"} <= set(names)
    pool = names["tracecore-finetune-gpu"]["work_pool"]["name"]
    assert pool == names["tracecore-eval-gpu"]["work_pool"]["name"]
    assert names["tracecore-nightly"]["schedules"][0]["cron"] == "0 3 * * *"
    for d in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(REPO / d["entrypoint"]))  # as a Prefect worker loads it
        assert flow.name == "tracecore-profile"
        params = d["parameters"]
        load_config(params["profile"], params.get("overrides", []), stages=params.get("stages"))


def test_cli_serve_and_ui_options():
    parser = build_parser()
    args = parser.parse_args(["serve", "--cron", "0 3 * * *", "--profile", "tiny"])
    assert args.cron == "0 3 * * *" and args.pause_on_shutdown is True
    assert parser.parse_args(["serve", "--cron", "* * * * *",
                              "--no-pause-on-shutdown"]).pause_on_shutdown is False
    ui = parser.parse_args(["ui"])
    assert ui.host == "127.0.0.1" and ui.port == 4200  # loopback unless asked otherwise
    with pytest.raises(SystemExit):
        parser.parse_args(["serve"])  # --cron is required


def test_tracecore_ui_on_another_port_points_its_ui_at_that_port(tmp_path):
    """`tracecore ui --port N`: the UI's settings name the API on N (Prefect's default, 4200, left the page
    unable to reach its server: "Can't connect to Server API"). The browser check is in `make
    test-cluster`."""
    import json
    import urllib.request

    from cluster_components import prefect_server

    with prefect_server(tmp_path) as server:
        settings = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/ui-settings",
                                                     timeout=10).read())
    assert settings["api_url"] == f"http://127.0.0.1:{server['port']}/api"
