"""ServerApp: validate the run config, then run the phases (fedaug_flwr.pipeline)."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from fedaug_flwr import message_index, pipeline
from fedaug_flwr.config import AppConfig


def build_server_app(overrides: Mapping[str, object] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``.

    ``flwr run`` fills ``context.run_config``; ``run_simulation`` (notebooks)
    leaves it empty, so the notebook passes its settings as ``overrides``.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = AppConfig.from_run_config({**context.run_config, **dict(overrides or {})})
        if isinstance(grid, InMemoryGrid):  # a simulation: its engine runs in this process
            if config.sim_message_index:
                message_index.install()
            else:
                message_index.uninstall()
        output_dir = pipeline.run(grid, config, context.run_id)
        print(f"fedaug-flwr: results of run {context.run_id} are in {output_dir}", flush=True)

    return server_app


app = build_server_app()
