"""lm-evaluation-harness on our JAX model (offline, local tasks): the same log-likelihoods, greedy flags,
generations and accuracies as lm-eval's own `hf` model on the exported Hugging Face checkpoint."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import TasksConfig
from fusion_jax.convert import checkpoint
from fusion_jax.evaluate import harness
from fusion_jax.evaluate.model import load_model
from fusion_jax.experiments.demo.tokenizers import train_byte_level_bpe
from fusion_jax.models import init_params

lm_eval = pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat while dogs ran past old red barns near quiet green hills every day".split()
MAX_LENGTH = 48


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.RandomState(seed)
    return [" ".join(rng.choice(WORDS, rng.randint(4, 40))) + "." for _ in range(n)]


def _write_tasks(root: Path) -> Path:
    """Three local tasks over local JSONL files: multiple choice, rolling log-likelihood, generate_until."""
    rng = np.random.RandomState(0)
    tasks = root / "tasks"
    tasks.mkdir()
    mc = []
    for i in range(12):
        choices = [" ".join(rng.choice(WORDS, rng.randint(1, 4))) for _ in range(4)]
        mc.append({"question": " ".join(rng.choice(WORDS, rng.randint(2, 9))), "choices": choices,
                   "answer": int(rng.randint(4))})
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (tasks / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(6, 1) + [
        " ".join(WORDS * 4)]))  # one text longer than MAX_LENGTH tokens: several rolling windows
    (tasks / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tasks / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    (tasks / "tiny_rolling.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_rolling
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tasks / 'text.jsonl'}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
          - metric: bits_per_byte
        """))
    (tasks / "tiny_gen.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tasks / 'mc.jsonl'}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{choices[0]}}}}"
        generation_kwargs:
          until: ["."]
          max_gen_toks: 6
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tok_dir = train_byte_level_bpe(_texts(200, 0), root / "tok", vocab_size=300)
    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      param_dtype="float32", compute_dtype="float32")
    params = init_params(cfg, jax.random.key(0), std=0.2)
    ckpt = checkpoint.save(root / "ckpt", cfg, params, model_type="llama", hf_config={}, tokenizer_dir=tok_dir)
    export = checkpoint.save_hf(root / "export", cfg, params, model_type="llama", hf_config={}, tokenizer_dir=tok_dir)
    mesh_cfg = mesh_lib.MeshConfig()
    model = load_model(str(ckpt), "", mesh_lib.make_mesh(mesh_cfg), mesh_cfg.rules, param_dtype="float32",
                       compute_dtype="float32")
    return {"root": root, "ckpt": ckpt, "export": export, "model": model, "tasks": _write_tasks(root)}


def _evaluate(lm, tasks_dir, names):
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    return evaluator.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks_dir)),
                                     log_samples=True, bootstrap_iters=0)


def _hf_lm(setup):
    pytest.importorskip("torch")
    from lm_eval.models.huggingface import HFLM

    eos = setup["model"].tokenizer.eos_id
    return HFLM(pretrained=str(setup["export"]), backend="causal", batch_size=4, max_length=MAX_LENGTH,
                add_bos_token=False, prefix_token_id=eos, device="cpu", dtype="float32")


def _responses(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_loglikelihoods_and_accuracies_equal_lm_evals_hf_model(setup):
    names = ["tiny_mc", "tiny_rolling", "tiny_gen"]
    ours = _evaluate(harness.FusionJaxLM(setup["model"], batch_size=8, max_length=MAX_LENGTH, max_gen_toks=16),
                     setup["tasks"], names)
    ref = _evaluate(_hf_lm(setup), setup["tasks"], names)
    for task in ("tiny_mc", "tiny_rolling"):
        a, b = _responses(ours, task), _responses(ref, task)
        assert len(a) == len(b) and len(a) > 0
        for x, y in zip(a, b):
            lls_x = np.asarray([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in x], float)
            lls_y = np.asarray([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in y], float)
            np.testing.assert_allclose(lls_x, lls_y, atol=1e-4, rtol=0)
            if task == "tiny_mc":
                assert [r[0][1] for r in x] == [r[0][1] for r in y]  # the greedy flags
    assert ours["results"]["tiny_mc"]["acc,none"] == ref["results"]["tiny_mc"]["acc,none"]
    assert ours["results"]["tiny_mc"]["acc_norm,none"] == ref["results"]["tiny_mc"]["acc_norm,none"]
    np.testing.assert_allclose(ours["results"]["tiny_rolling"]["bits_per_byte,none"],
                               ref["results"]["tiny_rolling"]["bits_per_byte,none"], rtol=1e-5)
    assert _responses(ours, "tiny_gen") == _responses(ref, "tiny_gen")  # greedy generations, cut at "."


def test_rolling_equals_a_naive_sum_over_windows(setup):
    """loglikelihood_rolling of a long text = the sum of per-token log-probs from full forwards over lm-eval's
    disjoint windows (a naive reference: one unpacked forward per window)."""
    from lm_eval import utils
    from lm_eval.api.instance import Instance

    from fusion_jax.models import apply

    model = setup["model"]
    lm = harness.FusionJaxLM(model, batch_size=8, max_length=16, max_gen_toks=4)
    text = " ".join(WORDS * 2)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    ids = lm.tok_encode(text)
    total = 0.0
    for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
            ids, lm.prefix_token_id, 16, 1)):
        seq = np.asarray(context + continuation)[None]
        logp = np.asarray(jax.nn.log_softmax(apply(model.cfg, model.params, seq)))[0]
        n = len(continuation)
        total += sum(logp[len(seq[0]) - 1 - n + k, continuation[k]] for k in range(n))
    assert len(ids) > 16
    np.testing.assert_allclose(got, total, rtol=1e-5)


def test_run_tasks_and_the_evaluate_command(setup, tmp_path):
    tasks = TasksConfig(names=("tiny_mc",), include=(str(setup["tasks"]),), max_length=MAX_LENGTH, max_gen_toks=8)
    direct = harness.run_tasks(setup["model"], tasks)
    assert 0.0 <= direct["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert "tiny_mc" in harness.format_tasks_table(direct)
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "fusion_jax.evaluate", "--set", f"checkpoint={setup['ckpt']}",
                        "--set", "tasks.names=[tiny_mc]", "--set", f"tasks.include=[{setup['tasks']}]",
                        "--set", f"tasks.max_length={MAX_LENGTH}", "--set", "tasks.max_gen_toks=8",
                        "--set", "compute_dtype=float32", "--set", "param_dtype=float32", "--set", f"output={out}"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiny_mc" in r.stdout and "acc" in r.stdout
    report = json.loads(out.read_text())
    assert report["tasks"]["results"]["tiny_mc"]["acc,none"] == direct["results"]["tiny_mc"]["acc,none"]
    assert "bits_per_byte" not in report  # no documents given: tasks only


def test_unknown_task_and_missing_directory_are_clear_errors(setup, tmp_path):
    with pytest.raises(Exception, match="unknown lm-eval tasks \\['no_such_task'\\]"):
        harness.run_tasks(setup["model"], TasksConfig(names=("no_such_task",), include=(str(setup["tasks"]),)))
    with pytest.raises(Exception, match="do not exist"):
        harness.run_tasks(setup["model"], TasksConfig(names=("tiny_mc",), include=(str(tmp_path / "nope"),)))
