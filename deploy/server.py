"""The Serve deployment: one TP group of Ray actors per replica, behind the OpenAI API.

A thin shim: the replica builds its `actors.TPGroup` and serves `deploy.api` over it. The replica
owns bundle 0 of its placement group and starts the group's ShardWorkers in bundles 1..tp, so
Serve gang-schedules whole TP groups and autoscaling adds and removes whole groups.
`check_health` runs the group's collective round trip: a replica whose group is broken fails it
and Serve replaces it.
"""

import uuid
from dataclasses import asdict

from ray import serve

from deploy.api import OpenAIServer
from deploy.app import build_api
from deploy.config import ServerConfig, deployment_options, split_args


@serve.deployment
@serve.ingress()  # the app is built per replica, over its own group (__serve_build_asgi_app__)
class LadderServer:
    def __init__(self, config: dict | None = None) -> None:
        import ray

        from actors.group import TPGroup
        cfg = ServerConfig.from_dict(config)
        in_pg = ray.util.get_current_placement_group() is not None
        self.group = TPGroup(cfg.group_options(), strategy=cfg.strategy,
                             placement_group="current" if in_pg else None,
                             bundle_offset=1 if in_pg else 0,
                             fault_timeout_s=cfg.fault_timeout_s,
                             name=f"{cfg.model_name}-{uuid.uuid4().hex[:8]}",
                             metrics=cfg.metrics, model_label=cfg.model_name)
        metrics = None
        if cfg.metrics:
            from actors.metrics import GroupMetrics
            i = self.group.info
            metrics = GroupMetrics(cfg.model_name, i.residual, i.tp, i.interconnect)
        self.server = OpenAIServer(self.group, cfg, metrics=metrics, details={
            "namespace": ray.get_runtime_context().namespace})

    def __serve_build_asgi_app__(self):
        return build_api(self.server)

    async def check_health(self) -> None:
        await self.server.check_health()

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown(timeout_s=10)


def build_app(args: dict | None = None):
    """The Serve application (`serve run deploy/<name>.yaml` imports this as its import_path).

    `args`: ServerConfig's fields, plus Serve's deployment settings (`deploy.config.DEPLOY_KEYS`).
    Keys in a file or an environment variable are read here, where the application is built.
    """
    cfg, dep = split_args(args)
    cfg = cfg.resolve_keys()
    return LadderServer.options(**deployment_options(cfg, **dep)).bind(asdict(cfg))


__all__ = ["LadderServer", "ServerConfig", "build_app", "deployment_options"]
