"""Bad input on the command line ends in one clear line on stderr, exit code 2, no traceback."""
import pytest

from haq.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_model_name(capsys):
    code, err = run(capsys, "eval", "no-such-model")
    assert code == 2 and err.startswith("haq: error: model 'no-such-model' not found") and "\n" not in err


def test_folder_that_is_not_a_model(capsys, tmp_path):
    code, err = run(capsys, "eval", str(tmp_path))
    assert code == 2 and "is not a model folder: no config.json" in err and "\n" not in err


def test_missing_dataset_file(capsys, tiny_dir):
    code, err = run(capsys, "eval", str(tiny_dir("tiny-llama")), "--dataset", "/no/such/file.txt")
    assert code == 2 and "/no/such/file.txt" in err and "\n" not in err


def test_quantize_rejects_a_bad_calibration_file_before_loading(capsys, tmp_path):
    code, err = run(capsys, "quantize", str(tmp_path), "--calib", str(tmp_path / "missing.jsonl"), "-o",
                    str(tmp_path / "out"))
    assert code == 2 and "\n" not in err


@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_quantize_on_a_device_this_machine_lacks_is_a_clear_error(capsys, tiny_dir, tmp_path, device):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    model = tiny_dir("tiny-llama")
    capsys.readouterr()  # the model build's own output
    code, err = run(capsys, "quantize", str(model), "--device", device, "-o", str(tmp_path / "q"))
    assert code == 2 and err.startswith("haq: error: --device ") and device in err and "\n" not in err
    assert not (tmp_path / "q").exists()


def test_export_of_a_float_model_is_a_clear_error(capsys, tiny_dir, tmp_path):
    code, err = run(capsys, "export", str(tiny_dir("tiny-llama")), "-o", str(tmp_path / "x"))
    assert code == 2 and "not a haq checkpoint" in err and "\n" not in err


def test_unknown_zoo_model_build(capsys, monkeypatch):
    code, err = run(capsys, "zoo", "build", "nope")
    assert code == 2 and "unknown zoo model 'nope'" in err
    from haq import zoo

    monkeypatch.setattr(zoo, "build", lambda *a, **k: pytest.fail("built before every name was checked"))
    code, err = run(capsys, "zoo", "build", "tiny-llama", "nope")
    assert code == 2 and "unknown zoo model 'nope'" in err


@pytest.mark.parametrize("args", [["eval", "--help"], ["quantize", "--help"], ["zoo", "list"]])
def test_help_and_listing_work(capsys, args):
    try:
        assert main(args) == 0
    except SystemExit as exc:  # argparse exits 0 after --help
        assert exc.code == 0
    assert capsys.readouterr().out


@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_an_unsupported_architecture_is_one_line_listing_the_supported_ones(capsys, tmp_path, command):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    extra = ["-o", str(tmp_path / "out")] if command == "quantize" else []
    code, err = run(capsys, command, str(tmp_path), *extra)
    assert code == 2 and "\n" not in err
    assert err.startswith("haq: error: unsupported architecture 'gpt2'") and "deepseek_v2" in err and "gemma3_text" in err


def test_every_recipe_field_is_a_flag_with_its_default_in_the_help(capsys, monkeypatch):
    import dataclasses

    from haq.quant.recipe import Recipe

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside "coarse-to-fine"
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Recipe):
        assert "--" + f.name.replace("_", "-") in text and f"(default: {f.default})" in text, f.name


def test_recipe_file_flags_win_and_the_summary_lists_the_layers(capsys, tmp_path):
    import json

    from haq import zoo

    (tmp_path / "r.yaml").write_text("method: smoothquant\nalpha: 0.25\nactorder: false\n")
    (tmp_path / "calib.txt").write_text("The river crossing grew into a town, then a city. " * 40)
    out = tmp_path / "q"
    code = main(["quantize", str(zoo.build("tiny-mixtral")), "--recipe", str(tmp_path / "r.yaml"), "--alpha", "0.75",
                 "--calib", str(tmp_path / "calib.txt"), "--nsamples", "2", "--seqlen", "16", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    recipe = json.loads((out / "haq_config.json").read_text())["recipe"]
    assert (recipe["method"], recipe["alpha"], recipe["actorder"]) == ("smoothquant", 0.75, False)
    assert printed.startswith(f"wrote {out}: smoothquant W8A8") and "layer   0" in printed and "layer   1" in printed


@pytest.mark.parametrize("text,suffix,needle", [
    ("method: haq\nalpah: 0.3\n", ".yaml", "unknown fields ['alpah']"),
    ("{\"wbits\": 9}", ".json", "--wbits must be in [2, 8]"),
    ("- a list\n", ".yaml", "must hold a mapping"),
    ("{bad json", ".json", "is not valid JSON"),
    ("method: [unclosed\n", ".yaml", "is not valid YAML"),
    ("method: haq\nnsamples: 16\n", ".yaml", "calibration data is not part of a recipe; remove it there and pass "
                                              "--nsamples 16"),
])
def test_bad_recipe_files_are_one_line_errors(capsys, tmp_path, text, suffix, needle):
    path = tmp_path / f"recipe{suffix}"
    path.write_text(text)
    code, err = run(capsys, "quantize", str(tmp_path), "--recipe", str(path), "-o", str(tmp_path / "out"))
    assert code == 2 and needle in err and "\n" not in err


def test_a_missing_recipe_file_is_a_one_line_error(capsys, tmp_path):
    code, err = run(capsys, "quantize", str(tmp_path), "--recipe", str(tmp_path / "none.yaml"), "-o",
                    str(tmp_path / "out"))
    assert code == 2 and "cannot read the recipe file" in err and "\n" not in err


def test_serve_checks_its_address_before_loading_the_model(capsys):
    import socket

    with socket.socket() as taken:  # a port another process listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, needle in ((["--port", "-1"], "0-65535"), (["--port", "70000"], "0-65535"),
                              (["--port", str(port)], "cannot listen"), (["--host", "999.1.1.1"], "--host 999")):
            code, err = run(capsys, "serve", "no-such-model", *flags)  # the address fails first, not the model
            assert code == 2 and needle in err, (flags, err)


def test_ctrl_c_is_one_line_not_a_traceback(capsys, monkeypatch):
    import haq.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_eval", interrupted)
    assert cli.main(["eval", "tiny-llama"]) == 130
    assert capsys.readouterr().err == "haq: interrupted\n"


def test_every_help_shows_a_default_once_and_never_none():
    import argparse
    import re

    from haq.cli import build_parser

    def parsers(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for p in parsers(build_parser()):
        text = " ".join(p.format_help().split())
        assert "(default: None)" not in text, p.prog
        assert not re.search(r"\(default: [^)]*\) \(default:", text), p.prog
    run_help = " ".join(build_parser()._subparsers._group_actions[0].choices["run"].format_help().split())
    assert "--max-new-tokens MAX_NEW_TOKENS tokens generated per prompt (default: 32)" in run_help
    assert "--temperature TEMPERATURE 0 = greedy (default: 0.0)" in run_help  # a default of 0 is shown


def test_a_recipe_flag_the_method_does_not_read_is_a_warning(capsys, caplog, monkeypatch):
    from haq import api
    from haq.errors import HaqError

    def stop(*args, **kwargs):
        raise HaqError("stopped before the work")

    monkeypatch.setattr(api, "quantize", stop)
    run(capsys, "quantize", "tiny-llama", "--method", "rtn", "--alpha", "0.7", "--percdamp", "0.1", "-o", "x")
    assert "--alpha has no effect with --method rtn" in caplog.text
    assert "--percdamp has no effect with --method rtn" in caplog.text
    caplog.clear()
    run(capsys, "quantize", "tiny-llama", "--method", "smoothquant", "--alpha", "0.7", "-o", "x")
    assert "no effect" not in caplog.text


def test_weights_that_do_not_convert_name_the_tensor_not_a_hidden_report(capsys, tiny_dir, tmp_path):
    """transformers stacks a Mixtral's per-expert w1/w3 into gate_up_proj while loading; an expert of
    the wrong shape fails there with "look at the report above", a report haq keeps quiet."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir("tiny-mixtral-random"), folder)
    state = load_file(folder / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    state[name] = state[name][:-8].contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()  # the fixture's build output
    code, err = run(capsys, "eval", str(folder), "--seqlen", "16", "--max-windows", "1")
    assert code == 2 and "\n" not in err.strip() and "report" not in err
    assert "do not convert" in err and "equal size" in err and "layers.0.mlp.experts.gate_up_proj" in err
