"""select: kept ids equal an independent pandas top-alpha; refusals; baselines; report; the
work runs in per-part Ray tasks (the driver reads no part); ties are broken by id across parts."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import save_tiny_model, score, write_jsonl

from miniplm import io
from miniplm.data.prepare import PrepareConfig, run_prepare
from miniplm.data.split import split_instances
from miniplm.selection.select import SelectConfig, keep_count, run_select


def table_df(root) -> pd.DataFrame:
    manifest = io.read_json(str(root / io.MANIFEST))
    return pd.concat([pq.read_table(root / p["name"]).to_pandas() for p in manifest["parts"]])


@pytest.fixture(scope="module")
def scored(documents, tokenizer_dir, llama_dir, gpt2_eos_only_dir, tmp_path_factory, ray_session):
    """Instances from two sources scored by a teacher, a reference sharing its tokenizer, and
    a model with another tokenizer."""
    root = tmp_path_factory.mktemp("select")
    write_jsonl(root / "raw" / "stdlib.jsonl", [{"text": d} for d in documents[:40]])
    write_jsonl(root / "raw" / "more.jsonl", [{"text": d} for d in documents[40:70]])
    run_prepare(PrepareConfig(inputs=[str(root / "raw")], output=str(root / "inst"),
                              max_chars=800, rows_per_part=30))
    # (its own folder: a score table is never written into the model it scores with)
    reference = save_tiny_model("llama", tokenizer_dir, root / "reference_model", seed=1, hidden=32, layers=1)
    for name, model in [("teacher", llama_dir), ("reference", reference), ("other_tok", gpt2_eos_only_dir)]:
        score(root / "inst", model, root / name)
    return root


def select(scored, tmp_path, **kw):
    kw.setdefault("reference", str(scored / "reference"))
    return run_select(SelectConfig(instances=str(scored / "inst"), teacher=str(scored / "teacher"),
                                   output=str(tmp_path / "refined"), **kw))


def expected_top(scored, alpha, teacher_only=False) -> set[str]:
    t = table_df(scored / "teacher").set_index("id")
    r = table_df(scored / "reference").set_index("id")
    score = t.logprob / t.n_tokens - (0 if teacher_only else r.logprob / r.n_tokens)
    df = pd.DataFrame({"id": score.index, "score": score.values})
    df = df.sort_values(["score", "id"], ascending=[False, True])
    return set(df.id.head(math.floor(alpha * len(df))))


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_difference_keeps_top_alpha(scored, tmp_path, alpha):
    manifest = select(scored, tmp_path, alpha=alpha)
    refined = table_df(tmp_path / "refined")
    assert set(refined.id) == expected_top(scored, alpha)
    n = io.read_json(str(scored / "inst" / io.MANIFEST))["instances"]
    assert manifest["instances"] == len(refined) == math.floor(alpha * n)
    # the refined corpus is an instances dataset (+ score), texts intact
    inst = table_df(scored / "inst").set_index("id")
    assert list(refined.columns) == ["id", "text", "n_bytes", "source", "score"]
    assert (refined.set_index("id").text == inst.loc[refined.id].text).all()
    assert manifest["threshold"] == pytest.approx(refined.score.min())
    assert manifest["tokens_kept"] == table_df(scored / "teacher").set_index("id").loc[refined.id].n_tokens.sum()
    for f in ("report.json", "scores.png", "samples.md"):
        assert (tmp_path / "refined" / f).stat().st_size > 0
    report = json.loads((tmp_path / "refined" / "report.json").read_text())
    assert set(report["per_source"]) == {"stdlib", "more"}
    assert sum(s["kept"] for s in report["per_source"].values()) == manifest["instances"]
    assert "## Around the threshold" in (tmp_path / "refined" / "samples.md").read_text()


def test_teacher_method_and_budget(scored, tmp_path):
    select(scored, tmp_path, method="teacher", alpha=0.4)
    assert set(table_df(tmp_path / "refined").id) == expected_top(scored, 0.4, teacher_only=True)

    t = table_df(scored / "teacher").set_index("id")
    manifest = select(scored, tmp_path / "b", budget_tokens=2000)
    kept = table_df(tmp_path / "b" / "refined")
    assert manifest["tokens_kept"] == t.loc[kept.id].n_tokens.sum() <= 2000
    # the next-best instance would not have fit
    ranked = sorted(expected_top(scored, 1.0))
    order = table_df(scored / "reference").set_index("id")
    score = (t.logprob / t.n_tokens - order.logprob / order.n_tokens).loc[ranked]
    nxt = score.drop(kept.id).sort_values(ascending=False).index[0]
    assert manifest["tokens_kept"] + t.loc[nxt].n_tokens > 2000


def test_random_and_sample_are_seeded(scored, tmp_path):
    def kept(method, seed, out):
        select(scored, tmp_path / out, method=method, seed=seed, alpha=0.5, temperature=0.5)
        return set(table_df(tmp_path / out / "refined").id)

    for method in ("random", "sample"):
        a, b, c = kept(method, 1, f"{method}1"), kept(method, 1, f"{method}1b"), kept(method, 2, f"{method}2")
        assert a == b and a != c and len(a) == len(c)


def id_draw(seed: int, id_: str) -> float:
    """The documented per-id draw: 52 bits of blake2b(`seed:id`), as a uniform in (0, 1)."""
    digest = hashlib.blake2b(f"{seed}:{id_}".encode(), digest_size=8).digest()
    return ((int.from_bytes(digest, "little") >> 12) + 0.5) / 2.0**52


def test_random_and_sample_draw_per_id(scored, tmp_path):
    """An instance's draw depends on the seed and its id only, not on its part or position."""
    t = table_df(scored / "teacher").set_index("id")
    r = table_df(scored / "reference").set_index("id").loc[t.index]
    draw = pd.Series([id_draw(3, i) for i in t.index], index=t.index)
    difference = t.logprob / t.n_tokens - r.logprob / r.n_tokens
    for method, key in [("random", draw), ("sample", difference / 0.5 - np.log(-np.log(draw)))]:
        select(scored, tmp_path / method, method=method, seed=3, alpha=0.4, temperature=0.5)
        df = key.reset_index(name="key").sort_values(["key", "id"], ascending=[False, True])
        assert set(table_df(tmp_path / method / "refined").id) == set(df.id.head(math.floor(0.4 * len(df)))), method


def driver_part_reads(monkeypatch) -> list:
    """Parquet parts opened or read by this process (Ray tasks run in other processes)."""
    reads = []
    real_open, real_read = fsspec.open, pq.read_table

    def opening(url, mode="rb", *args, **kwargs):
        if str(url).endswith(".parquet") and "r" in mode:
            reads.append(str(url))
        return real_open(url, mode, *args, **kwargs)

    def reading(source, *args, **kwargs):
        reads.append(str(source))
        return real_read(source, *args, **kwargs)

    monkeypatch.setattr(fsspec, "open", opening)
    monkeypatch.setattr(pq, "read_table", reading)
    return reads


def test_the_driver_reads_no_part(scored, tmp_path, monkeypatch):
    """Memory is bounded by a part: Ray tasks read the parts, the driver only their results."""
    reads = driver_part_reads(monkeypatch)
    select(scored, tmp_path, alpha=0.5)
    select(scored, tmp_path / "b", budget_tokens=2000, dry_run=True)
    assert reads == []
    monkeypatch.undo()
    assert set(table_df(tmp_path / "refined").id) == expected_top(scored, 0.5)


def test_split_runs_in_per_part_tasks(scored, tmp_path, monkeypatch, capsys):
    reads = driver_part_reads(monkeypatch)
    inside, outside = tmp_path / "d_ref", tmp_path / "pool"
    split_instances(str(scored / "inst"), 0.3, 7, str(inside), str(outside))
    assert reads == []
    monkeypatch.undo()
    inst = table_df(scored / "inst")
    mask = np.array([text_draw(7, t) < 0.3 for t in inst.text])
    for root, half in ((inside, inst[mask]), (outside, inst[~mask])):
        manifest = io.read_json(str(root / io.MANIFEST))
        got = table_df(root)
        assert sorted(got.id) == sorted(half.id) and manifest["instances"] == len(half)
        assert manifest["bytes"] == half.n_bytes.sum()
        fp = io.RowSetHash()
        for id_, text in zip(half.id, half.text):
            fp.add(id_, text)
        assert manifest["fingerprint"] == fp.hexdigest()
    capsys.readouterr()
    split_instances(str(scored / "inst"), 0.3, 7, str(inside), str(outside))
    assert "already complete" in capsys.readouterr().out
    # a run folder split before D_ref was keyed on the text: refused, saying what to do in a pipeline
    job = io.read_json(str(inside / io.JOB))
    io.write_json(str(inside / io.JOB), {k: v for k, v in job.items() if k != "key"})
    with pytest.raises(ValueError, match=r"d_ref already holds a split made with different settings \(key "
                                         r"differ\)\. Remove the run folder, or give the run"):
        split_instances(str(scored / "inst"), 0.3, 7, str(inside), str(outside))


def text_draw(seed: int, text: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def test_a_text_lands_on_the_same_side_of_the_split_wherever_it_sits(documents, tmp_path, ray_session):
    """The split is a function of the text, not of its file or row: the same text in another
    corpus (another package version, another order) or twice in one corpus stays on one side.
    Else a teacher trained on one machine's D_ref may have seen another machine's pool."""
    texts = documents[:30]
    write_jsonl(tmp_path / "raw" / "a" / "docs.jsonl", [{"text": t} for t in texts])
    write_jsonl(tmp_path / "raw" / "b" / "other-0.jsonl", [{"text": t} for t in texts[::-1] + ["new text"] + texts[:5]])
    sides = {}
    for name in ("a", "b"):
        run_prepare(PrepareConfig(inputs=[str(tmp_path / "raw" / name)], output=str(tmp_path / name / "inst"),
                                  max_chars=100_000))
        split_instances(str(tmp_path / name / "inst"), 0.5, 1, str(tmp_path / name / "d_ref"),
                        str(tmp_path / name / "pool"))
        sides[name] = {side: list(table_df(tmp_path / name / side).text) for side in ("d_ref", "pool")}
    for side in ("d_ref", "pool"):
        assert set(sides["a"][side]) == set(sides["b"][side]) - {"new text"}
    assert set(sides["a"]["d_ref"]) == {t for t in texts if text_draw(1, t) < 0.5}
    assert 0 < len(sides["a"]["d_ref"]) < len(texts)
    assert not set(sides["b"]["d_ref"]) & set(sides["b"]["pool"])


def write_tied_tables(root, parts: int = 3, rows: int = 40) -> None:
    """Instances (ids not in sorted order within a part) and teacher/reference tables (sorted
    by id, as the score stage writes them) whose difference scores take 3 values: large tie
    groups that straddle every cut and every part."""
    rng = np.random.default_rng(0)
    fp = io.RowSetHash(total=99, count=parts * rows)
    manifests = {"inst": [], "teacher": [], "reference": []}

    def provenance(role):  # in the manifest and in every part, as the score stage writes them
        return {"instances_fingerprint": fp.hexdigest(), "model_fingerprint": role, "tokenizer_fingerprint": "t"}

    all_ids = [f"doc{j:04d}" for j in rng.permutation(parts * rows)]
    for k in range(parts):
        name = f"part-{k:05d}.parquet"
        ids = all_ids[k * rows:(k + 1) * rows]
        n_tokens = rng.integers(1, 50, rows)
        io.write_parquet(str(root / "inst" / name), pa.table({
            "id": ids, "text": [f"text of {i}" for i in ids], "n_bytes": n_tokens * 3,
            "source": ["a" if i % 2 else "b" for i in range(rows)]}))
        manifests["inst"].append({"name": name, "rows": rows, "bytes": int(n_tokens.sum() * 3)})
        per_token = {"teacher": -1.0 - rng.integers(0, 3, rows), "reference": np.full(rows, -2.0)}
        for role in ("teacher", "reference"):
            table = pa.table({"id": ids, "n_tokens": n_tokens, "logprob": per_token[role] * n_tokens})
            io.write_parquet(str(root / role / name), table.sort_by("id"), metadata=provenance(role))
            manifests[role].append({"name": name, "rows": rows})
    io.write_json(str(root / "inst" / io.MANIFEST), {"fingerprint": fp.hexdigest(), "parts": manifests["inst"],
                                                     "instances": parts * rows})
    for role in ("teacher", "reference"):
        io.write_json(str(root / role / io.MANIFEST), {"parts": manifests[role], "provenance": provenance(role)})


@pytest.mark.parametrize("kw", [dict(alpha=0.3), dict(alpha=0.55), dict(budget_tokens=900),
                                dict(budget_tokens=1700)])
def test_ties_at_the_cut_are_broken_by_id(tmp_path, ray_session, kw):
    write_tied_tables(tmp_path)
    manifest = run_select(SelectConfig(instances=str(tmp_path / "inst"), teacher=str(tmp_path / "teacher"),
                                       reference=str(tmp_path / "reference"), output=str(tmp_path / "out"), **kw))
    t, r = table_df(tmp_path / "teacher"), table_df(tmp_path / "reference").set_index("id")
    df = pd.DataFrame({"id": t.id, "score": (t.logprob / t.n_tokens).values - (r.logprob / r.n_tokens).loc[t.id].values,
                       "tokens": t.n_tokens.values}).sort_values(["score", "id"], ascending=[False, True])
    if "alpha" in kw:
        n_keep = math.floor(kw["alpha"] * len(df))
    else:
        n_keep = int(np.searchsorted(df.tokens.cumsum().values, kw["budget_tokens"], side="right"))
    assert df.score.iloc[n_keep - 1] == df.score.iloc[n_keep]  # the cut splits a tie group
    refined = table_df(tmp_path / "out")
    assert set(refined.id) == set(df.id.head(n_keep)) and manifest["instances"] == n_keep
    assert refined.score.tolist() == df.set_index("id").score.loc[refined.id].tolist()


def test_keep_count_is_exact_at_paper_scale():
    """floor(alpha * N) in floating point keeps one instance too few for 31 of the 999
    three-decimal alphas at N = 10^8 (0.282 kept 28,199,999)."""
    n = 10**8
    for a in range(1, 1000):
        alpha = float(f"0.{a:03d}")
        assert keep_count(alpha, n) == a * n // 1000, alpha
    assert keep_count(0.282, n) == 28_200_000
    assert keep_count(1.0, n) == n and keep_count(0.5, 93) == 46


def test_alpha_edges(scored, tmp_path):
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        SelectConfig(instances="i", teacher="t", reference="r", output="o", alpha=0.0)
    nothing = select(scored, tmp_path / "a0", alpha=0.001)  # floor(0.093): keeps none
    assert nothing["instances"] == 0 and nothing["parts"] == [] and nothing["threshold"] == math.inf
    full = select(scored, tmp_path / "a1", alpha=1.0)
    assert full["instances"] == io.read_json(str(scored / "inst" / io.MANIFEST))["instances"]
    assert full["fingerprint"] == io.read_json(str(scored / "inst" / io.MANIFEST))["fingerprint"]


@pytest.mark.timeout(600)
def test_a_rescored_table_is_not_silently_reused(scored, llama_dir, tmp_path, capsys):
    """The reuse key holds the tables' provenance, not only the models: a teacher table
    re-scored with another max_length makes the old refined corpus stale."""
    teacher = tmp_path / "teacher"

    def rescore(max_length, **kw):
        score(scored / "inst", llama_dir, teacher, max_length=max_length, **kw)

    def select_again(**kw):
        return run_select(SelectConfig(instances=str(scored / "inst"), teacher=str(teacher),
                                       reference=str(scored / "reference"), output=str(tmp_path / "refined"),
                                       **kw))

    shutil.copytree(scored / "teacher", teacher)  # the module's teacher table, scored at 64
    first = select_again()
    capsys.readouterr()
    assert select_again() == first and "already complete" in capsys.readouterr().out
    rescore(32, overwrite=True)
    with pytest.raises(ValueError, match=r"different settings \(teacher differ\)"):
        select_again()
    assert "already complete" not in capsys.readouterr().out
    rebuilt = select_again(overwrite=True)
    t = table_df(teacher).set_index("id")
    r = table_df(scored / "reference").set_index("id")
    score_ = (t.logprob / t.n_tokens - r.logprob.loc[t.index] / r.n_tokens.loc[t.index]).reset_index(name="s")
    expected = score_.sort_values(["s", "id"], ascending=[False, True]).id.head(len(score_) // 2)
    assert set(table_df(tmp_path / "refined").id) == set(expected)
    assert rebuilt["tokens_kept"] == t.loc[list(expected)].n_tokens.sum()


@pytest.mark.parametrize("normalize", ["byte", "auto"])
def test_tokenizer_mismatch_needs_byte_normalisation(scored, tmp_path, normalize, capsys):
    with pytest.raises(ValueError, match="different tokenizers.*--normalize byte"):
        select(scored, tmp_path, reference=str(scored / "other_tok"), normalize="token")
    # explicitly per byte, or by default (auto), which says which it used
    manifest = select(scored, tmp_path, reference=str(scored / "other_tok"), normalize=normalize)
    assert manifest["normalize"] == "byte"
    if normalize == "auto":
        assert "normalize auto -> per byte (teacher and reference use different tokenizers)" in capsys.readouterr().out
    t, r = table_df(scored / "teacher").set_index("id"), table_df(scored / "other_tok").set_index("id")
    n_bytes = table_df(scored / "inst").set_index("id").n_bytes
    score = ((t.logprob - r.logprob.loc[t.index]) / n_bytes.loc[t.index]).reset_index(name="s")
    score = score.sort_values(["s", "id"], ascending=[False, True])
    assert set(table_df(tmp_path / "refined").id) == set(score.id.head(len(score) // 2))


def corrupt_copy(src, dst, edit):
    shutil.copytree(src, dst)
    manifest = io.read_json(str(dst / io.MANIFEST))
    part = dst / manifest["parts"][0]["name"]
    table = pq.read_table(part)
    pq.write_table(edit(table), part)
    return dst


def test_refusals(scored, tmp_path, documents):
    def dup(t):
        return pa.concat_tables([t, t.slice(0, 1)])

    def nan(t):
        lp = t["logprob"].to_numpy().copy()
        lp[3] = np.nan
        return t.set_column(2, "logprob", pa.array(lp))

    def drop(t):
        return t.slice(1)

    for name, edit, message in [("dup", dup, "duplicate ids"), ("nan", nan, "non-finite logprob"),
                                ("drop", drop, "1 instance ids missing")]:
        bad = corrupt_copy(scored / "reference", tmp_path / name, edit)
        with pytest.raises(ValueError, match=message):
            select(scored, tmp_path / f"o_{name}", reference=str(bad))

    # a table scored on other instances
    write_jsonl(tmp_path / "raw" / "x.jsonl", [{"text": d} for d in documents[:5]])
    run_prepare(PrepareConfig(inputs=[str(tmp_path / "raw")], output=str(tmp_path / "inst2")))
    other = tmp_path / "other_scores"
    shutil.copytree(scored / "reference", other)
    manifest = io.read_json(str(other / io.MANIFEST))
    manifest["provenance"]["instances_fingerprint"] = io.read_json(str(tmp_path / "inst2" / io.MANIFEST))["fingerprint"]
    io.write_json(str(other / io.MANIFEST), manifest)
    with pytest.raises(ValueError, match="scored on other instances"):
        select(scored, tmp_path / "o_fp", reference=str(other))

    with pytest.raises(ValueError, match="alpha"):
        SelectConfig(instances="i", teacher="t", reference="r", output="o", alpha=1.5)
    with pytest.raises(ValueError, match="reference"):
        SelectConfig(instances="i", teacher="t", output="o")


def test_dry_run_writes_nothing(scored, tmp_path, capsys):
    report = select(scored, tmp_path, dry_run=True)
    out = capsys.readouterr().out
    assert "kept" in out and "## Highest scores" in out
    assert report["kept"] == len(expected_top(scored, 0.5))
    assert not (tmp_path / "refined").exists()
