"""ONNX export verified in onnxruntime, the export form of the selective scan, and the ORT backend of tag/embed.

Exports run on tiny configs of a representative subset (Kaldi frontend + ViT: AST; mel + selective scan: SSAM;
streaming step with state: SAT; the shipped default model, its DFT as matmuls; the cached on-the-fly export: the SAT
repo's ViT); every registered id is checked against the graph contract in eager mode.
``benchmarks/bench_export.py`` exports every family at full size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

import tympan  # noqa: E402
from tympan.cli import main  # noqa: E402
from tympan.export import (  # noqa: E402
    EMBEDDING_RTOL,
    PROBABILITY_ATOL,
    OnnxModel,
    cached_export,
    export_cache_path,
    example_samples,
    export_graph,
    export_onnx,
    onnx_tag_file,
    output_kind,
    verify_onnx,
)
from tympan.models.mamba import MambaMixer  # noqa: E402
from tympan.models.registry import create_test_model, list_models  # noqa: E402
from tympan.ops import selective_scan, selective_scan_export, selective_scan_reference  # noqa: E402


def _scan_inputs(grouped: bool, dtype=torch.float64, length: int = 29, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, d, n, groups = 2, 8, 3, 2

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    B = randn(b, groups, n, length) if grouped else randn(d, n)
    C = randn(b, groups, n, length) if grouped else randn(d, n)
    return dict(u=randn(b, d, length), delta=randn(b, d, length), A=-torch.rand(d, n, generator=g, dtype=dtype),
                B=B, C=C, D=randn(d), z=randn(b, d, length), delta_bias=randn(d))


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("gate", [True, False])
def test_export_scan_equals_reference(grouped, gate):
    args = _scan_inputs(grouped)
    if not gate:
        args["z"] = None
    y, last = selective_scan_export(**args, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = selective_scan_reference(**args, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, last_ref, rtol=1e-12, atol=1e-12)


def test_export_scan_equals_chunked_scan_in_float32():
    args = {k: v.float() for k, v in _scan_inputs(True, length=300).items()}
    torch.testing.assert_close(selective_scan_export(**args, delta_softplus=True),
                               selective_scan(**args, delta_softplus=True, backend="chunked"), rtol=1e-5, atol=1e-5)


def test_selective_scan_switches_to_the_export_form_while_exporting():
    mixer = MambaMixer(d_model=8, d_state=4).eval()
    hidden = torch.randn(2, 12, 8)
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(mixer, (hidden,), dynamic_shapes=({0: dim, 1: dim},), strict=False)
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert torch.ops.higher_order.scan in targets
    longer = torch.randn(2, 40, 8)  # the traced graph is not tied to the example's length
    torch.testing.assert_close(program.module()(longer), mixer(longer), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- exported families


@pytest.fixture(scope="module")
def ast_export(tmp_path_factory):
    torch.manual_seed(0)
    model = create_test_model("ast-tiny224").eval()
    report = export_onnx(model, tmp_path_factory.mktemp("ast") / "ast.onnx")
    return model, report


@pytest.fixture(scope="module")
def sat_export(tmp_path_factory):
    torch.manual_seed(0)
    model = create_test_model("sat-tiny-2s").eval()
    report = verify_onnx(model, export_onnx(model, tmp_path_factory.mktemp("sat") / "sat.onnx"))
    return model, report


@pytest.fixture(scope="module")
def tymnet_export(tmp_path_factory):
    model = tympan.load()  # the shipped default model
    report = verify_onnx(model, export_onnx(model, tmp_path_factory.mktemp("tymnet") / "tymnet-s.onnx"))
    return model, report


def test_default_model_exports_its_frontend_as_matmuls(tymnet_export):
    """The shipped default's step graph verifies, and its DFT is a matmul with the basis, not ONNX's DFT op (which
    took 1.1 ms of onnxruntime's 2.9 ms per step) and its frames are not gathered."""
    model, report = tymnet_export
    assert report.ok and report.kind == "streaming", report.failures
    ops = {n.op_type for n in onnx.load(report.path).graph.node}
    assert not ops & {"DFT", "STFT"} and "MatMul" in ops


def test_ast_export_contract_and_metadata(ast_export):
    model, report = ast_export
    proto = onnx.load(report.path)
    assert [i.name for i in proto.graph.input] == ["waveform"]
    assert [o.name for o in proto.graph.output] == ["probabilities", "embedding"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param and not d.dim_value for d in dims)  # batch and samples are dynamic
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["tympan.model_id"] == "ast-tiny224"
    assert meta["tympan.version"] == tympan.__version__
    assert meta["tympan.sample_rate"] == "16000"
    assert meta["tympan.output_kind"] == "tagging"
    assert json.loads(meta["tympan.labels"]) == list(model.labels.mids)
    assert len({n.op_type for n in proto.graph.node} & {"DFT", "STFT"}) == 1  # the Kaldi FFT inside the graph


def test_ast_export_verifies_on_unseen_lengths(ast_export):
    model, report = ast_export
    verify_onnx(model, report)
    assert report.ok, report.failures
    assert report.example_samples not in report.lengths and len(report.lengths) == 2
    assert report.max_abs_diff["probabilities"] <= PROBABILITY_ATOL
    assert report.max_rel_diff["embedding"] <= EMBEDDING_RTOL
    assert report.torch_seconds > 0 and report.ort_seconds > 0


def test_verification_reports_a_graph_that_does_not_match(ast_export):
    _, report = ast_export
    torch.manual_seed(1)
    other = create_test_model("ast-tiny224").eval()  # same architecture, other weights than the exported ones
    wrong = verify_onnx(other, type(report)(**{**vars(report), "failures": [], "max_abs_diff": {}, "max_rel_diff": {}}))
    assert wrong.ok is False
    assert any(f.startswith("probabilities") for f in wrong.failures)


def test_ssam_export_runs_the_scan_as_one_onnx_scan(tmp_path):
    torch.manual_seed(0)
    model = create_test_model("ssam-tiny").eval()
    report = verify_onnx(model, export_onnx(model, tmp_path / "ssam.onnx"))
    assert report.ok, report.failures
    assert report.kind == "embedding" and list(report.max_abs_diff) == ["embedding"]
    ops = [n.op_type for n in onnx.load(report.path).graph.node]
    assert ops.count("Scan") == len(model.block_modules())


def test_sat_step_export_carries_the_state(sat_export):
    model, report = sat_export
    assert report.ok, report.failures
    assert report.kind == "streaming" and len(report.lengths) == 4  # three full steps, then a short one
    runner = OnnxModel(report.path)
    assert runner.streaming and runner.chunk_samples == model.chunk_samples
    (state,) = model.init_state(2)
    (stored,) = runner.init_state(2)
    np.testing.assert_allclose(stored, state.numpy(), rtol=1e-6, atol=1e-6)
    # two streams in one batch: the graph's batch axis is dynamic
    chunk = torch.randn(2, 32000, generator=torch.Generator().manual_seed(3)) * 0.1
    probs, new_state = runner.step(chunk, [stored])
    logits, (expected_state,) = model.step(chunk, (state,))
    np.testing.assert_allclose(probs.numpy(), model.probabilities(logits).detach().numpy(), atol=PROBABILITY_ATOL)
    np.testing.assert_allclose(new_state[0], expected_state.detach().numpy(), rtol=1e-3, atol=1e-4)


def _top(probs: torch.Tensor, k: int = 5) -> list[int]:
    return probs.topk(k).indices.tolist()


def _esc10_clips(data_dir, count: int) -> list:
    return sorted((data_dir / "esc10" / "audio").glob("*.flac"))[:: 320 // count][:count]


def test_onnx_tagging_gives_the_same_tags_on_esc10(ast_export, sat_export, tymnet_export, data_dir):
    from tympan.inference.tagging import tag_file

    for model, report in (ast_export, sat_export, tymnet_export):
        runner = OnnxModel(report.path)
        for clip in _esc10_clips(data_dir, 3):
            expected = tag_file(model, clip)
            got = onnx_tag_file(runner, clip)
            assert (got.starts, got.ends) == (expected.starts, expected.ends)
            np.testing.assert_allclose(got.timeline.numpy(), expected.timeline.numpy(), atol=PROBABILITY_ATOL)
            assert _top(got.probs) == _top(expected.probs)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_test_model("audiotransformer-tiny", target_length=512).eval()  # a 5 s ESC-10 clip is one window
    return tympan.save(model, tmp_path_factory.mktemp("vit") / "vit.safetensors")


def test_cli_tag_backend_onnx_exports_into_the_cache(vit_checkpoint, onnx_cache, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("TYMPAN_CACHE", str(onnx_cache))
    clips = [str(c) for c in _esc10_clips(data_dir, 2)]
    common = ["--model", "audiotransformer-tiny", "--checkpoint", str(vit_checkpoint), "--format", "json"]
    capsys.readouterr()
    assert main(["tag", *clips, *common]) == 0
    torch_records = json.loads(capsys.readouterr().out)
    assert main(["tag", *clips, *common, "--backend", "onnx"]) == 0
    onnx_records = json.loads(capsys.readouterr().out)
    assert len(list((onnx_cache / "onnx").glob("*.onnx"))) == 1
    for expected, got in zip(torch_records, onnx_records, strict=True):
        assert [t["mid"] for t in got["chunks"][0]["tags"]] == [t["mid"] for t in expected["chunks"][0]["tags"]]
        for a, b in zip(got["chunks"][0]["tags"], expected["chunks"][0]["tags"]):
            assert abs(a["probability"] - b["probability"]) <= PROBABILITY_ATOL
    assert main(["tag", *clips, *common, "--backend", "onnx"]) == 0  # second run: the cached file
    assert json.loads(capsys.readouterr().out) == onnx_records


def test_cli_embed_backend_onnx_matches_pytorch(vit_checkpoint, onnx_cache, data_dir, tmp_path, monkeypatch):
    from tympan.eval.probe import load_embeddings

    monkeypatch.setenv("TYMPAN_CACHE", str(onnx_cache))  # the graph the tag test exported
    clips = _esc10_clips(data_dir, 3)
    datafile = tmp_path / "clips.json"
    datafile.write_text(json.dumps({"data": [{"wav": str(c), "labels": "x", "fold": 1} for c in clips]}))
    common = ["embed", str(datafile), "--model", "audiotransformer-tiny", "--checkpoint", str(vit_checkpoint), "--quiet"]
    assert main([*common, "-o", str(tmp_path / "torch.safetensors")]) == 0
    assert main([*common, "-o", str(tmp_path / "onnx.safetensors"), "--backend", "onnx"]) == 0
    expected, got = (load_embeddings(tmp_path / f"{n}.safetensors") for n in ("torch", "onnx"))
    assert got.keys == expected.keys
    scale = np.abs(expected.embeddings).max()
    assert np.abs(got.embeddings - expected.embeddings).max() <= EMBEDDING_RTOL * scale


def test_cached_export_is_keyed_by_the_weights(tmp_path):
    torch.manual_seed(0)
    model = create_test_model("audiotransformer-tiny").eval()
    first = export_cache_path(model, tmp_path)
    with torch.no_grad():
        model.outputlayer[1].bias.add_(1.0)
    second = export_cache_path(model, tmp_path)
    assert second != first and first.parent == second.parent == tmp_path
    assert cached_export(model, directory=tmp_path) == second and second.is_file() and not first.exists()
    x = torch.zeros(1, 16000) + 0.01
    np.testing.assert_allclose(OnnxModel(second).probabilities(x).numpy(), model.predict(x).detach().numpy(),
                               atol=PROBABILITY_ATOL)


# ---------------------------------------------------------------------------------------------- every registered id


@pytest.mark.parametrize("model_id", list_models())
def test_every_model_offers_the_graph_contract(model_id):
    """What the exporter traces runs for every registered id on its example, with the contract's outputs."""
    torch.manual_seed(0)
    model = create_test_model(model_id).eval()
    samples = example_samples(model)
    assert samples >= 2 * model.min_samples
    graph = export_graph(model)
    x = torch.randn(2, samples) * 0.1
    with torch.no_grad():
        if output_kind(model) == "streaming":
            probs, *state = graph(x, *model.init_state(2))
            assert len(state) == len(model.init_state(2))
        else:
            outputs = graph(x)
            probs = outputs[0] if model.has_head else None
            assert outputs[-1].shape == (2, model.embedding_size)
    if probs is not None:
        assert probs.shape == (2, model.num_classes)
        assert bool(((probs >= 0) & (probs <= 1)).all())


def test_cli_export_writes_a_verified_file(tmp_path, capsys):
    out = tmp_path / "vit.onnx"
    tiny = ["--set", "embed_dim=16", "--set", "depth=1", "--set", "num_heads=1", "--set", "target_length=256"]
    assert main(["export", "--model", "audiotransformer-tiny", "--random", *tiny, "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["model_id"] == "audiotransformer-tiny" and out.is_file()
    assert set(report["max_abs_diff"]) == {"probabilities", "embedding"} and report["speedup"] > 0
    sat = ["--model", "sat-tiny-2s", "--random", *tiny[:6]]
    capsys.readouterr()
    assert main(["export", *sat, "--no-frontend", "-o", str(tmp_path / "sat.onnx")]) == 2
    assert "streaming model exports its waveform step" in capsys.readouterr().err
