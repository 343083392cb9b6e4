"""Importer of official FuseLLM feature datasets: round trip on a tiny SentencePiece target, bad input, the CLI, the
loader on an import, and (with the shared goldens) the official collator's targets reproduced from imported caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusion_jax.align.transfer import ROW_EMPTY, ROW_TEACHER, transfer_topk
from fusion_jax.align.vocab import exact_map
from fusion_jax.data import teacher_cache as tc
from fusion_jax.data.documents import DocumentStore
from fusion_jax.data.importer import FuseLLMImportError, import_fusellm
from fusion_jax.tokenizers import load_tokenizer
from tiny_tokenizers import train_sentencepiece

datasets = pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there; the world is big",
    "café naïve résumé — déjà vu",
    " leading space and trailing space ",
    "numbers 0123456789 and tabs\tand newlines\n\nend",
    "x",
    "an emoji 🙂 spelled in byte-fallback pieces",
]
GAP_MAX = 254 / 32  # quantized caches clip a candidate's gap below the top-1 here (teacher_cache docstring)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("importer")
    path = train_sentencepiece(root / "sp")
    return {"root": root, "path": path, "tok": load_tokenizer(path)}


def official_rows(tok, seed: int = 0) -> dict[str, list]:
    """An official-looking step-3b dataset for TEXTS: base top-10 (fp16 raw logits, descending), two aligned teachers
    with 0..10 candidates (one-hot [1.0] rows, empty rows, unsorted rows, repeated logits), sequence CEs."""
    rng = np.random.default_rng(seed)
    V = tok.vocab_size
    cols: dict[str, list] = {k: [] for k in (
        "input_ids", "attention_mask", "labels", "per_step_logits", "per_step_indices", "metric_ce",
        "per_step_aligned_logits_0", "per_step_aligned_indices_0", "metric_ce_aligned_0",
        "per_step_aligned_logits_1", "per_step_aligned_indices_1", "metric_ce_aligned_1")}
    for text in TEXTS:
        ids = [int(i) for i in tok.encode(text).ids] + [tok.eos_id]
        n = len(ids)
        cols["input_ids"].append(ids)
        cols["attention_mask"].append([1] * n)
        cols["labels"].append(ids)
        base_l, base_i = [], []
        for _ in range(n):
            lg = np.sort(rng.normal(size=10) * 2.5).astype(np.float16)[::-1]
            base_l.append([float(x) for x in lg])
            base_i.append([int(x) for x in rng.choice(V, 10, replace=False)])
        cols["per_step_logits"].append(base_l)
        cols["per_step_indices"].append(base_i)
        cols["metric_ce"].append(float(np.float16(rng.uniform(1, 4))))
        for j in (0, 1):
            al, ai = [], []
            for p in range(n):
                kind = rng.integers(0, 6)
                if kind == 0:
                    al.append([]), ai.append([])
                elif kind == 1:
                    al.append([1.0]), ai.append([ids[p]])  # the official one-hot on the current token
                else:
                    m = int(rng.integers(2, 11))
                    lg = np.sort(rng.normal(size=m) * 3).astype(np.float16)[::-1].astype(np.float64)
                    if kind == 2:
                        lg[1] = lg[0]  # a tie: stable order kept
                    if kind == 3 and j == 1:
                        lg = lg[rng.permutation(m)]  # not sorted: the importer sorts it
                    if kind == 4 and m >= 3:
                        lg[-1] = lg[0] - 12.0  # beyond the quantized gap range
                    al.append([float(x) for x in lg])
                    ai.append([int(x) for x in rng.choice(V, m, replace=False)])
            cols[f"per_step_aligned_logits_{j}"].append(al)
            cols[f"per_step_aligned_indices_{j}"].append(ai)
            cols[f"metric_ce_aligned_{j}"].append(float(rng.uniform(1, 4)))
    return cols


def save(cols: dict, path: Path, fp16_base: bool = True) -> Path:
    features = None
    if fp16_base:  # the official Arrow types (reference/fusellm.md §7.1): fp16 base logits, float64 aligned
        features = datasets.Features({
            k: (datasets.List(datasets.List(datasets.Value("float16"))) if k == "per_step_logits" else
                datasets.List(datasets.List(datasets.Value("float64"))) if k.startswith("per_step_aligned_logits") else
                datasets.List(datasets.List(datasets.Value("int64"))) if "indices" in k else
                datasets.List(datasets.Value("int64")) if k in ("input_ids", "attention_mask", "labels") else
                datasets.Value("float16") if k == "metric_ce" else datasets.Value("float64"))
            for k in cols})
    datasets.Dataset.from_dict(cols, features=features).save_to_disk(str(path))
    return path


def log_softmax(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def check_record_row(rec_ids, rec_lp, ids, logits, fmt: str) -> None:
    """A record row against the official row: same ids in stable descending order, log-probs = log_softmax over the
    stored logits within the cache's storage error, −inf pads."""
    m = len(ids)
    assert np.isneginf(rec_lp[m:]).all() and (rec_ids[m:] == 0).all()
    if m == 0:
        return
    order = np.argsort(-np.asarray(logits, np.float64), kind="stable")
    np.testing.assert_array_equal(rec_ids[:m], np.asarray(ids)[order])
    want = log_softmax(logits)[order]
    got = rec_lp[:m].astype(np.float64)
    if fmt == "float16":
        np.testing.assert_array_less(np.abs(got - want), 1e-3 + np.abs(want) * 2.0 ** -11)
    else:  # top-1 in float16, the others as gaps of 1/32 nat clipped at GAP_MAX
        assert abs(got[0] - want[0]) <= 1e-3 + abs(want[0]) * 2.0 ** -11
        clipped = want[0] - want > GAP_MAX
        np.testing.assert_allclose(got[~clipped], want[~clipped], atol=1 / 64 + 2e-3)
        np.testing.assert_allclose(got[clipped], got[0] - GAP_MAX, atol=2e-3)
        # and so the distribution the collator builds (softmax over the kept entries) is the official one
        p, q = np.exp(got) / np.exp(got).sum(), np.exp(want) / np.exp(want).sum()
        keep = ~clipped
        np.testing.assert_allclose(p[keep], q[keep], rtol=2 * (np.exp(1 / 64 + 2e-3) - 1) + np.exp(-GAP_MAX) * m)


@pytest.mark.parametrize("fmt", ["quantized", "float16"])
def test_round_trip(tiny, tmp_path, fmt):
    tok = tiny["tok"]
    cols = official_rows(tok)
    ds = save(cols, tmp_path / "ds")
    report = import_fusellm(ds, tiny["path"], tmp_path / "out", docs_per_shard=4, logprob_format=fmt)
    out = tmp_path / "out"
    assert json.loads((out / "import.json").read_text()) == report
    assert sorted(report["teachers"]) == ["aligned_0", "aligned_1", "base"]
    store = DocumentStore(out / "documents", "train")
    assert [d.text for d in store] == TEXTS and len(DocumentStore(out / "documents", "validation")) == 0
    assert report["loader_alignment"]["rows"] == 0 and report["utf8_trimmed_rows"] == 0
    for name, lcol, icol, mcol in [("base", "per_step_logits", "per_step_indices", "metric_ce"),
                                   *[(f"aligned_{j}", f"per_step_aligned_logits_{j}", f"per_step_aligned_indices_{j}",
                                      f"metric_ce_aligned_{j}") for j in (0, 1)]]:
        k = max(max(len(r) for r in row) for row in cols[lcol])
        cache = tc.TeacherCache(out / f"teacher_{name}", expect={
            "tokenizer": tok.fingerprint, "k": k, "append_eos": True, "logprob_format": fmt,
            "documents": {"fingerprint": store.fingerprint, "split": "train", "num_docs": len(TEXTS)}})
        assert cache.manifest["model"]["imported_from"] == str(ds) and cache.manifest["model"]["column"] == lcol
        stats = report["teachers"][name]
        assert stats["k"] == k
        assert stats["empty_rows"] == sum(len(r) == 0 for row in cols[lcol] for r in row)
        assert stats["onehot_rows"] == sum(len(r) == 1 for row in cols[lcol] for r in row)
        unsorted = sum(any(a < b for a, b in zip(r, r[1:])) for row in cols[lcol] for r in row)
        assert stats["resorted_rows"] == unsorted and (unsorted > 0) == (name == "aligned_1")
        for i, text in enumerate(TEXTS):
            rec = cache[i]
            enc = tok.encode(store[i].text)  # the text re-encodes to the same ids
            np.testing.assert_array_equal(rec.ids, cols["input_ids"][i])
            np.testing.assert_array_equal(rec.ids[:-1], enc.ids)
            np.testing.assert_array_equal(rec.byte_end, np.append(enc.byte_end, len(text.encode())))
            assert rec.num_bytes == len(text.encode()) and rec.doc_id == store[i].id
            assert np.isnan(rec.token_ce).all() and rec.doc_ce == np.float32(cols[mcol][i])
            for p in range(len(rec.ids)):
                check_record_row(rec.topk_ids[p], rec.topk_logprobs[p], cols[icol][i][p], cols[lcol][i][p], fmt)


def test_loader_aligns_an_import_one_to_one(tiny, tmp_path):
    from fusion_jax.data.loader import FusionLoader, LoaderConfig, TeacherConfig

    tok = tiny["tok"]
    import_fusellm(save(official_rows(tok, seed=1), tmp_path / "ds"), tok, tmp_path / "out")
    out = tmp_path / "out"
    teachers = tuple(TeacherConfig(cache=str(out / f"teacher_{n}"), tokenizer=str(tiny["path"]), name=n,
                                 vocab_map="exact", fallback="mask") for n in ("base", "aligned_0", "aligned_1"))
    cfg = LoaderConfig(teachers=teachers, seq_len=32, global_batch_size=2, k=10, cache_dir=str(tmp_path / "fj"))
    loader = FusionLoader(cfg, out / "documents", tiny["path"], progress=False)
    canon = exact_map(tok, tok)
    for d in range(len(TEXTS)):
        doc = loader.builder.document(d)
        for j, n in enumerate(("base", "aligned_0", "aligned_1")):
            rec = tc.TeacherCache(out / f"teacher_{n}")[d]
            np.testing.assert_array_equal(doc.ids, rec.ids)
            rows = doc.teachers[j].rows
            # 1:1: every position gets its own row through the exact map; an empty row stays empty (mask)
            want = transfer_topk(rec.byte_end, rec.byte_end, rec.ids, rec.topk_ids, rec.topk_logprobs, canon,
                                 fallback="mask", k_out=10)
            np.testing.assert_array_equal(rows.ids, want.ids)
            np.testing.assert_array_equal(rows.logprobs, want.logprobs)
            has = np.isfinite(rec.topk_logprobs[:, 0])
            mapped = (canon[rec.topk_ids] >= 0) & np.isfinite(rec.topk_logprobs)
            np.testing.assert_array_equal(rows.kind, np.where(mapped.any(axis=1), ROW_TEACHER, ROW_EMPTY))
            assert (rows.kind[~has] == ROW_EMPTY).all()


def test_bad_input(tiny, tmp_path):
    tok = tiny["tok"]
    V = tok.vocab_size

    def attempt(edit, match, **kw):
        cols = official_rows(tok)
        edit(cols)
        path = tmp_path / f"ds{attempt.n}"
        attempt.n += 1
        save(cols, path, fp16_base=False)
        with pytest.raises(FuseLLMImportError, match=match):
            import_fusellm(path, tok, tmp_path / "never", **kw)
        assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()
    attempt.n = 0

    attempt(lambda c: (c.pop("per_step_aligned_indices_1"), c.pop("metric_ce")),
            r"missing columns metric_ce, per_step_aligned_indices_1; the dataset has attention_mask, input_ids, "
            r"labels, metric_ce_aligned_0")
    attempt(lambda c: c["per_step_logits"][2].pop(), r"row 2: per_step_logits has \d+ positions but input_ids has")
    attempt(lambda c: c["per_step_aligned_indices_0"][3].append([1]), r"row 3: per_step_aligned_indices_0 has")
    attempt(lambda c: c["per_step_aligned_logits_1"][1][4].append(0.5) or c["per_step_aligned_indices_1"][1][4].clear(),
            r"row 1 position 4: per_step_aligned_logits_1 has \d+ entries but per_step_aligned_indices_1 has 0")
    attempt(lambda c: c["per_step_indices"][4][2].__setitem__(3, V + 7),
            rf"row 4 position 2: per_step_indices holds id {V + 7}, outside the target vocabulary of {V} ids")
    attempt(lambda c: c["input_ids"][5].__setitem__(0, V), rf"row 5 position 0: input_ids holds id {V}, outside")
    attempt(lambda c: c["per_step_logits"][1][3].__setitem__(0, float("nan")),
            r"row 1 position 3: per_step_logits holds nan")
    with pytest.raises(FuseLLMImportError, match="store_split"):
        import_fusellm(tmp_path / "ds0", tok, tmp_path / "never", split="test")


def test_split_of_a_dataset_dict_and_overwrite(tiny, tmp_path):
    tok = tiny["tok"]
    cols = official_rows(tok)
    half = {k: v[:3] for k, v in cols.items()}
    rest = {k: v[3:] for k, v in cols.items()}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(half),
                               "validation": datasets.Dataset.from_dict(rest)})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(FuseLLMImportError, match=r"no split 'test'; the dataset has splits train, validation"):
        import_fusellm(tmp_path / "dd", tok, tmp_path / "out", split="test", store_split="train")
    report = import_fusellm(tmp_path / "dd", tok, tmp_path / "out", split="validation")
    store = DocumentStore(tmp_path / "out" / "documents", "validation")
    assert [d.text for d in store] == TEXTS[3:] and report["rows"] == len(TEXTS) - 3
    with pytest.raises(FuseLLMImportError, match="already exists"):
        import_fusellm(tmp_path / "dd", tok, tmp_path / "out")
    import_fusellm(tmp_path / "dd", tok, tmp_path / "out", overwrite=True)
    assert [d.text for d in DocumentStore(tmp_path / "out" / "documents", "train")] == TEXTS[:3]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(FuseLLMImportError, match="not an import output"):
        import_fusellm(tmp_path / "dd", tok, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_packed_blocks(tiny, tmp_path):
    """Step-4 rows: several documents per row, cut inside a word and inside a multi-byte character."""
    tok = tiny["tok"]
    cols = official_rows(tok)
    flat = {k: sum((cols[k][i] for i in range(len(TEXTS))), []) for k in cols if k.startswith(("input", "per_step"))}
    cut = next(i for i in range(len(flat["input_ids"])) if len(tok.token_bytes[flat["input_ids"][i]]) == 1
               and tok.token_bytes[flat["input_ids"][i]][0] >= 0x80 and i > 0
               and tok.token_bytes[flat["input_ids"][i - 1]][0] >= 0xC0)  # between the bytes of one character
    blocks = {k: [v[:cut], v[cut:]] for k, v in flat.items()}
    blocks.update(metric_ce=[2.0, 3.0], metric_ce_aligned_0=[2.5, 2.5], metric_ce_aligned_1=[1.0, 1.5])
    report = import_fusellm(save(blocks, tmp_path / "ds", fp16_base=False), tok, tmp_path / "out")
    assert report["utf8_trimmed_rows"] == 2
    store = DocumentStore(tmp_path / "out" / "documents")
    texts = [d.text.encode() for d in store]
    every = b"".join(tok.token_bytes[i] for i in flat["input_ids"])
    assert every[:1] == b" " and texts[0] + "🙂".encode() + texts[1] == every[1:]  # the cut character is left out
    cache = tc.TeacherCache(tmp_path / "out" / "teacher_base")
    for i in range(2):
        rec = cache[i]
        np.testing.assert_array_equal(rec.ids, blocks["input_ids"][i])
        assert rec.byte_end[-1] == len(texts[i]) and (np.diff(rec.byte_end) >= 0).all()
    # the EOS of each inner document has no text: its row has no loader position (EOS is appended only at the end)
    assert report["loader_alignment"]["record_rows_unused"] >= len(TEXTS) - 1


def test_cli(tiny, tmp_path):
    ds = save(official_rows(tiny["tok"]), tmp_path / "ds")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "fusion_jax.import_fusellm", str(ds), str(tmp_path / "out"),
                          "--tokenizer", str(tiny["path"]), "--logprob-format", "float16"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"imported {len(TEXTS)} rows" in run.stderr
    assert (tmp_path / "out" / "teacher_aligned_1" / tc.MANIFEST).is_file()
    bad = subprocess.run([sys.executable, "-m", "fusion_jax.import_fusellm", str(tmp_path / "out"),
                          str(tmp_path / "out2"), "--tokenizer", str(tiny["path"])],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_wrong_tokenizer_is_named_as_the_likely_cause(tiny, tmp_path):
    """Ids read with another vocabulary seldom spell UTF-8: the error says the tokenizer is the likely cause."""
    from tiny_tokenizers import train_byte_level

    other = load_tokenizer(train_byte_level(tmp_path / "other.json", vocab_size=400))
    assert other.vocab_size >= tiny["tok"].vocab_size  # every id is in range: only the bytes are wrong
    ds = save(official_rows(tiny["tok"]), tmp_path / "ds")
    with pytest.raises(FuseLLMImportError, match=r"^row 0: the tokens' bytes are not valid UTF-8 .*\. The likely cause "
                                                 r"is the tokenizer: other is not the one the dataset was built with"):
        import_fusellm(ds, other, tmp_path / "out")


def test_a_damaged_dataset_names_the_directory(tiny, tmp_path):
    ds = save(official_rows(tiny["tok"]), tmp_path / "ds")
    state = ds / "state.json"
    state.write_text(state.read_text()[:20])
    with pytest.raises(FuseLLMImportError, match=rf"^{ds}: damaged dataset, datasets.load_from_disk failed \(.*\); "
                                                 "save it again"):
        import_fusellm(ds, tiny["tok"], tmp_path / "out")


# ------------------------------------------------------------------------------------------ the official goldens


def bf16(x) -> np.ndarray:
    """float32 → bfloat16 (round to nearest even), as float32."""
    b = np.asarray(x, np.float32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> 16) & 1)) & np.uint32(0xFFFF0000)).view(np.float32)


def test_official_collator_targets_from_imported_caches(shared_dir, tmp_path):
    """Each fusion case's 3 packed blocks (features_in, exactly as fed to the official collator) → import with the
    real Llama-2 tokenizer → ``transfer_topk`` with the identity map (1:1) gives the collator's base_target_dist and
    aligned_target_dist_0 on every non-padding position: ids exactly, probabilities within the collator's own bf16
    rounding (it rounds the logits to bf16 before its softmax, which moves a probability by up to ~5 %; the bound
    below is that rounding, per row, plus the bf16 output and our float16 storage)."""
    golden = shared_dir / "golden" / "fusellm"
    tok = load_tokenizer(shared_dir / "assets" / "tokenizers" / "llama2-tokenizer.model")
    V = tok.vocab_size
    identity = np.arange(V, dtype=np.int32)
    canon = exact_map(tok, tok)
    cases = [json.loads(line) for line in (golden / "fusion_cases.jsonl").read_text().splitlines()]
    checked = {"rows": 0, "empty": 0, "canon_differs": 0}
    worst_rel = 0.0
    for c in cases:
        feats = c["features_in"]
        cols = {k: [f[k] for f in feats] for k in feats[0]}
        ds = tmp_path / c["case"]
        datasets.Dataset.from_dict(cols).save_to_disk(str(ds))
        report = import_fusellm(ds, tok, tmp_path / f"{c['case']}-out", logprob_format="float16")
        for name, key, lcol, mcol in (("base", "base_target_dist", "per_step_logits", "metric_ce"),
                                      ("aligned_0", "aligned_target_dist_0", "per_step_aligned_logits_0",
                                       "metric_ce_aligned_0")):
            cache = tc.TeacherCache(tmp_path / f"{c['case']}-out" / f"teacher_{name}",
                                    expect={"tokenizer": tok.fingerprint, "append_eos": True})
            assert report["teachers"][name]["k"] == max(len(r) for f in feats for r in f[lcol])
            for b, f in enumerate(feats):
                rec = cache[b]
                np.testing.assert_array_equal(rec.ids, f["input_ids"])
                assert rec.doc_ce == np.float32(f[mcol]) and rec.doc_ce == np.float32(c["collated"][mcol][b])
                rows = transfer_topk(rec.byte_end, rec.byte_end, rec.ids, rec.topk_ids, rec.topk_logprobs, identity,
                                     fallback="mask")
                canon_rows = transfer_topk(rec.byte_end, rec.byte_end, rec.ids, rec.topk_ids, rec.topk_logprobs,
                                           canon, fallback="mask")
                for t in range(len(f["input_ids"])):
                    official = c["collated"][key][b][t]
                    if not f[lcol][t]:  # an empty hard row: the collator substituted the base row; ours stays empty
                        assert name == "aligned_0" and official == c["collated"]["base_target_dist"][b][t]
                        assert rows.kind[t] == ROW_EMPTY and np.isneginf(rec.topk_logprobs[t]).all()
                        checked["empty"] += 1
                        continue
                    assert rows.kind[t] == ROW_TEACHER
                    live = np.isfinite(rows.logprobs[t])
                    order = np.argsort(rows.ids[t][live])
                    ids, lp = rows.ids[t][live][order], rows.logprobs[t][live][order].astype(np.float64)
                    assert ids.tolist() == official["ids"]
                    off = np.asarray(official["probs"], np.float64)
                    # the official values are exactly bf16(softmax(bf16(logits))) (collator, reference §5.1)
                    x = bf16(np.asarray(f[lcol][t], np.float32))
                    e = np.exp(x - x.max())
                    assert np.array_equal(bf16(e / e.sum())[np.argsort(f[lcol.replace("logits", "indices")][t])],
                                          off.astype(np.float32))
                    bound = (2 * np.abs(x - np.asarray(f[lcol][t])).max() + np.log1p(2.0 ** -8)
                             + 2 * np.abs(lp).max() * 2.0 ** -11 + 1e-6)
                    np.testing.assert_array_less(np.abs(lp - np.log(off)), bound)
                    worst_rel = max(worst_rel, float(np.max(np.abs(np.exp(lp) / off - 1))))
                    checked["rows"] += 1
                    # the loader's exact map (identity on regular ids and EOS): the same row unless the row holds a
                    # special id (dropped, renormalized) or a byte-fallback twin (moved to the regular id)
                    src_ids = rec.topk_ids[t][np.isfinite(rec.topk_logprobs[t])]
                    if (canon[src_ids] == src_ids).all():
                        np.testing.assert_array_equal(canon_rows.ids[t], rows.ids[t])
                        np.testing.assert_allclose(canon_rows.logprobs[t], rows.logprobs[t], atol=1e-6)
                    else:
                        checked["canon_differs"] += 1
                        p = np.exp(rows.logprobs[t][live].astype(np.float64))
                        mass: dict[int, float] = {}
                        for i, q in zip(canon[rows.ids[t][live]], p):
                            if i >= 0:
                                mass[int(i)] = mass.get(int(i), 0.0) + q
                        got = {int(i): float(np.exp(v)) for i, v in zip(canon_rows.ids[t], canon_rows.logprobs[t])
                               if np.isfinite(v)}
                        assert got.keys() == mass.keys()
                        total = sum(mass.values())
                        for i in got:
                            assert got[i] == pytest.approx(mass[i] / total, rel=1e-5)
    assert checked["rows"] > 800 and checked["empty"] == 3 and checked["canon_differs"] > 0, checked
    assert worst_rel < 0.06, worst_rel
