"""What `ladder adapt` deletes and what it reads back, without a Ray cluster.

The export replaces `--out` only where an earlier export (its `.ladder-export` mark) or nothing
is there, or with --force; --fresh deletes a run folder only where an earlier run is; a link is
never followed. progress.jsonl with a torn last line (a writer killed mid-line) still resumes.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from adapt.progress import ProgressError, ProgressPrinter, append_progress, read_progress
from adapt.train import AdaptError, AdaptOptions, check_folders, prepare_run
from ladder.loaders.hf import EXPORT_MARK, write_folder
from ladder.model.config import ModelConfig
from ladder.private import UnsafePath

CFG = ModelConfig(vocab_size=16, dim=8, intermediate_size=16, n_layers=1, n_heads=2,
                  n_kv_heads=1, max_seq_len=32)


def _write(dest, **kw):
    return write_folder(dest, CFG, {"model.norm.weight": torch.ones(8)}, **kw)


def test_export_replaces_only_its_own_folders(tmp_path):
    out = tmp_path / "out"
    _write(out)
    assert (out / EXPORT_MARK).is_file() and (out / "config.json").is_file()
    (out / "stale").write_text("from the earlier export")
    _write(out)  # an earlier export: replaced as before
    assert not (out / "stale").exists() and not (tmp_path / "out.partial").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UnsafePath, match=f"{mine} is not empty and was not written by this "
                       f"command \\(it has no {EXPORT_MARK}\\).*pass --force"):
        _write(mine)
    assert (mine / "notes.txt").read_text() == "keep"
    _write(mine, force=True)
    assert not (mine / "notes.txt").exists() and (mine / EXPORT_MARK).is_file()


def test_export_never_deletes_through_a_link(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / EXPORT_MARK).write_text("{}")  # even one that looks like an export
    link = tmp_path / "out"
    link.symlink_to(target)
    for force in (False, True):
        with pytest.raises(UnsafePath, match=f"{link} is a symbolic link \\(to {target}\\)"):
            _write(link, force=force)
    assert sorted(p.name for p in target.iterdir()) == [EXPORT_MARK]


def _options(tmp_path, out, **kw) -> AdaptOptions:
    return AdaptOptions(model=str(tmp_path / "no-model"), out=str(out), **kw)


def test_adapt_checks_out_and_the_run_folder_before_it_runs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("keep")
    with pytest.raises(AdaptError, match=f"--out {out} is not empty .*pass --force"):
        check_folders(_options(tmp_path, out))
    check_folders(_options(tmp_path, out, force=True))
    link = tmp_path / "link"
    link.symlink_to(out)
    o = _options(tmp_path, link, force=True)
    assert o.out == str(link)  # not resolved to the folder it points to
    with pytest.raises(AdaptError, match=f"--out {link} is a symbolic link"):
        check_folders(o)

    storage = tmp_path / "storage"
    (storage / "run").mkdir(parents=True)
    (storage / "run" / "thesis.tex").write_text("keep")
    o = _options(tmp_path, tmp_path / "new", storage=str(storage), fresh=True)
    with pytest.raises(AdaptError, match=f"the run folder {storage / 'run'} \\(--fresh deletes "
                       "it\\) is not empty .*run.json or progress.jsonl"):
        prepare_run(o)
    assert (storage / "run" / "thesis.tex").read_text() == "keep"
    (storage / "run" / "progress.jsonl").write_text("")  # an earlier run's: --fresh may go
    check_folders(o)


def test_the_command_refuses_before_starting_ray(tmp_path, capsys):
    from ladder.cli import main
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("keep")
    assert main(["adapt", "--model", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"ladder adapt: --out {out} is not empty" in err and "--force" in err
    assert (out / "thesis.tex").read_text() == "keep"


def _progress(tmp_path, text: str):
    path = tmp_path / "progress.jsonl"
    path.write_text(text)
    return path


def test_a_torn_last_line_is_skipped_and_mended(tmp_path):
    whole = json.dumps({"step": 1, "checkpoint": "/c1"}) + "\n"
    path = _progress(tmp_path, whole + '{"step": 2, "loss": 0.5, "chec')
    assert read_progress(tmp_path) == [{"step": 1, "checkpoint": "/c1"}]
    out = io.StringIO()
    printer = ProgressPrinter(path, steps=3, out=out)  # starts where the torn line does
    append_progress(path, {"step": 2})  # removes the torn line first
    assert path.read_text() == whole + '{"step": 2}\n'
    append_progress(path, {"step": 3})
    printer._drain()
    assert out.getvalue() == "[adapt] step 2/3\n[adapt] step 3/3\n"
    # a whole record without its newline is kept, and gets one
    path.write_text(whole + '{"step": 2}')
    assert read_progress(tmp_path)[-1] == {"step": 2}
    append_progress(path, {"step": 3})
    assert read_progress(tmp_path) == [{"step": 1, "checkpoint": "/c1"}, {"step": 2},
                                       {"step": 3}]


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
    path = _progress(tmp_path, '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ProgressError, match=f"{path}: line 2 is not JSON"):
        read_progress(tmp_path)


def test_eval_refuses_zero_tokens_or_rows(capsys):
    """`ladder eval --max-tokens 0` said so, instead of dividing by zero after loading."""
    from ladder.cli import main
    for flag in ("--max-tokens", "--rows"):
        assert main(["eval", "--model", "smollm2", flag, "0"]) == 2
        assert "must be at least 1" in capsys.readouterr().err
