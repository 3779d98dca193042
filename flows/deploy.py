"""Scheduled runs and the local UI: `tracecore serve --cron ...` and `tracecore ui`.

`serve` builds a deployment of the `tracecore-profile` flow whose parameters are the profile, the
`--set` overrides and the store (validated when the deployment is built, so a scheduled run is exactly
`tracecore run` with those arguments) and serves it from this process (`flow.serve`). `prefect.yaml` at the
repository root declares the same deployment for a work
pool (`prefect deploy`), plus `finetune`/`eval` flows for a GPU pool.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tracecore.tasks.runtime.registry import load_config

DEPLOYMENT = "tracecore-scheduled"
UI_HOST, UI_PORT = "127.0.0.1", 4200


def deployment_parameters(profile: str, overrides: list[str], store: str | None) -> dict:
    """Parameters of the `tracecore-profile` flow; validated now so a bad profile fails at serve time."""
    load_config(profile, overrides, store=store)
    return {"profile": profile, "overrides": list(overrides), "store": store}


def pipeline_deployment(profile: str, overrides: list[str], store: str | None, cron: str | None,
                        name: str = DEPLOYMENT):
    """A RunnerDeployment of `tracecore-profile` with a cron schedule (None = unscheduled)."""
    from tracecore.flows.pipeline import run_profile

    return run_profile.to_deployment(name=name, cron=cron,
                                     parameters=deployment_parameters(profile, overrides, store),
                                     tags=["tracecore", f"profile:{profile}"],
                                     description=f"tracecore pipeline, profile {profile}")


def serve(profile: str, overrides: list[str], store: str | None, cron: str, name: str = DEPLOYMENT,
          pause_on_shutdown: bool = True) -> None:
    """Serve the scheduled deployment from this process until interrupted (needs a Prefect server)."""
    from tracecore.flows.pipeline import run_profile

    run_profile.serve(name=name, cron=cron, parameters=deployment_parameters(profile, overrides, store),
                      pause_on_shutdown=pause_on_shutdown, tags=["tracecore", f"profile:{profile}"])


def ui_environment(host: str, port: int) -> dict[str, str]:
    """The server's settings for its own address: the UI's API URL follows the port (Prefect's UI otherwise
    calls http://127.0.0.1:4200/api whatever port the server listens on, and shows "Can't connect")."""
    return {"PREFECT_UI_API_URL": f"http://{host}:{port}/api", "PREFECT_SERVER_API_HOST": host,
            "PREFECT_SERVER_API_PORT": str(port)}


def ui(host: str = UI_HOST, port: int = UI_PORT) -> int:
    """`prefect server start` on loopback (by default); prints the URL and the API setting to export."""
    url = f"http://{host}:{port}"
    print(f"Prefect UI: {url}\nIn the shell that runs tracecore:\n  export PREFECT_API_URL={url}/api",
          flush=True)
    env = {**os.environ, **ui_environment(host, port)}
    return subprocess.call([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port",
                            str(port)],
                           env=env)
