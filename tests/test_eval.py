"""`fitprune-fx eval` (lmms-eval) on the shipped shapes-llava with the local `fitprune_shapes` task.

Needs the [eval] extra; `.ci/run`'s eval leg installs it, the main leg skips this module. The
scores lmms-eval reports are checked against scores computed here without lmms-eval: the unpruned
model's greedy answers, and the pruned semantics through pruning as masking.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lmms_eval")

from fitprune_fx import ModelInfo, Recipe  # noqa: E402
from fitprune_fx.cli import main as cli_main  # noqa: E402
from fitprune_fx.masking_reference import MaskingReference  # noqa: E402
from fitprune_fx.testbed import synthetic  # noqa: E402
from fitprune_fx.testbed.shapes_model import load_shapes_llava  # noqa: E402

PRUNE = {0: 30, 1: 56, 2: 15}  # the 50 % FitPrune recipe of docs/accuracy.md
N = 24


def own_scores(prune: dict[int, int] | None, scorer: str = "fitprune") -> float:
    """Exact-match accuracy on the task's questions, computed directly (greedy, first word)."""
    model, processor = load_shapes_llava()
    processor.tokenizer.padding_side = "left"
    examples = synthetic.make_dataset(N, seed=0, split="test")
    texts = [synthetic.prompt(ex.question) for ex in examples]
    inputs = processor(images=[ex.image for ex in examples], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        if prune:
            with MaskingReference(model, prune, scorer=scorer):
                out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        else:
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    answers = processor.tokenizer.batch_decode(
        out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    answers = [a.split("\n")[0].strip().lower() for a in answers]
    return sum(a == ex.answer for a, ex in zip(answers, examples, strict=True)) / N


def test_eval_prints_lmms_eval_scores_unpruned_and_pruned(tmp_path, capsys):
    model, _ = load_shapes_llava()
    recipe = tmp_path / "r.json"
    Recipe(model=ModelInfo.from_config(model.config, name="shapes-llava"), prune=PRUNE).to_json(recipe)
    args = ["eval", "--recipe", str(recipe), "--tasks", "fitprune_shapes", "--limit", str(N)]
    assert cli_main([*args, "--compiler", "eager", "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| fitprune_shapes | exact_match |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    unpruned, pruned, reduction = float(cells[2]), float(cells[3]), cells[4]
    assert unpruned == pytest.approx(own_scores(None), abs=1e-4) and unpruned >= 0.9  # the model answers
    assert pruned == pytest.approx(own_scores(PRUNE), abs=1e-4)  # the table prints 4 decimals
    assert (
        reduction
        == f"{Recipe(model=ModelInfo.from_config(model.config), prune=PRUNE).reference_reduction():.1%}"
    )
    assert re.search(r"\| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d+x \|$", row)  # prefill ms both runs, speed-up


def test_loglikelihood_is_the_continuations_nll_under_the_pruned_semantics():
    """lmms-eval's loglikelihood requests: the NLL of the answer word after the prompt, pruned model
    vs the same sum computed through pruning as masking (1e-4), and the greedy flag."""
    import fitprune_fx
    from fitprune_fx.lmms_model import FitpruneLmms

    model, processor = load_shapes_llava()
    oracle, _ = load_shapes_llava()
    examples = synthetic.make_dataset(3, seed=1, split="test")
    fitprune_fx.compile(
        model, Recipe(model=ModelInfo.from_config(model.config), prune=PRUNE), compiler="eager"
    )
    wrapper = FitpruneLmms(model, processor)
    wrapper.task_dict = {"t": {"test": [{"image": ex.image} for ex in examples]}}
    requests = [
        SimpleNamespace(args=(ex.question, ex.answer, lambda doc: [doc["image"]], i, "t", "test"))
        for i, ex in enumerate(examples)
    ]
    got = wrapper.loglikelihood(requests)
    for (nll, greedy), ex in zip(got, examples, strict=True):
        prompt = synthetic.prompt(ex.question)
        inputs = processor(images=[ex.image], text=[prompt + " " + ex.answer], return_tensors="pt")
        answer = processor.tokenizer.convert_tokens_to_ids(ex.answer)
        with torch.no_grad(), MaskingReference(oracle, PRUNE):
            logits = oracle(**inputs).logits[0, -2].float()
        assert nll == pytest.approx(float(-logits.log_softmax(-1)[answer]), abs=1e-4)
        assert greedy == bool(logits.argmax() == answer)


def test_prefill_times_count_prompts_not_decode_steps_and_extra_images_are_refused():
    """Requests with two option sets go in two batches; each generate call records one prefill time
    (decode steps, which continue the cache, are not prefills). A document with two images would not
    fit the one-placeholder prompt: refused by name, not answered from the first image."""
    from fitprune_fx.lmms_model import FitpruneLmms

    model, processor = load_shapes_llava()
    examples = synthetic.make_dataset(5, seed=2, split="test")
    wrapper = FitpruneLmms(model, processor, batch_size=4)
    wrapper.task_dict = {"t": {"test": [{"image": ex.image} for ex in examples]}}
    one, three = {"max_new_tokens": 1}, {"max_new_tokens": 3}
    requests = [
        SimpleNamespace(
            args=(ex.question, one if i < 2 else three, lambda doc: [doc["image"]], i, "t", "test")
        )
        for i, ex in enumerate(examples)
    ]
    answers = wrapper.generate_until(requests)
    assert len(answers) == 5 and all(answers[:2])
    assert len(wrapper.prefill_seconds) == 2  # two batches (options differ after request 1), 2 decode steps
    wrapper.detach()
    twice = [SimpleNamespace(args=("q", one, lambda doc: [doc["image"], doc["image"]], 0, "t", "test"))]
    other = FitpruneLmms(model, processor)
    other.task_dict = wrapper.task_dict
    with pytest.raises(ValueError, match=r"documents with \[2\] images"):
        other.generate_until(twice)
    other.detach()


def test_eval_exits_1_without_a_traceback_when_the_pass_does_not_prune(tmp_path, monkeypatch, capsys):
    """A decoder the pass refuses (a hub-style RMSNorm kernel that bakes the row count): no score table
    that looks pruned; the reason, exit status 1."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from kernel_wrappers import use_row_count_kernel

    use_row_count_kernel(monkeypatch, LlamaRMSNorm)
    model, _ = load_shapes_llava()
    recipe = tmp_path / "r.json"
    Recipe(model=ModelInfo.from_config(model.config, name="shapes-llava"), prune=PRUNE).to_json(recipe)
    args = ["eval", "--recipe", str(recipe), "--tasks", "fitprune_shapes", "--limit", "4"]
    assert cli_main([*args, "--compiler", "eager", "--device", "cpu", "--dtype", "float32"]) == 1
    captured = capsys.readouterr()
    assert (
        "fitprune-fx eval: not pruned: not understood:" in captured.err
        and "use_kernels=False" in captured.err
    )
    assert "| fitprune_shapes |" not in captured.out and "Traceback" not in captured.err


SIZES_FRACTIONS = {1: 0.5, 2: 0.3}


def _own_answers(model, processor, examples, prune_for=None) -> list[str]:
    """Each document alone (batch 1, no lmms-eval): the greedy first word, unpruned or, with
    `prune_for(visual count) -> plan`, through pruning as masking."""
    from fitprune_fx.calibration import build_prompt
    from fitprune_fx.testbed.lmms_task import IMAGE_SIZES

    image_token = model.config.image_token_id
    answers = []
    for i, ex in enumerate(examples):
        height, width = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        image = ex.image.resize((width, height))
        inputs = processor(text=[build_prompt(processor, ex.question)], images=[image], return_tensors="pt")
        with torch.no_grad():
            if prune_for is None:
                out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
            else:
                with MaskingReference(model, prune_for(int((inputs["input_ids"] == image_token).sum()))):
                    out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        answers.append(processor.tokenizer.decode(out[0, -1:], skip_special_tokens=True).strip())
    return answers


def test_eval_at_batch_4_on_images_of_six_sizes_scores_as_at_batch_1(tmp_path, monkeypatch, capsys):
    """`fitprune-fx eval --batch-size 4` on a tiny Qwen2.5-VL over the sizes task: every batch mixes
    visual counts (6 image sizes in turn). The task's answers are the model's own batch-1 answers,
    so the unpruned run must score 1 at both batch sizes; the pruned run must score at batch 4 what
    it scores at batch 1, and what pruning as masking on each document alone scores (below 1: the
    recipe changes answers). Every pruned-run batch is pruned."""
    from fitprune_fx import cli
    from fitprune_fx.testbed.lmms_task import SIZES_TASK, write_shapes_task
    from fitprune_fx.testbed.tiny_qwen import tiny_qwen_answering

    model, processor = tiny_qwen_answering()
    examples = synthetic.make_dataset(N, seed=0, split="test")
    answers = _own_answers(model, processor, examples)
    assert len(set(answers)) > 2  # the answers depend on the image
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), SIZES_FRACTIONS)
    masked = _own_answers(model, processor, examples, recipe.deletions_for)
    expected = sum(a == b for a, b in zip(answers, masked, strict=True)) / N
    assert expected < 1
    recipe.to_json(tmp_path / "r.json")
    include = write_shapes_task(tmp_path / "task", n=N, task=SIZES_TASK, answers=answers)
    monkeypatch.setattr(cli, "_load_model", lambda *args: (model, processor))  # built in code, not loaded

    scores = {}
    for batch_size in (1, 4):
        args = ["eval", "--recipe", str(tmp_path / "r.json"), "--tasks", SIZES_TASK, "--limit", str(N)]
        args += ["--include-path", str(include), "--batch-size", str(batch_size), "--compiler", "eager"]
        assert cli_main([*args, "--device", "cpu", "--dtype", "float32"]) == 0
        row = next(
            line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {SIZES_TASK} |")
        )
        cells = [c.strip() for c in row.strip("|").split("|")]
        scores[batch_size] = float(cells[2]), float(cells[3])
        backend = model.fitprune_backend
        assert backend.pruned_runs == N // batch_size, backend.summary()  # one prefill per batch, each pruned
    assert scores[1] == scores[4] == (1.0, pytest.approx(expected, abs=1e-4)), scores


def test_eval_runs_the_scorer_of_the_experimenting_page(tmp_path, capsys):
    """docs/experimenting.md's ten-line scorer, saved as a file and loaded with --scorers, scores on
    the task what FastV's score does under pruning as masking (it is FastV's score)."""
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "experimenting.md"
    code = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)[0]
    (tmp_path / "my_scorer.py").write_text(code)
    model, _ = load_shapes_llava()
    recipe = tmp_path / "r.json"
    info = ModelInfo.from_config(model.config, name="shapes-llava")
    Recipe(model=info, prune={1: 72}, scorer="last_prompt_token").to_json(recipe)
    args = ["eval", "--recipe", str(recipe), "--scorers", str(tmp_path / "my_scorer.py")]
    args += ["--tasks", "fitprune_shapes", "--limit", str(N), "--compiler", "eager", "--device", "cpu"]
    assert cli_main([*args, "--dtype", "float32"]) == 0
    row = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| fitprune_shapes |")
    )
    pruned = float([c.strip() for c in row.strip("|").split("|")][3])
    assert pruned == pytest.approx(own_scores({1: 72}, scorer="fastv"), abs=1e-4)
    assert cli_main([*args[:3], "--scorers", str(tmp_path / "missing.py"), *args[5:]]) == 2
    assert "--scorers" in capsys.readouterr().err
