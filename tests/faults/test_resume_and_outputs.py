"""Faults a hostile user found: resume folders that mixed models or calibrations, a checkpoint
without its config loading as random weights, outputs that deleted the user's files, outputs at
unusable paths failing only after the work. Each is a clear one-line error or a clean restart."""
import shutil

import pytest
import torch

from haq.cli import main
from haq.errors import HaqError


def run(capsys, *argv):
    capsys.readouterr()  # what earlier steps of the test printed
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def two_llamas(tmp_path_factory):
    """The zoo's tiny-llama (A) and the same architecture with other weights (B), both with a tokenizer."""
    from haq import zoo
    from haq.zoo import ASSETS
    from haq.zoo.tiny_random import build_tiny

    a = zoo.build("tiny-llama")
    b = tmp_path_factory.mktemp("b") / "tiny-llama-b"
    build_tiny("tiny-llama", b, tokenizer_dir=ASSETS / "tiny-mixtral", seed=1)
    return a, b


def test_resume_never_mixes_models_or_calibrations(two_llamas, tmp_path, monkeypatch):
    from haq import api
    from haq.quant import pipeline
    from haq.quant.recipe import Recipe

    a, b = two_llamas
    recipe, out = Recipe(method="rtn"), tmp_path / "q"
    real, calls = pipeline.quantize_layer, []

    def crash_after_first_layer(layer, spec, stats, recipe, report, prefix, probe):
        calls.append(report.index)
        if report.index == 1:
            raise KeyboardInterrupt
        return real(layer, spec, stats, recipe, report, prefix, probe)

    monkeypatch.setattr(pipeline, "quantize_layer", crash_after_first_layer)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(a, recipe, out, nsamples=2, seqlen=32, progress=False)
    monkeypatch.setattr(pipeline, "quantize_layer", real)
    api.quantize(b, recipe, out, nsamples=2, seqlen=32, progress=False)  # another model into the same OUT
    clean = api.quantize(b, recipe, tmp_path / "clean", nsamples=2, seqlen=32, progress=False)
    from haq.checkpoint.native import load_quantized

    ids = torch.randint(0, 4096, (1, 16))
    with torch.no_grad():
        assert torch.equal(load_quantized(out)(ids).logits, load_quantized(clean)(ids).logits)
    windows = torch.randint(0, 4096, (2, 32))
    assert api.run_key(recipe, a, windows) != api.run_key(recipe, b, windows)
    assert api.run_key(recipe, a, windows) != api.run_key(recipe, a, windows + 1)
    assert api.run_key(recipe, a, windows) == api.run_key(recipe, a, windows.clone())


def test_a_checkpoint_without_its_config_is_refused(two_llamas, tmp_path, capsys):
    from haq import api
    from haq.quant.recipe import Recipe

    out = api.quantize(two_llamas[0], Recipe(method="rtn"), tmp_path / "q", nsamples=2, seqlen=32, progress=False)
    (out / "haq_config.json").unlink()
    code, err = run(capsys, "eval", str(out), "--max-windows", "1", "--seqlen", "64")
    assert code == 2 and "holds haq int8 weights but no haq_config.json" in err and "\n" not in err


def test_a_float_folder_missing_weights_is_refused(two_llamas, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(two_llamas[0], broken)
    state = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.1." not in k}, broken / "model.safetensors")
    code, err = run(capsys, "eval", str(broken), "--max-windows", "1", "--seqlen", "64")
    assert code == 2 and "weights of the architecture are not in its files" in err and "\n" not in err


def test_rewriting_an_output_never_deletes_the_users_files(two_llamas, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quantize", str(two_llamas[0]), "--method", "rtn", "--nsamples", "2", "--seqlen", "32", "-o", str(out)]
    assert run(capsys, *args)[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    code, err = run(capsys, *args)
    assert code == 2 and "notes.txt" in err and "would delete" in err and "\n" not in err
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub").is_dir()
    code, err = run(capsys, "export", str(out), "-o", str(tmp_path / "ct"))
    assert code == 0
    (tmp_path / "ct" / "README.md").write_text("mine")
    code, err = run(capsys, "export", str(out), "-o", str(tmp_path / "ct"))
    assert code == 2 and "README.md" in err and (tmp_path / "ct" / "README.md").read_text() == "mine"


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_an_output_at_a_file_fails_before_any_work(two_llamas, tmp_path, capsys, monkeypatch, command):
    from haq import loading

    target = tmp_path / "file.txt"
    target.write_text("x")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model first"))
    argv = ["quantize", str(two_llamas[0]), "-o", str(target)] if command == "quantize" else \
        ["export", str(two_llamas[0]), "-o", str(target)]
    code, err = run(capsys, *argv)
    assert code == 2 and "\n" not in err and ("is a file" in err or "not a haq checkpoint" in err)
    with pytest.raises(HaqError, match="is a file"):
        from haq.io import check_output_dir

        check_output_dir(target, "haq_config.json", "haq checkpoint")


def test_an_edited_haq_config_is_refused(two_llamas, tmp_path, capsys):
    import json

    from haq import api
    from haq.quant.recipe import Recipe

    out = api.quantize(two_llamas[0], Recipe(method="rtn"), tmp_path / "q", nsamples=2, seqlen=32, progress=False)
    meta = json.loads((out / "haq_config.json").read_text())
    meta["recipe"]["act"] = "per-tensor"  # the hostile edit: a recipe the weights were not made with
    (out / "haq_config.json").write_text(json.dumps(meta))
    for argv in (["eval", str(out), "--max-windows", "1", "--seqlen", "64"], ["export", str(out), "-o", str(tmp_path / "ct")]):
        code, err = run(capsys, *argv)
        assert code == 2 and "was edited after it was written" in err and "\n" not in err
    del meta["config_sha256"]
    (out / "haq_config.json").write_text(json.dumps(meta))
    code, err = run(capsys, "eval", str(out), "--max-windows", "1", "--seqlen", "64")
    assert code == 2 and "has no checksum of its own" in err


@pytest.mark.parametrize("argv", [["eval", "tiny-llama", "--json", "{dir}"],
                                  ["trace", "tiny-mixtral", "-o", "{dir}"],
                                  ["eval", "tiny-llama", "--json", "{file}/under-a-file.json"],
                                  ["run", "tiny-mixtral", "--plot", "{file}"]])
def test_result_paths_are_checked_before_the_computation(tmp_path, capsys, monkeypatch, argv):
    from haq import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("computed before checking the output"))
    (tmp_path / "f").write_text("x")
    code, err = run(capsys, *[a.format(dir=tmp_path, file=tmp_path / "f") for a in argv])
    assert code == 2 and err.startswith("haq: error:") and "\n" not in err


def test_outputs_are_readable_by_others_and_killed_saves_are_cleaned(tmp_path):
    """Folders and files haq writes follow the umask (not mkdtemp's 0700 / mkstemp's 0600), and the
    temp folder a killed save left beside the output is removed by the next write."""
    import os

    import torch
    from safetensors.torch import save_file

    from haq.io import atomic_dir, atomic_write_text

    old = os.umask(0o022)
    try:
        stale = tmp_path / ".out.tmp-999999999-abc"  # no such process
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"half")
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # its writer makes the file 0600
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert not stale.exists()
