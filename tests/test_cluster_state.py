"""The launcher's state folder: private to this user, wherever it lies.

It holds the Ray token and the process ids `down` ends, so a folder somebody else could enter
or plant files in is refused, and files in it are never written through a link. No cluster is
started: the folder alone is exercised (`LADDER_CLUSTER_STATE` points it into tmp_path).
"""

from __future__ import annotations

import os
import stat

import pytest

from cluster import launcher, state


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_default_root_is_private_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LADDER_CLUSTER_STATE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert state.state_root() == tmp_path / "ladder-cluster"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        assert str(state.state_root()) == "/run/ladder-cluster"
    else:
        assert state.state_root().name == f"ladder-cluster-{os.getuid()}"
    monkeypatch.setenv("LADDER_CLUSTER_STATE", str(tmp_path / "mine"))
    assert state.state_root() == tmp_path / "mine"  # the override wins


def test_state_folder_is_made_0700_and_reading_makes_nothing(monkeypatch, tmp_path):
    root = tmp_path / "xdg" / "ladder-cluster"
    monkeypatch.delenv("LADDER_CLUSTER_STATE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    old = os.umask(0)  # a permissive umask must not open the folder
    try:
        assert state.load_state("lone") is None and not root.exists()
        d = state.state_dir("lone", create=True)
    finally:
        os.umask(old)
    assert d == root / "lone" and _mode(root) == 0o700 and _mode(d) == 0o700


@pytest.mark.parametrize("how", ["symlink", "other-owner", "mode-0777", "mode-0755"])
def test_unsafe_state_folder_is_refused(monkeypatch, tmp_path, how):
    root = tmp_path / "state"
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    if how == "symlink":
        root.symlink_to(real)
    else:
        root.mkdir(mode=0o700)
    if how == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(root, 12345, 12345)
    elif how.startswith("mode-"):
        root.chmod(int(how[5:], 8))
    why = {"symlink": f"a symbolic link \\(to {real}\\)", "other-owner": "owned by uid 12345",
           "mode-0777": "mode 0777 lets group or others reach into it",
           "mode-0755": "mode 0755 lets group or others reach into it"}[how]
    monkeypatch.setenv("LADDER_CLUSTER_STATE", str(root))
    for use in (lambda: state.load_state("ltest"), lambda: state.token_path("ltest"),
                lambda: state.state_dir("ltest", create=True)):
        with pytest.raises(state.ClusterError, match=f"cluster state folder {root}: {why}"):
            use()
    assert list(real.iterdir()) == []  # nothing was written through the link


def test_state_files_are_not_written_through_links(monkeypatch, tmp_path):
    monkeypatch.setenv("LADDER_CLUSTER_STATE", str(tmp_path / "state"))
    st = state.ClusterState(name="lfile", plain=True, subnet="", bridge="")
    d = state.state_dir("lfile", create=True)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (d / "state.json.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        state.save_state(st)
    assert victim.read_text() == "keep"
    (d / "state.json.tmp").unlink()
    state.save_state(st)
    assert state.load_state("lfile") == st and _mode(d / "state.json") == 0o600
    launcher.down("lfile", log=lambda *_: None)  # removes the folder, and the empty root
    assert not (tmp_path / "state").exists()
