"""CLI and calibration-input tests on a tiny LLaVA folder built here (no downloads)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

from fitprune_fx.calibration import (
    FALLBACK_TEMPLATE,
    CalibrationError,
    as_batches,
    build_prompt,
    load_question_file,
    read_question_file,
)
from fitprune_fx.cli import main
from fitprune_fx.recipe import Recipe
from fitprune_fx.testbed.tiny import tiny_llava

torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer whose ids fit tiny_llava's vocabulary (128)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<image>"]  # ids 0..3 as in fitprune_fx.testbed.tiny
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + ["<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    fast.padding_side = "left"
    return fast


def make_processor(chat_template: str | None = None):
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=char_tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy: 16 tokens
        chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A model folder (tiny LLaVA + processor), an image folder and a question file."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-llava"
    tiny_llava(num_layers=4, image_size=32).save_pretrained(model_dir)
    make_processor().save_pretrained(model_dir)
    images = root / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    questions = []
    for i in range(6):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(images / f"img{i}.png")
        text = ["What colour is it?", "How many shapes?", "<image>\nIs it round?"][i % 3]
        questions.append({"question_id": i, "image": f"img{i}.png", "text": text})
    data = root / "questions.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in questions) + "\n")
    return root, model_dir, images, data


# ---------------------------------------------------------------------------- calibration
def test_fallback_prompt_without_chat_template():
    proc = make_processor()
    assert build_prompt(proc, "<image>\nWhat is it?") == FALLBACK_TEMPLATE.format(
        image="<image>", text="What is it?"
    )


def test_chat_template_is_used_when_present():
    proc = make_processor(CHAT_TEMPLATE)
    prompt = build_prompt(proc, "What is it?")
    assert prompt == "USER: <image>\nWhat is it? ASSISTANT:"


def test_question_file_to_processor_outputs(workspace):
    _, model_dir, images, data = workspace
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    with pytest.warns(UserWarning, match="no chat template"):
        items = load_question_file(data, images, proc, limit=4)
    assert len(items) == 4
    for item in items:
        ids = item["input_ids"]
        assert ids.shape[0] == 1 and int((ids == 3).sum()) == 16  # one image, 16 tokens
        assert item["pixel_values"].shape == (1, 3, 32, 32)
    batches = list(as_batches(items))
    assert batches[0]["attention_mask"].shape == batches[0]["input_ids"].shape


def test_bad_question_file_messages(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "image": "a.png"}\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:1.*missing"):
        read_question_file(bad)
    bad.write_text("not json\n")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        read_question_file(bad)
    good = tmp_path / "q.jsonl"
    good.write_text('{"question_id": 1, "image": "missing.png", "text": "hi"}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CalibrationError, match="missing.png"):
            load_question_file(good, tmp_path, make_processor())


def test_as_batches_normalises_shapes():
    item = {"input_ids": torch.tensor([1, 3, 3, 5]), "pixel_values": torch.zeros(3, 8, 8)}
    (batch,) = as_batches(item)
    assert batch["input_ids"].shape == (1, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1]]
    assert batch["pixel_values"].shape == (1, 3, 8, 8)
    with pytest.raises(CalibrationError, match="processor output"):
        list(as_batches([{"pixel_values": torch.zeros(1)}]))


# ------------------------------------------------------------------------------------ CLI
def test_fit_then_inspect_with_plot(workspace, capsys):
    pytest.importorskip("matplotlib", reason="plot extra: pip install fitprune-fx[plot]")
    root, model_dir, images, data = workspace
    out = root / "recipe.json"
    argv = ["fit", "--model", str(model_dir), "--data", str(data), "--images", str(images)]
    argv += ["--budget", "0.4", "-o", str(out), "--batch-size", "4"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "FLOPs reduction" in text and "wrote" in text
    assert "checked: the pass prunes this model on this stack (16 visual tokens" in text
    recipe = Recipe.from_json(out)
    assert recipe.budget == 0.4 and recipe.flops_reduction >= 0.39
    assert recipe.fit["samples"] == 6 and recipe.model.name == "tiny-llava"
    assert recipe.model.num_layers == 4 and recipe.model.num_visual_tokens == 16

    png = root / "tokens.png"
    assert main(["inspect", str(out), "--plot", str(png), "--visual-tokens", "32"]) == 0
    shown = capsys.readouterr().out
    assert "deleted" in shown and "scaled to 32 visual tokens" in shown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_exits_1_when_the_pass_would_not_prune_its_recipe(workspace, monkeypatch, capsys):
    """A decoder the pass refuses (a hub-style RMSNorm kernel that bakes the row count): the recipe is
    written, then fit says the pass does not prune the model and why, exits 1, no traceback."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from kernel_wrappers import use_row_count_kernel

    use_row_count_kernel(monkeypatch, LlamaRMSNorm)
    root, model_dir, images, data = workspace
    out = root / "unprunable.json"
    argv = ["fit", "--model", str(model_dir), "--data", str(data), "--images", str(images)]
    assert main([*argv, "--budget", "0.4", "-o", str(out), "--batch-size", "4", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "fitprune-fx fit: not pruned: not understood:" in captured.err
    assert "use_kernels=False" in captured.err and "Traceback" not in captured.err
    assert out.is_file() and "checked" not in captured.out


def test_inspect_shipped_recipe_and_errors(tmp_path, capsys):
    assert main(["inspect", "llava-1.5-7b/60.json"]) == 0
    assert "visual left" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nope.json")]) == 2
    assert "cannot load recipe" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(workspace, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code = main(["inspect", "llava-1.5-7b/60.json", "--plot", str(workspace[0] / "x.png")])
    assert code == 2
    assert "pip install fitprune-fx[plot]" in capsys.readouterr().err


def test_fit_argument_errors(workspace, capsys):
    _, model_dir, images, data = workspace
    base = ["fit", "--model", str(model_dir), "--images", str(images), "-o", "r.json"]
    assert main([*base, "--data", str(data), "--budget", "1.5"]) == 2
    assert "fraction" in capsys.readouterr().err
    assert main([*base, "--data", "missing.jsonl", "--budget", "0.5"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_console_script_installed():
    exe = shutil.which("fitprune-fx")
    if exe is None:
        pytest.skip("console script not on PATH (package not installed)")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "fit" in res.stdout and "inspect" in res.stdout


# ---------------------------------------------------------------------------- user mistakes
def run_cli(*argv: str, stdin_pipe_to: str | None = None) -> subprocess.CompletedProcess:
    """The installed console script in a subprocess (or `python -m`), as a user runs it."""
    exe = shutil.which("fitprune-fx")
    cmd = [exe] if exe else [sys.executable, "-m", "fitprune_fx.cli"]
    if stdin_pipe_to:  # `fitprune-fx ... | head -1`
        line = " ".join(shlex.quote(a) for a in [*cmd, *argv]) + f" | {stdin_pipe_to}"
        return subprocess.run(
            ["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True, timeout=300
        )
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=300)


def assert_user_error(run: subprocess.CompletedProcess, command: str, *phrases: str) -> None:
    """Exit status 2, one `fitprune-fx <command>: error: ...` line naming the problem, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith(f"fitprune-fx {command}: error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


@pytest.fixture(scope="module")
def fit_argv(workspace):
    root, model_dir, images, data = workspace
    return ["fit", "--model", str(model_dir), "--data", str(data), "--images", str(images), "--budget", "0.4"]


def test_fit_merge_below_leaves_fewer_pruning_layers(fit_argv, tmp_path, capsys):
    plain, merged = tmp_path / "plain.json", tmp_path / "merged.json"
    assert main([*fit_argv, "--batch-size", "4", "-o", str(plain)]) == 0
    assert main([*fit_argv, "--batch-size", "4", "-o", str(merged), "--merge-below", "5"]) == 0
    before, after = Recipe.from_json(plain), Recipe.from_json(merged)
    assert len(before.prune) > 1 and len(after.prune) == 1  # 5 layers' worth: no layer saves that much
    assert sum(after.prune.values()) == sum(before.prune.values())
    assert after.fit["merged_small_deletions"]["min_saving"] == 5.0
    assert_user_error(
        run_cli(*fit_argv, "-o", str(tmp_path / "r.json"), "--merge-below", "-1"), "fit", "--merge-below -1"
    )


def test_fit_images_folder_without_the_images(workspace, fit_argv, tmp_path):
    run = run_cli(
        *fit_argv[:-4], "--images", str(tmp_path), "--budget", "0.4", "-o", str(tmp_path / "r.json")
    )
    assert_user_error(run, "fit", "6 of 6 images", "'img0.png'", "point --images at the folder")


def test_fit_budget_out_of_reach_names_the_reachable_maximum(fit_argv, tmp_path):
    run = run_cli(*fit_argv[:-1], "0.99", "-o", str(tmp_path / "r.json"))
    assert_user_error(run, "fit", "--budget 0.99", "out of reach", "ask for at most 0.")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "content, phrase",
    [
        ("", "no questions"),
        ("{not json\n", "not valid JSON"),
        ('{"image": "img0.png"}\n', "missing ['text']"),
        ("[1, 2]\n", "expected an object"),
    ],  # fmt: skip
)
def test_fit_bad_question_files(workspace, fit_argv, tmp_path, content, phrase):
    bad = tmp_path / "q.jsonl"
    bad.write_text(content)
    argv = [*fit_argv]
    argv[argv.index("--data") + 1] = str(bad)
    assert_user_error(run_cli(*argv, "-o", str(tmp_path / "r.json")), "fit", phrase)


def test_fit_model_folder_that_is_not_a_model(fit_argv, tmp_path):
    argv = [*fit_argv]
    argv[argv.index("--model") + 1] = str(tmp_path)
    assert_user_error(run_cli(*argv, "-o", str(tmp_path / "r.json")), "fit", "cannot load a model")


def test_output_paths_are_checked_before_the_work(fit_argv, tmp_path):
    run = run_cli(*fit_argv, "-o", "/nonexistent/dir/r.json")
    assert_user_error(run, "fit", "-o /nonexistent/dir/r.json", "does not exist")
    assert len(run.stderr.splitlines()) == 1  # refused before the model loaded: nothing else printed
    run = run_cli("inspect", "llava-1.5-7b/60.json", "--plot", "/nonexistent/x.png")
    assert_user_error(run, "inspect", "--plot /nonexistent/x.png", "does not exist")
    assert_user_error(run_cli(*fit_argv, "-o", str(tmp_path)), "fit", "is a folder")


def test_inspect_into_a_closed_pipe_is_quiet():
    run = run_cli("inspect", "llava-1.5-7b/60.json", stdin_pipe_to="head -1")
    assert run.stdout.count("\n") == 1 and "Traceback" not in run.stderr and "Broken pipe" not in run.stderr


def test_help_is_fast_and_complete():
    """Help never imports torch or transformers (it took 4 s when it did); every option says what it does."""
    probe = (
        "import sys; from fitprune_fx.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    from fitprune_fx.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"fit", "inspect", "demo", "eval", "convert-llava-hr"}
    for name, sub in commands.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, (name, action.option_strings)


def test_eval_without_lmms_eval_names_the_extra():
    """Where the [eval] extra is not installed (the main CI leg), `eval` says how to get it."""
    import importlib.util

    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed here")
    run = run_cli("eval", "--recipe", "llava-1.5-7b/60.json", "--tasks", "fitprune_shapes")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert 'lmms-eval is not installed: pip install "fitprune-fx[eval]"' in run.stderr
