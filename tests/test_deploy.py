"""save/load: .pt2 round trips in a fresh process, dynamic batch, and every bad-file error."""

from __future__ import annotations

import io
import json
import pathlib
import re
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from torch import nn

import fxsketch
import fxsketch.deploy
from fxsketch.deploy import ArtifactError
from conftest import loaded_in_fresh_process


def _rewritten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16),
                          nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 3, 6, 6)
    plan = {"0": {"method": "svd", "low_rank": 4}, "3": {"method": "sketch", "num_terms": 1, "low_rank": 4}}
    return model, fxsketch.rewrite(model, plan, x), x, plan


def test_saved_program_runs_in_a_fresh_process_on_another_batch_size(tmp_path):
    _, gm, x, plan = _rewritten()
    path = tmp_path / "m.pt2"
    program = fxsketch.save(gm, path, x)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fxsketch.lowrank_conv2d.default" in targets and "fxsketch.lowrank_linear.default" in targets
    x7 = torch.randn(7, 3, 6, 6)
    with torch.no_grad():
        out = loaded_in_fresh_process(path, x7, gm(x7), tmp_path, 'print("plan", m.meta["fxsketch"]["plan"])')
    assert "'low_rank': 4" in out


def test_static_batch_artifact_refuses_other_batch_sizes(tmp_path):
    _, gm, x, _ = _rewritten()
    fxsketch.save(gm, tmp_path / "s.pt2", x, dynamic_batch=False)
    loaded = fxsketch.load(tmp_path / "s.pt2")
    torch.testing.assert_close(loaded(x), gm(x))
    with pytest.raises(Exception):
        loaded(torch.randn(5, 3, 6, 6))


def test_dynamic_batch_needs_a_batch_of_two(tmp_path):
    _, gm, _, _ = _rewritten()
    with pytest.raises(ArtifactError, match="batch of at least 2"):
        fxsketch.save(gm, tmp_path / "one.pt2", torch.randn(1, 3, 6, 6))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such artifact"):
        fxsketch.load(tmp_path / "nope.pt2")


def test_not_an_archive_and_truncated(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"definitely not a zip file")
    with pytest.raises(ArtifactError, match="truncated"):
        fxsketch.load(junk)
    _, gm, x, _ = _rewritten()
    good = tmp_path / "good.pt2"
    fxsketch.save(gm, good, x)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        fxsketch.load(cut)


def test_plain_torch_export_file_is_not_an_fxsketch_artifact(tmp_path):
    model = nn.Linear(4, 2)
    path = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), path)
    with pytest.raises(ArtifactError, match="not an fxsketch artifact"):
        fxsketch.load(path)


def test_artifact_from_a_newer_format_says_upgrade(tmp_path):
    _, gm, x, _ = _rewritten()
    path = tmp_path / "m.pt2"
    fxsketch.save(gm, path, x)
    newer = tmp_path / "newer.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            if item.filename.endswith("fxsketch.json"):
                meta = json.loads(payload)
                meta["format"] = 99
                payload = json.dumps(meta).encode()
            dst.writestr(item, payload)
    with pytest.raises(ArtifactError, match="upgrade fxsketch"):
        fxsketch.load(newer)


class _TokenModel(nn.Module):
    """Embeddings, a projection and a mean over the sequence: batch and length can both vary."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, ids):
        return self.out(torch.relu(self.proj(self.emb(ids))).mean(1))


def test_sequence_length_stays_dynamic_where_the_model_allows(tmp_path):
    torch.manual_seed(0)
    model = _TokenModel().eval()
    ids = torch.randint(0, 50, (3, 7))
    gm = fxsketch.rewrite(model, {"proj": {"method": "svd", "low_rank": 4}}, ids)
    path = tmp_path / "tok.pt2"
    fxsketch.save(gm, path, ids)
    loaded = fxsketch.load(path)
    assert loaded.meta["fxsketch"]["dynamic_dims"] == [[0, 1]]
    other = torch.randint(0, 50, (5, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(other), gm(other))


def test_aoti_package_runs_in_a_fresh_process_without_fxsketch(tmp_path):
    _, gm, x, plan = _rewritten()
    path = fxsketch.package(gm, tmp_path / "aoti.pt2", x)
    x5 = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        torch.save((x5, gm(x5)), tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import sys, json, torch
        loader = torch._inductor.aoti_load_package({str(path)!r})
        x, y = torch.load({str(tmp_path / 'ref.pt')!r})
        torch.testing.assert_close(loader(x), y, rtol=1e-4, atol=1e-5)
        meta = loader.get_metadata()
        print("fxsketch" in sys.modules, json.loads(meta["fxsketch_plan"]) == json.loads({json.dumps(plan)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"]


class _Payload:
    """Unpickling this creates the file `marker`: the stand-in for code an attacker ships in a file."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _with_member(src, dst, old: str, new: str, data: bytes, keep_old: bool = False) -> None:
    """A copy of the archive `src` in which member `old` (a suffix) is replaced by `new` holding `data`."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            if info.filename.endswith(old):
                b.writestr(info.filename[: -len(old)] + new, data)
                if not keep_old:
                    continue
            b.writestr(info, a.read(info.filename))


def _evil_artifact(tmp_path, name: str):
    """good.pt2 saved, and evil.pt2: the same with its sample inputs replaced by a payload stored
    as member `data/sample_inputs/{name}`; returns the file the payload would create."""
    _, gm, x, _ = _rewritten()
    fxsketch.save(gm, tmp_path / "good.pt2", x)
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    _with_member(tmp_path / "good.pt2", tmp_path / "evil.pt2", "data/sample_inputs/model.pt",
                 f"data/sample_inputs/{name}", payload.getvalue())
    return marker


@pytest.mark.parametrize("casing", ["model.PT", "model.Pt", "model.pT", "MODEL.pt", "Model.pt"])
def test_a_pickle_under_another_casing_of_a_member_name_never_runs(tmp_path, casing):
    marker = _evil_artifact(tmp_path, casing)
    with pytest.raises(ArtifactError, match=re.escape(f"sample_inputs/{casing}")):  # named, whichever check
        fxsketch.load(tmp_path / "evil.pt2")
    assert not marker.exists()


def test_a_second_member_differing_only_in_case_is_refused(tmp_path):
    _, gm, x, _ = _rewritten()
    fxsketch.save(gm, tmp_path / "good.pt2", x)
    weights = zipfile.ZipFile(tmp_path / "good.pt2").read(
        next(n for n in zipfile.ZipFile(tmp_path / "good.pt2").namelist() if n.endswith("weight_0")))
    _with_member(tmp_path / "good.pt2", tmp_path / "twice.pt2", "data/weights/weight_0", "data/weights/WEIGHT_0",
                 weights, keep_old=True)
    with pytest.raises(ArtifactError, match=r"weight_0' repeats '\S*/data/weights/WEIGHT_0'"):
        fxsketch.load(tmp_path / "twice.pt2")


def test_torch_never_falls_back_to_a_full_unpickle_when_untrusted(tmp_path, monkeypatch):
    """Defence in depth: with the member checks blinded, the full-unpickle fallback is still refused."""
    marker = _evil_artifact(tmp_path, "model.pt")
    x, real = _rewritten()[2], torch.load
    monkeypatch.setattr(fxsketch.deploy, "_pickled_members", lambda path: [])
    monkeypatch.setattr(fxsketch.deploy, "_unexpected_members", lambda path: [])
    with pytest.raises(ArtifactError, match=r"unpickling it in full"):
        fxsketch.load(tmp_path / "evil.pt2")
    assert not marker.exists()
    assert torch.load is real and fxsketch.load(tmp_path / "good.pt2")(x).shape == (4, 4)  # torch.load restored


@pytest.mark.parametrize("kept", [0.99, 0.9, 0.5, 0.01])
def test_a_truncated_artifact_is_called_truncated(tmp_path, kept):
    _, gm, x, _ = _rewritten()
    fxsketch.save(gm, tmp_path / "good.pt2", x)
    data = (tmp_path / "good.pt2").read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(ArtifactError, match=r"truncated"):
        fxsketch.load(tmp_path / "cut.pt2")


def test_bytes_overwritten_inside_a_weight_are_refused_naming_the_member(tmp_path):
    _, gm, x, _ = _rewritten()
    fxsketch.save(gm, tmp_path / "good.pt2", x)
    data = bytearray((tmp_path / "good.pt2").read_bytes())
    info = next(i for i in zipfile.ZipFile(tmp_path / "good.pt2").infolist() if i.filename.endswith("weight_0"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size // 2
    data[start:start + 64] = bytes(64)
    (tmp_path / "damaged.pt2").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"damaged: member '\S+/data/weights/weight_0' does not match the checksum"):
        fxsketch.load(tmp_path / "damaged.pt2")


def test_a_package_records_the_output_types_a_loading_process_must_import(tmp_path, monkeypatch, caplog):
    """A transformers model returns a ModelOutput: the package names its module in its metadata and
    says so when it is written (torch cannot rebuild the outputs in a process that never imported it)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    written = {}

    def compile_and_package(program, package_path, inductor_configs):  # the compile itself is tested above
        written.update(inductor_configs["aot_inductor.metadata"])
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    fxsketch.package(model, tmp_path / "bert.pt2", ids, progress=False)
    assert json.loads(written["fxsketch_output_modules"]) == ["transformers.modeling_outputs"]
    assert "import transformers.modeling_outputs" in caplog.text
