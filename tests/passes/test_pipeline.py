"""The pass registry and pipeline: specs, option validation, reports, verify, custom passes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Annotated, Literal

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxpress import passes
from onnxpress.errors import PassError, PassOptionError, UnknownPassError, VerificationError
from onnxpress.passes.registry import Range


@pytest.fixture
def scale_pass():
    @passes.register("test_scale_weights")
    def scale_weights(model, ctx, *, factor: Annotated[float, Range(0, 10)] = 1.0,
                      only: list[str] | None = None,
                      mode: Literal["all", "first"] = "all", dry_run: bool = False):
        """Multiply float initializers by `factor` (a deliberately lossy test pass)."""
        if dry_run:
            return model
        for t in model.graph.initializer:
            if only and t.name not in only:
                continue
            if t.data_type == onnx.TensorProto.FLOAT:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, t.name))
            if mode == "first":
                break
        ctx.record(scaled_by=factor)
        return model

    yield scale_weights
    passes.unregister("test_scale_weights")


def test_spec_forms_are_equivalent(scale_pass):
    forms = [
        "dce,test_scale_weights:factor=2,mode=first",
        ["dce", "test_scale_weights:factor=2,mode=first"],
        ["dce", "test_scale_weights:2,mode=first"],
        ["dce", {"name": "test_scale_weights", "factor": 2, "mode": "first"}],
        ["dce", {"test_scale_weights": {"factor": "2", "mode": "first"}}],
        ["dce", ("test_scale_weights", {"factor": 2.0, "mode": "first"})],
    ]
    resolved = [[(s.name, s.options) for s in passes.parse_pipeline(f)] for f in forms]
    assert all(r == resolved[0] for r in resolved)
    assert resolved[0][1] == ("test_scale_weights",
                              {"factor": 2.0, "mode": "first", "only": None, "dry_run": False})


def test_list_options_and_colons_in_values(scale_pass):
    (step,) = passes.parse_pipeline("test_scale_weights:only=W+B,dry_run=yes")
    assert step.options["only"] == ["W", "B"] and step.options["dry_run"] is True


@pytest.mark.parametrize("spec,error,message", [
    ("dce,no_such_pass", UnknownPassError, "unknown pass 'no_such_pass'.*registered passes: .*dce"),
    ("fold_constnts", UnknownPassError, "did you mean 'fold_constants'"),
    ("test_scale_weights:factor=abc", PassOptionError, "option 'factor'.*'abc'.*float"),
    ("test_scale_weights:factor=11", PassOptionError, "out of range"),
    ("test_scale_weights:mode=last", PassOptionError, "not one of all, first"),
    ("test_scale_weights:colour=red", PassOptionError, "no option 'colour'; valid options: factor, only, mode, dry_run"),
    ("dce:1", PassOptionError, "takes no options"),
    ("factor=2", PassOptionError, "before any pass name"),
])
def test_bad_specs_fail_before_anything_runs(scale_pass, digits_cnn, spec, error, message):
    calls = []

    @passes.register("test_spy", replace=True)
    def spy(model, ctx):
        calls.append(1)
        return model

    with pytest.raises(error, match=message):
        passes.apply(digits_cnn, ["test_spy", spec])
    assert not calls, "no pass may run when the pipeline is invalid"
    passes.unregister("test_spy")


def test_reports_and_same_kind_returned(scale_pass, digits_cnn):
    result = passes.run(digits_cnn, ["fold_constants", "dce", "test_scale_weights:0.5"])
    assert [r.name for r in result.reports] == ["fold_constants", "dce", "test_scale_weights"]
    last = result.reports[-1]
    assert last.figures == {"scaled_by": 0.5} and last.modified
    assert last.params_before == last.params_after == 38282
    assert last.nodes_before == last.nodes_after == 9
    assert last.bytes_after > 0 and last.seconds >= 0
    assert not result.reports[1].modified
    assert isinstance(passes.apply(digits_cnn, ["dce"]), onnx.ModelProto)
    as_bytes = passes.apply(digits_cnn.SerializeToString(), ["dce"])
    assert isinstance(as_bytes, bytes) and onnx.load_from_string(as_bytes) == digits_cnn


def test_caller_model_untouched_unless_inplace(scale_pass, digits_cnn_path):
    model = onnx.load(digits_cnn_path)
    before = model.SerializeToString()
    out = passes.apply(model, ["test_scale_weights:3"])
    assert model.SerializeToString() == before
    assert out.SerializeToString() != before
    same = passes.apply(model, ["test_scale_weights:3"], inplace=True)
    assert same is model and model.SerializeToString() != before


def test_verify_names_the_pass_that_broke_the_model(digits_cnn):
    @passes.register("test_break_outputs", replace=True)
    def break_outputs(model, ctx):
        """Pretends to be lossless but doubles the last bias."""
        t = model.graph.initializer[-1]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2 + 1, t.name))
        return model

    try:
        with pytest.raises(VerificationError, match="pass 'test_break_outputs' changed the model's outputs"):
            passes.run(digits_cnn, ["fold_constants", "dce", "test_break_outputs", "simplify"],
                       verify=True)
        ok = passes.run(digits_cnn, ["fold_constants", "dce", "simplify"], verify=True)
        assert all(r.verify and r.verify["ok"] and r.verify["max_abs"] == 0 for r in ok.reports)
    finally:
        passes.unregister("test_break_outputs")


def test_lossy_pass_error_is_reported_not_enforced(scale_pass, digits_cnn):
    passes.get("test_scale_weights").lossy = True
    result = passes.run(digits_cnn, ["test_scale_weights:1.5"], verify=True)
    v = result.reports[0].verify
    assert v["lossy"] and not v["ok"] and v["max_abs"] > 0.1


def test_pass_that_changes_io_is_caught(digits_cnn):
    @passes.register("test_rename_output", replace=True)
    def rename_output(model, ctx):
        model.graph.output[0].name = "renamed"
        model.graph.node[-1].output[0] = "renamed"
        return model

    try:
        with pytest.raises(PassError, match="changed the graph output names"):
            passes.apply(digits_cnn, ["test_rename_output"])
    finally:
        passes.unregister("test_rename_output")


def test_unexpected_exception_is_wrapped_with_the_pass_name(digits_cnn):
    @passes.register("test_crash", replace=True)
    def crash(model, ctx):
        raise ZeroDivisionError("boom")

    try:
        with pytest.raises(PassError, match="pass 'test_crash' failed: ZeroDivisionError: boom"):
            passes.apply(digits_cnn, ["test_crash"])
    finally:
        passes.unregister("test_crash")


def test_analyses_are_cached_and_invalidated(digits_cnn, scale_pass):
    calls = []

    @passes.register_analysis("test_counting")
    def counting(model, ctx):
        calls.append(1)
        return len(model.graph.node)

    @passes.register("test_reads_analysis", replace=True)
    def reads(model, ctx):
        ctx.analysis("test_counting", model)
        ctx.analysis("test_counting", model)
        return model

    try:
        passes.run(digits_cnn, ["test_reads_analysis", "dce", "test_reads_analysis"])
        assert len(calls) == 1, "dce changed nothing, so the cached analysis survives"
        calls.clear()
        passes.run(digits_cnn, ["test_reads_analysis", "test_scale_weights:2", "test_reads_analysis"])
        assert len(calls) == 2, "a pass that changed the model invalidates analyses"
    finally:
        passes.unregister("test_reads_analysis")


def test_decorated_pass_shows_in_cli_and_runs(tmp_path, digits_cnn_path):
    plugin = tmp_path / "my_passes.py"
    plugin.write_text(textwrap.dedent('''
        from onnxpress import passes

        @passes.register("my_pass")
        def my_pass(model, ctx, *, factor: float = 1.0):
            """Does nothing, factor times."""
            ctx.record(factor=factor)
            return model
    '''))
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import my_passes
        from onnxpress.cli import main
        sys.exit(main(sys.argv[1:]))
    ''')
    listing = subprocess.run([sys.executable, "-c", script, "passes"], capture_output=True,
                             text=True, env={"COLUMNS": "200", "PATH": ""})
    assert listing.returncode == 0, listing.stderr
    assert "my_pass" in listing.stdout and "factor: float = 1.0" in listing.stdout
    out = tmp_path / "out.onnx"
    run = subprocess.run([sys.executable, "-c", script, "optimize", str(digits_cnn_path),
                          "-p", "my_pass:2.5,dce", "-o", str(out), "-q"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert onnx.load(out).graph.output[0].name == "logits"


def test_entry_point_pass(tmp_path, digits_cnn_path):
    """A pass from an installed distribution's entry point group `onnxpress.passes`."""
    pkg = tmp_path / "site"
    (pkg / "ep_plugin").mkdir(parents=True)
    (pkg / "ep_plugin" / "__init__.py").write_text(textwrap.dedent('''
        def halve_nothing(model, ctx, *, level: int = 3):
            """A pass shipped by a third-party package."""
            ctx.record(level=level)
            return model
    '''))
    dist = pkg / "ep_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[onnxpress.passes]\nep_pass = ep_plugin:halve_nothing\n")
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(pkg)!r})
        from onnxpress.cli import main
        sys.exit(main(sys.argv[1:]))
    ''')
    listing = subprocess.run([sys.executable, "-c", script, "passes"], capture_output=True,
                             text=True, env={"COLUMNS": "200", "PATH": ""})
    assert listing.returncode == 0, listing.stderr
    assert "ep_pass" in listing.stdout and "level: int = 3" in listing.stdout
    assert "entry point ep_plugin:halve_nothing" in listing.stdout
    sys.path.insert(0, str(pkg))
    try:
        passes.reload_entry_points()
        result = passes.run(onnx.load(digits_cnn_path), ["ep_pass:7"])
        assert result.reports[0].figures == {"level": 7}
    finally:
        sys.path.remove(str(pkg))
        passes.unregister("ep_pass")


def test_named_pipeline_is_a_pass_with_its_passes_as_children(digits_cnn):
    result = passes.run(digits_cnn, ["cleanup"])
    report = result.reports[0]
    assert report.name == "cleanup"
    assert [c.name for c in report.children] == ["fold_constants", "dce", "simplify", "dce"]
    # the last inner pass's figures stay with it, not with the pipeline
    assert "nodes_removed" in report.children[-1].figures
    assert "nodes_removed" not in report.figures and report.figures["passes"] == 4
    assert report.to_dict()["children"][2]["name"] == "simplify"
    assert "└ simplify" in str(result.table())


_ = np


@pytest.mark.parametrize("kind", ["graphsurgeon", "onnx_ir", "graphproto"])
def test_apply_takes_and_returns_the_graph_objects_of_the_ecosystem(digits_cnn, digits, kind):
    """passes.apply(graph, [...]) on an onnx-graphsurgeon Graph, an onnx_ir Model or a
    GraphProto returns the same kind, optimized and computing the same outputs."""
    import onnx_graphsurgeon as gs
    import onnx_ir as ir

    from onnxpress.backends import ort

    given = {"graphsurgeon": lambda: gs.import_onnx(digits_cnn),
             "onnx_ir": lambda: ir.from_proto(digits_cnn),
             "graphproto": lambda: digits_cnn.graph}[kind]()
    out = passes.apply(given, ["cleanup", "fuse"])
    assert type(out) is type(given)
    proto = {"graphsurgeon": gs.export_onnx, "onnx_ir": ir.to_proto,
             "graphproto": lambda g: onnx.helper.make_model(
                 g, opset_imports=list(digits_cnn.opset_import))}[kind](out)
    proto.ir_version = digits_cnn.ir_version
    ops = [n.op_type for n in proto.graph.node]
    assert "FusedConv" in ops and len(ops) < len(digits_cnn.graph.node)
    x = digits.test[0][:4]
    np.testing.assert_allclose(ort.run(proto, {"input": x})["logits"],
                               ort.run(digits_cnn, {"input": x})["logits"], rtol=1e-4, atol=1e-5)


def test_a_custom_pass_that_mutates_its_input_cannot_change_the_callers_model(digits_cnn):
    @passes.register("test_mutating_pass", replace=True)
    def mutating(model, ctx):
        """Zeroes every initializer in place and returns nothing."""
        for t in model.graph.initializer:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))

    try:
        before = digits_cnn.SerializeToString(deterministic=True)
        out = passes.apply(digits_cnn, ["test_mutating_pass"])
        assert digits_cnn.SerializeToString(deterministic=True) == before
        assert all(not numpy_helper.to_array(t).any() for t in out.graph.initializer)
    finally:
        passes.unregister("test_mutating_pass")


def test_target_is_a_validated_choice(digits_cnn):
    with pytest.raises(PassOptionError, match="unknown target 'onnxruntime'.*ort, tvm, x86, arm, cuda"):
        passes.run(digits_cnn, ["dce"], target="onnxruntime")
    assert passes.run(digits_cnn, ["dce"], target="TVM").reports[0].name == "dce"


def test_the_pipeline_keeps_model_fields_a_custom_pass_drops(digits_cnn):
    """A pass that builds a fresh model (here through onnx-graphsurgeon, which drops metadata)
    gets the input's metadata, producer and graph name back from the pipeline; what the pass
    sets itself wins."""
    import onnx_graphsurgeon as gs

    @passes.register("test_rebuilding_pass", replace=True)
    def rebuild(model, ctx):
        """Round trip through onnx-graphsurgeon, plus one metadata entry of its own."""
        out = gs.export_onnx(gs.import_onnx(model))
        out.ir_version = model.ir_version
        del out.metadata_props[:]           # as rebuilding tools do
        out.producer_name = ""
        entry = out.metadata_props.add()
        entry.key, entry.value = "test.rebuilt", "yes"
        return out

    try:
        m = onnx.ModelProto()
        m.CopyFrom(digits_cnn)
        m.producer_name = "pytorch"
        assert list(m.metadata_props)
        out = passes.apply(m, ["test_rebuilding_pass"])
        meta = {p.key: p.value for p in out.metadata_props}
        assert {p.key: p.value for p in m.metadata_props}.items() <= meta.items()
        assert meta["test.rebuilt"] == "yes" and out.producer_name == "pytorch"
    finally:
        passes.unregister("test_rebuilding_pass")


def _reads_calibration(info, model) -> tuple[bool, BaseException | None]:
    """Run one pass with no calibration data on a context that notes every read of ctx.calib."""
    import copy
    import warnings

    from onnxpress.passes.context import PassContext

    class Watched(PassContext):
        def __getattribute__(self, name):
            if name == "calib":
                object.__setattr__(self, "calib_read", True)
            return super().__getattribute__(name)

    ctx = Watched()
    object.__setattr__(ctx, "calib_read", False)
    ctx._current_pass = info.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info.func(copy.deepcopy(model), ctx, **info.bind({}))
        raised = None
    except Exception as exc:  # noqa: BLE001 - what it raised is checked by the caller
        raised = exc
    return ctx.calib_read, raised


def test_every_pass_that_reads_calibration_declares_it(digits_cnn):
    """Each built-in pass is run without calibration data on a context that watches ctx.calib:
    one that reads it declares requires=("calib",) (and then fails without it, naming itself)
    or uses=("calib",); one that declares it reads it."""
    from onnxpress.errors import CalibrationError

    builtin = [p for p in passes.list_passes()
               if p.source == "builtin" and p.func.__module__ != "onnxpress.passes.pipelines"]
    assert {"prune", "quant_int8", "quant_auto", "clip", "fp16", "distill"} <= {p.name for p in builtin}
    for info in builtin:
        read, raised = _reads_calibration(info, digits_cnn)
        assert read == info.reads("calib"), (info.name, read, info.requires, info.uses, raised)
        if "calib" in info.requires:
            assert isinstance(raised, CalibrationError) and f"'{info.name}'" in str(raised), \
                (info.name, raised)
        else:
            assert not isinstance(raised, CalibrationError), (info.name, raised)


def test_a_named_pipeline_declares_what_its_passes_do(digits_cnn):
    """A named pipeline is lossy, needs and uses calibration data as its passes do, so verify
    and the early calibration check treat it like its passes."""
    passes.register_pipeline("test_lossy_pipeline", ["cleanup", "prune:0.5", "quant_int8"])
    try:
        info = passes.get("test_lossy_pipeline")
        assert info.lossy and info.requires == ("calib",) and info.uses == ()
        assert not passes.get("cleanup").lossy and not passes.get("cleanup").reads("calib")
        from onnxpress.errors import CalibrationError

        # bad calibration data fails before the first pass runs, whichever pass reads it
        with pytest.raises(CalibrationError, match="unknown name"):
            passes.run(digits_cnn, ["fuse", "prune:0.5"],
                       calib=[{"pixels": np.zeros((1, 1, 8, 8), np.float32)}])
    finally:
        passes.unregister("test_lossy_pipeline")
