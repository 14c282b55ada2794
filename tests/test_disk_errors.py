"""Disk and permission errors on the output: a clear message naming the file and the problem,
no part file a re-run would take as finished, and a re-run that resumes to the same output.
The errors are real: a small tmpfs fills up, or is remounted read-only mid-run."""

from __future__ import annotations

import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SCORE_SETTINGS, write_jsonl

from miniplm import io
from miniplm.cli import user_message
from miniplm.data.prepare import PrepareConfig, run_prepare
from miniplm.scoring.score import ScoreConfig, run_score


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root, as on the CI machines; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def remount(mount, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


def parts(root) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(root.glob("part-*.parquet"))}


@pytest.fixture(scope="module")
def raw_corpus(documents, tmp_path_factory):
    root = tmp_path_factory.mktemp("disk_corpus")
    write_jsonl(root / "a.jsonl", [{"text": d} for d in documents[0::2]])
    write_jsonl(root / "b.jsonl", [{"text": d} for d in documents[1::2]])
    return root


@pytest.mark.timeout(600)
def test_full_disk_fails_clearly_and_a_rerun_resumes(raw_corpus, small_disk, tmp_path, ray_session):
    cfg = dict(inputs=[str(raw_corpus)], max_chars=1000, rows_per_part=20)
    clean = run_prepare(PrepareConfig(output=str(tmp_path / "clean"), **cfg))
    total = sum(p.stat().st_size for p in (tmp_path / "clean").glob("part-*.parquet"))
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * ((1 << 20) - total // 2))  # room for about half the parts

    out = small_disk / "instances"
    with pytest.raises(io.StorageError, match=r"cannot write .*part-.*No space left on device") as info:
        run_prepare(PrepareConfig(output=str(out), **cfg))  # raised in a Ray task, reaches us as is
    message = user_message(info.value)  # what the CLI prints
    assert message.startswith(f"cannot write {out}/part-") and message.endswith("to resume.")
    written = parts(out)
    assert written and not (out / io.MANIFEST).exists()
    for name, table in written.items():  # whatever has a final name is complete
        assert table.num_rows > 0, name

    filler.unlink()
    resumed = run_prepare(PrepareConfig(output=str(out), **cfg))
    assert resumed["fingerprint"] == clean["fingerprint"] and resumed["parts"] == clean["parts"]
    ours, theirs = parts(out), parts(tmp_path / "clean")
    assert ours.keys() == theirs.keys() and all(ours[n].equals(theirs[n]) for n in ours)


@pytest.mark.timeout(600)
def test_output_turned_read_only_mid_run(instances, llama_dir, llama_scores, small_disk, ray_session):
    """Scoring loses write access after its first part; the re-run ends with the session's
    clean table of the same instances and model (`llama_scores`, the same settings)."""
    score = dict(instances=str(instances), model=str(llama_dir), **SCORE_SETTINGS)
    clean, clean_dir = llama_scores
    out = small_disk / "scores"

    def lose_write_access(name, written=[]):
        written.append(name)
        if len(written) == 1:
            remount(small_disk, "ro")

    with pytest.raises(io.StorageError, match=r"cannot write .*part-.*Read-only file system"):
        run_score(ScoreConfig(output=str(out), **score), on_part_written=lose_write_access)
    assert len(parts(out)) == 1 and not (out / io.MANIFEST).exists()

    remount(small_disk, "rw")
    resumed = run_score(ScoreConfig(output=str(out), **score))
    assert resumed["rows"] == clean["rows"]
    ours, theirs = parts(out), parts(clean_dir)
    assert ours.keys() == theirs.keys() and all(ours[n].equals(theirs[n]) for n in ours)


def test_output_under_a_file_is_refused_before_work(raw_corpus, tmp_path, ray_session):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output's parent folder should be")
    with pytest.raises(io.StorageError, match=r"cannot write .*not_a_folder/instances.*Not a directory"):
        run_prepare(PrepareConfig(inputs=[str(raw_corpus)], output=str(blocker / "instances")))
