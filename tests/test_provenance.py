"""Provenance: the checkout's state with a hash of its uncommitted changes, base-model fingerprints, and
``experiments.study --publish`` refusing runs from a dirty tree or several commits."""

import json
import shutil
import subprocess

import pytest

from experiments import provenance, study


def _repo(path):
  run = lambda *a: subprocess.run(["git", *a], cwd=path, check=True, capture_output=True)  # noqa: E731
  run("init", "-q")
  run("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "start")
  (path / "a.py").write_text("x = 1\n")
  run("add", "a.py")
  run("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "a")
  return run


def test_git_state_hashes_uncommitted_changes(tmp_path):
  _repo(tmp_path)
  clean = provenance.git_state(tmp_path)
  assert len(clean["git_commit"]) == 40 and clean["git_dirty"] is False and clean["git_diff_sha256"] == ""
  (tmp_path / "a.py").write_text("x = 2\n")
  edited = provenance.git_state(tmp_path)
  assert edited["git_dirty"] is True and len(edited["git_diff_sha256"]) == 16
  assert edited["git_commit"] == clean["git_commit"]
  (tmp_path / "a.py").write_text("x = 3\n")
  assert provenance.git_state(tmp_path)["git_diff_sha256"] != edited["git_diff_sha256"]  # another change
  (tmp_path / "a.py").write_text("x = 1\n")
  (tmp_path / "new.py").write_text("y = 1\n")  # an untracked file counts, with its bytes
  untracked = provenance.git_state(tmp_path)
  (tmp_path / "new.py").write_text("y = 2\n")
  assert untracked["git_dirty"] and provenance.git_state(tmp_path)["git_diff_sha256"] != untracked["git_diff_sha256"]
  assert provenance.git_state(tmp_path.parent / "nowhere-here")["git_commit"] == "unknown"


def test_fingerprint_follows_the_weights(tmp_path, monkeypatch):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "model.safetensors").write_bytes(bytes(range(256)) * 10_000)
  a = provenance.fingerprint(tmp_path)
  assert a == provenance.fingerprint(tmp_path) and len(a) == 16
  data = bytearray((tmp_path / "model.safetensors").read_bytes())
  data[1_500_000] ^= 1  # one bit in the middle of the file
  (tmp_path / "model.safetensors").write_bytes(bytes(data))
  b = provenance.fingerprint(tmp_path)
  assert b != a
  monkeypatch.setattr(provenance, "FULL_HASH_LIMIT", 1000)  # large weights: names, sizes, first and last MiB only
  assert provenance.fingerprint(tmp_path) != b
  assert provenance.fingerprint("org/model-on-the-hub") == "hub:org/model-on-the-hub"


def _sweep(root, infos):
  """A family directory whose points have these run_info.json records (None: no file)."""
  d = root / "lr_sweep"
  points = []
  for i, info in enumerate(infos):
    (d / f"p{i}").mkdir(parents=True)
    (d / f"p{i}" / "config.json").write_text("{}")
    if info is not None:
      (d / f"p{i}" / "run_info.json").write_text(json.dumps(info))
    points.append({"point": f"p{i}", "name": f"p{i}"})
  (d / "sweep.json").write_text(json.dumps({"config": "experiments/configs/lr_sweep.py", "arg": "quick",
                                            "points": points}))


CLEAN = {"git_commit": "a" * 40, "git_dirty": False, "git_diff_sha256": ""}


@pytest.mark.parametrize("infos, ok", [
    ([CLEAN, CLEAN], True),
    ([CLEAN, {**CLEAN, "git_commit": "b" * 40}], False),  # two commits
    ([CLEAN, {**CLEAN, "git_dirty": True, "git_diff_sha256": "0123456789abcdef"}], False),  # a dirty tree
    ([CLEAN, None], False),  # a run without run_info.json
])
def test_run_commits_and_what_publish_accepts(tmp_path, infos, ok):
  _sweep(tmp_path, infos)
  commits = study.run_commits(tmp_path, ["lr_sweep", "capacity"])
  assert sum(commits.values()) == 2 and study.clean(commits) is ok
  if not ok:
    assert any(" " in k or k.startswith("unknown") for k in commits) or len(commits) == 2


def test_publish_refuses_mixed_runs_unless_told_and_then_says_so(tmp_path, capsys, monkeypatch):
  dirty = {**CLEAN, "git_dirty": True, "git_diff_sha256": "0123456789abcdef"}
  _sweep(tmp_path / "work", [CLEAN, dirty])
  monkeypatch.setattr(study, "index", lambda workdir, variant, families: "## vs the study\n")  # no report here
  monkeypatch.setattr(study, "publish", lambda workdir, dest, families: shutil.copytree(workdir, dest))
  argv = ["--variant", "quick", "--families", "lr_sweep", "--workdir", str(tmp_path / "work"), "--report-only",
          "--publish", str(tmp_path / "dest")]
  assert study.main(argv) == 2
  err = capsys.readouterr().err
  assert "--publish refused" in err and f"{'a' * 40} (uncommitted changes, diff sha256 0123456789abcdef): 1" in err
  assert not (tmp_path / "dest").exists()
  assert study.main(argv + ["--allow-mixed"]) == 0 and (tmp_path / "dest" / "lr_sweep").exists()


def test_run_commits_count_the_runs_of_each_commit(tmp_path):
  _sweep(tmp_path, [CLEAN, {**CLEAN, "git_commit": "b" * 40}])
  commits = study.run_commits(tmp_path, ["lr_sweep"])
  assert commits == {"a" * 40: 1, "b" * 40: 1}
  _sweep(tmp_path / "one", [CLEAN, CLEAN])
  assert study.run_commits(tmp_path / "one", ["lr_sweep"]) == {"a" * 40: 2}


def test_a_run_resumed_under_other_code_is_not_one_clean_commit(tmp_path):
  resumed = {**CLEAN, "earlier_starts": [{**CLEAN, "git_dirty": True, "git_diff_sha256": "0123456789abcdef"}]}
  _sweep(tmp_path, [CLEAN, resumed])
  commits = study.run_commits(tmp_path, ["lr_sweep"])
  assert not study.clean(commits) and any("(resumed; started under " in k for k in commits)
  same = {**CLEAN, "earlier_starts": [dict(CLEAN)]}  # resumed under the same clean commit: still clean
  _sweep(tmp_path / "same", [CLEAN, same])
  assert study.clean(study.run_commits(tmp_path / "same", ["lr_sweep"]))


def test_start_workdir_keeps_every_earlier_starts_code(tmp_path, monkeypatch):
  import ml_collections

  from experiments import run as run_lib

  states = iter([{**CLEAN, "git_dirty": True, "git_diff_sha256": "1111111111111111"}, CLEAN])
  monkeypatch.setattr(run_lib.provenance, "git_state", lambda: next(states))
  config = ml_collections.ConfigDict({"x": 1})
  run_lib.start_workdir(tmp_path / "w", config, overwrite=False)
  run_lib.start_workdir(tmp_path / "w", config, overwrite=False)  # the resume, after a commit
  info = json.loads((tmp_path / "w" / "run_info.json").read_text())
  assert info["git_dirty"] is False and info["earlier_starts"] == [
      {"git_commit": "a" * 40, "git_dirty": True, "git_diff_sha256": "1111111111111111"}]


def test_the_summary_combines_every_overall_row_of_a_family():
  from experiments import report

  rows = [("lr_width", report.FindingRow("3", f"hidden {w}, overall, ranks ≥ 4", "", v, ""))
          for w, v in ((64, "disagree"), (128, "disagree"), (256, "agree"))]
  assert study.summary_rows(rows)[0][-1] == "**disagree**"  # not the last setting's "agree"
