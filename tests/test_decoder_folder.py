"""``fxcompress optimize hf:DIR``: a local Hugging Face causal LM folder, checked before it is loaded, compressed into
a KV-cache decoder and checked token by token; bad folders get an error naming the file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fxcompress.cli import main
from fxcompress.errors import ExportError, InputError
from fxcompress.llm.folder import check_safetensors, load_causal_lm
from fxcompress.models.architectures import causal_lm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    causal_lm("llama").save_pretrained(path)
    return path


def test_a_folder_loads_as_the_model_saved(folder):
    model = causal_lm("llama")
    loaded = load_causal_lm(folder)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_cli_compresses_a_folder_into_a_checked_decoder(folder, tmp_path, capsys):
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    code = main(["optimize", f"hf:{folder}", "--recipe", "int8", "-o", f"{out}/", "--check", "--new-tokens", "6",
                 "--json", str(report), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (out / "model.onnx").is_file()
    data = json.loads(report.read_text())
    assert data["passed"] and data["new_tokens"] == 6 and data["logits_cosine"] > 0.999
    assert "decoder parity on CPUExecutionProvider: PASSED" in capsys.readouterr().out
    assert main(["check", f"hf:{folder}", str(out / "model.onnx"), "--new-tokens", "4"]) == 0
    assert "greedy tokens:" in capsys.readouterr().out


def test_a_truncated_safetensors_file_is_named(folder, tmp_path):
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in folder.iterdir():
        data = f.read_bytes()
        (cut / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(InputError, match="model.safetensors is truncated"):
        load_causal_lm(cut)
    assert main(["optimize", f"hf:{cut}", "-o", str(tmp_path / "m.onnx"), "--no-progress"]) == 2
    assert not (tmp_path / "m.onnx").exists()


def test_folders_that_are_not_causal_lms_are_refused(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(InputError, match="no config.json"):
        load_causal_lm(tmp_path)
    from transformers import ViTConfig, ViTModel

    vit = tmp_path / "vit"
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
    ViTModel(config).save_pretrained(vit)
    with pytest.raises(InputError, match="ViTConfig .* which is not a causal language model"):
        load_causal_lm(vit)
    (tmp_path / "w.safetensors").write_bytes(b"\x01")
    with pytest.raises(InputError, match="not a safetensors file"):
        check_safetensors(tmp_path / "w.safetensors")


def test_export_refuses_a_disk_too_small_before_writing(tmp_path, monkeypatch):
    import shutil

    import fxcompress

    cm = fxcompress.optimize(torch.nn.Linear(64, 64), torch.randn(2, 64), recipe="int8")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100))
    with pytest.raises(ExportError, match="GiB free"):
        cm.export(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_weights_mapped_from_the_folder_are_let_go_and_read_back_intact(folder):
    from fxcompress.graph.residency import WeightPager

    model = load_causal_lm(folder)
    pager = WeightPager(model)
    assert pager.mapped_bytes >= sum(p.numel() * 4 for p in model.parameters())  # the safetensors file, mapped
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
        with pager.layer_by_layer(model):  # released after every layer, while the forward still needs the others
            during = model(ids).logits
        assert pager.release() > 0
        after = model(ids).logits
        from fxcompress.graph.residency import checkpoint

        with pager.while_reading():  # released between slices of a weight, pages read again as needed
            pager.released_at = 0.0
            checkpoint()
            background = [model(ids).logits for _ in range(3)]
        assert pager.released_at > 0
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all(torch.equal(before, b) for b in background)
    assert WeightPager(torch.nn.Linear(4, 4)).ranges == []  # weights in ordinary memory are never advised


_BUILD = """
import sys, warnings
warnings.simplefilter("ignore")
from fxcompress.llm.compress import optimize_decoder
from fxcompress.llm.folder import load_causal_lm
optimize_decoder(load_causal_lm(sys.argv[1]), "int8", progress=False).export(sys.argv[2], external_data=True)
print("PEAK", next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS (VmHWM) from /proc")
def test_compressing_a_folder_holds_about_one_layer_of_float_weights_next_to_the_output(tmp_path):
    """Each extra layer of a folder-backed model may add its compressed bytes (held, then written) and a fraction of
    its float bytes to the build's peak memory, never its whole float weights: the float weights of a layer already
    rewritten are let go (a build holding them grows by at least the float bytes per layer)."""
    peaks, fp32, output = {}, {}, {}
    for layers in (2, 8):
        lm = causal_lm("llama", layers=layers, hidden=1024, heads=8, kv_heads=4, vocab=4096, intermediate=4096)
        fp32[layers] = sum(p.numel() * p.element_size() for p in lm.parameters())
        lm.save_pretrained(tmp_path / f"l{layers}")
        del lm
        artifact = tmp_path / f"o{layers}.onnx"
        run = subprocess.run(
            [sys.executable, "-c", _BUILD, str(tmp_path / f"l{layers}"), str(artifact)], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[layers] = int(run.stdout.split("PEAK")[-1])
        output[layers] = sum(f.stat().st_size for f in tmp_path.glob(f"o{layers}.onnx*"))
    float_growth, output_growth, peak_growth = (d[8] - d[2] for d in (fp32, output, peaks))
    assert float_growth > 300 << 20  # 6 layers of 60 MB: what the bound must tell apart from noise
    assert peak_growth <= 2 * output_growth + float_growth / 4, (peak_growth >> 20, output_growth >> 20)
