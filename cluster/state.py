"""A launched cluster's state: its nodes, addresses and Ray token, in a folder only this user
may enter (see `cluster.launcher` for where, and `ladder.private` for the checks)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ladder.private import UnsafePath, open_private, private_dir

RAY_PORT = 6379
DASHBOARD_PORT = 8265


class ClusterError(RuntimeError):
    """The launcher could not do what was asked; the message says why and what to do."""


@dataclass
class NodeState:
    index: int
    ip: str
    link: str  # the profile as given (`cheap@200us`)
    cpus: int
    ns: str = ""  # '' in a plain cluster
    veth: str = ""
    sid: int = 0  # plain cluster: the node's process session


@dataclass
class ClusterState:
    name: str
    plain: bool
    subnet: str  # e.g. 10.87.23 (the /24 without its last byte); '' when plain
    bridge: str
    nodes: list[NodeState] = field(default_factory=list)
    port: int = RAY_PORT  # the head's GCS (a plain cluster takes free ones on loopback)
    dashboard_port: int = DASHBOARD_PORT
    started: float = 0.0
    ready_s: float = 0.0
    mtu: int = 1500  # every link's, the bridge's included (loopback's own when plain)

    @property
    def head(self) -> NodeState:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.ip}:{self.dashboard_port}"


def state_root() -> Path:
    """Where the clusters' state folders live (see the module docstring), read from the
    environment at each call."""
    if os.environ.get("LADDER_CLUSTER_STATE"):
        return Path(os.environ["LADDER_CLUSTER_STATE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "ladder-cluster"
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return Path("/run/ladder-cluster")
    return Path(tempfile.gettempdir()) / f"ladder-cluster-{os.getuid()}"


def state_dir(name: str, *, create: bool = False) -> Path:
    """Cluster `name`'s state folder, made (mode 0700) when `create`. The root is checked
    first: a link, another user's or one open to others is refused."""
    try:
        root = private_dir(state_root(), create=create)
    except UnsafePath as e:
        raise ClusterError(f"cluster state folder {e}") from None
    d = root / name
    if create:
        d.mkdir(mode=0o700, exist_ok=True)
    return d


def token_path(name: str) -> Path:
    return state_dir(name) / "token"


def load_state(name: str) -> ClusterState | None:
    path = state_dir(name) / "state.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClusterError(f"{path}: unreadable cluster state ({e}); `ladder cluster down "
                           f"--name {name}` still removes what the names point to") from None
    nodes = [NodeState(**n) for n in doc.pop("nodes")]
    return ClusterState(**doc, nodes=nodes)


def save_state(st: ClusterState) -> None:
    d = state_dir(st.name, create=True)
    tmp = d / "state.json.tmp"
    with open_private(tmp) as f:
        f.write(json.dumps(asdict(st), indent=1).encode())
    tmp.replace(d / "state.json")


def ray_env(name: str) -> dict[str, str]:
    """The environment a process needs to talk to the cluster: token auth and the address."""
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path(name)))
    env.pop("RAY_AUTH_TOKEN", None)
    st = load_state(name)
    if st is not None:
        env["RAY_ADDRESS"] = st.address
    return env
