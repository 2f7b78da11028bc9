import json
import subprocess
import sys

import pytest

from fxcompress.cli import main


def test_optimize_check_writes_artifact_and_json(tmp_path, capsys):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    code = main(
        [
            "optimize",
            "fxcompress.models.zoo:mlp",
            "--recipe",
            "int8",
            "-o",
            str(out),
            "--check",
            "--no-baseline",
            "--no-progress",
            "--json",
            str(rep),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "weight SQNR" in text and "parity PASSED" in text and "CPUExecutionProvider" in text
    data = json.loads(rep.read_text())
    assert data["passed"] is True and {r["layer"] for r in data["layers"]} == {"0", "2", "4"}


def test_bundled_model_gets_its_calibration_batches(tmp_path, capsys):
    out = tmp_path / "d.onnx"
    code = main(["optimize", "digits_cnn", "--recipe", "fold_bn,int8_static", "-o", str(out), "--no-progress"])
    assert code == 0 and out.is_file() and "int8-static" in capsys.readouterr().out


def test_check_on_broken_artifact_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    assert main(["check", "mlp", str(bad), "--no-baseline"]) == 1
    assert "parity FAILED" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optimize", "mlp", "--recipe", "int9", "-o", "{d}/m.onnx"], "unknown pass 'int9'"),
        (["optimize", "no_such_model", "-o", "{d}/m.onnx"], "neither MODULE:FACTORY nor a bundled model"),
        (["optimize", "fxcompress.models.zoo:nope", "-o", "{d}/m.onnx"], "has no callable 'nope'"),
        (["optimize", "mlp", "-o", "{d}/missing/m.onnx"], "does not exist"),
        (["check", "mlp", "{d}/absent.onnx"], "no such file"),
        (["optimize", "mlp", "--recipe", "int8_static", "-o", "{d}/m.onnx"], "int8_static needs calibration data"),
        (
            ["optimize", "mlp", "--recipe", "int8:algo=gptq", "-o", "{d}/m.onnx"],
            "on the command line: --calibration MODULE:FUNC",
        ),
        (
            [
                "optimize",
                "mlp",
                "--recipe",
                "int8_static",
                "--calibration",
                "fxcompress.models.zoo:mlp",
                "-o",
                "{d}/m.onnx",
            ],
            "must return a list of input tuples",
        ),
        (["optimize", "mlp", "--dynamic-axes", "0,seq", "-o", "{d}/m.onnx"], "comma-separated axis numbers"),
    ],
)
def test_bad_input_exits_2_with_message_and_writes_nothing(tmp_path, capsys, argv, message):
    argv = [a.replace("{d}", str(tmp_path)) for a in argv] + (["--no-progress"] if argv[0] == "optimize" else [])
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.rglob("*.onnx")) == []


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "fxcompress.cli", "list"], capture_output=True, text=True)
    assert proc.returncode == 0 and "int8" in proc.stdout and "minilm" in proc.stdout


def test_bundled_models_take_their_own_dynamic_axes():
    from fxcompress.cli import parse_axes

    assert parse_axes(None, "minilm") == (0, 1) and parse_axes(None, "mlp") == (0,)
    assert parse_axes("0,1", "mlp") == (0, 1) and parse_axes("", "minilm") == ()


def test_list_shows_every_pass_with_its_options_and_defaults(capsys):
    from fxcompress.recipe.registry import available_passes

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in available_passes():
        assert f"\n  {name} " in out
    assert "algo=rtn act_order=false damp=0.01 sequential=true budget=0.0" in out  # int8's, as recipe text
    assert "kinds=linear+conv1d+conv2d+embedding" in out and "bundled models: mlp" in out


def test_help_and_python_dash_m_do_not_import_torch():
    probe = "import sys, fxcompress.cli; fxcompress.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
    proc = subprocess.run([sys.executable, "-m", "fxcompress", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "optimize" in proc.stdout and "bench" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "fxcompress", "optimize", "--help"], capture_output=True, text=True)
    for flag in (
        "--target",
        "--calibration",
        "--dynamic-axes",
        "--check",
        "--json",
        "--provider",
        "--no-baseline",
        "--no-progress",
    ):
        assert flag in proc.stdout


def test_a_factory_in_the_current_folder_is_found_without_pythonpath(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(8, 4)).eval(), torch.randn(2, 8)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "fxcompress", "optimize", "mymodel:make", "-o", "m.onnx", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.onnx").is_file()


def test_bench_reports_progress_and_rejects_unknown_targets_and_batches(capsys):
    assert main(["bench", "mlp", "--targets", "gpu"]) == 2
    assert "unknown target(s) ['gpu']" in capsys.readouterr().err
    assert main(["bench", "mlp", "--batches", "a"]) == 2
    assert "comma-separated batch sizes" in capsys.readouterr().err
    assert main(["bench", "mlp", "--targets", "cpu", "--batches", "1", "--repeat", "1", "--no-ort"]) == 0
    captured = capsys.readouterr()
    assert "[2/2] measuring fxcompress int8 [cpu]" in captured.err and "| fxcompress int8 [cpu] |" in captured.out


def _module(tmp_path, name, text):
    (tmp_path / f"{name}.py").write_text(text)
    return name


@pytest.mark.parametrize(
    "source, message",
    [
        ("def make():\n    raise ValueError('no weights file here')\n", "raised ValueError: no weights file here"),
        ("def make(:\n    pass\n", "SyntaxError"),
        ("import torch\n\ndef make():\n    return torch.nn.Linear(4, 2)\n", "must return (model, example_inputs)"),
    ],
)
def test_a_broken_user_script_exits_2_with_its_own_message(tmp_path, monkeypatch, capsys, source, message):
    monkeypatch.chdir(tmp_path)
    name = _module(tmp_path, f"user_{abs(hash(source)) % 10_000}", source)
    assert main(["optimize", f"{name}:make", "-o", str(tmp_path / "m.onnx"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_calibration_function_that_raises_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = _module(tmp_path, "calib_broken", "def batches():\n    raise RuntimeError('dataset missing')\n")
    argv = ["optimize", "mlp", "--recipe", "int8_static", "--calibration", f"{name}:batches", "-o", "m.onnx"]
    assert main(argv + ["--no-progress"]) == 2
    assert "--calibration calib_broken:batches raised RuntimeError: dataset missing" in capsys.readouterr().err


def test_an_unwritable_json_path_is_refused_before_any_work(tmp_path, capsys):
    argv = ["optimize", "mlp", "-o", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "missing" / "r.json")]
    assert main(argv + ["--check", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "--json" in captured.err and "does not exist" in captured.err and "parity" not in captured.out
    assert not (tmp_path / "m.onnx").exists()


def test_an_internal_error_exits_3_with_the_traceback(monkeypatch, tmp_path, capsys):
    import fxcompress.api

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(fxcompress.api, "optimize", broken)
    assert main(["optimize", "mlp", "-o", str(tmp_path / "m.onnx"), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "internal error (ZeroDivisionError: a bug)" in err and "Traceback" in err


def test_check_states_its_floors_and_takes_the_recipe_or_trusts_the_file_only_when_asked(tmp_path, capsys):
    path = str(tmp_path / "m.onnx")
    assert main(["optimize", "mlp", "--recipe", "int4:block=32", "-o", path, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["check", "mlp", path, "--no-baseline", "--recipe", "int4:block=32"]) == 0
    assert "floors: recipe 'int4'" in capsys.readouterr().out
    main(["check", "mlp", path, "--no-baseline", "--trust-metadata"])
    assert "floors: the artifact's own metadata" in capsys.readouterr().out
