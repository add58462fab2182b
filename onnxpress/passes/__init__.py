"""Graph passes and the pipeline that runs them.

    from onnxpress import passes
    model = passes.apply(model, ["fold_constants", "dce", "simplify"])
    result = passes.run(model, "fold_constants,dce", verify=True)   # result.model, result.reports

    @passes.register("my_pass")
    def my_pass(model, ctx, *, factor: float = 1.0):
        '''One line that `onnxpress passes` shows.'''
        return model
"""

from onnxpress.passes.context import PassContext, register_analysis
from onnxpress.passes.pipeline import (
    Instrument,
    PassReport,
    PassStep,
    PipelineResult,
    apply,
    parse_pipeline,
    register_pipeline,
    run,
)
from onnxpress.passes.registry import (
    PassInfo,
    Range,
    get,
    list_passes,
    register,
    reload_entry_points,
    unregister,
)

__all__ = [
    "apply", "run", "register", "unregister", "register_pipeline", "register_analysis",
    "list_passes", "get", "parse_pipeline", "reload_entry_points",
    "PassContext", "PassInfo", "PassReport", "PassStep", "PipelineResult", "Instrument", "Range",
]
