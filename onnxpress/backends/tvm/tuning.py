"""MetaSchedule tuning with an on-disk database shared by every compile.

    fused Relax module --extract--> tasks --skip those the DB already holds--> hottest first
      --tune (in-process builder, local or RPC runner, progress bar)--> DB (JSON, appended as it goes)

A workload seen before, by any model, is never tuned again: the database is keyed by the
PrimFunc's structure. Records are committed after every measured batch, so an interrupted run
resumes where it stopped (a task with fewer records than its budget is tuned further).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from onnxpress.errors import BackendError

from .targets import ResolvedTarget, _first_line, physical_cores

MIN_TRIALS_PER_TASK = 16


@dataclasses.dataclass
class TuneSummary:
    trials_requested: int = 0
    trials_measured: int = 0
    tasks_total: int = 0
    tasks_tuned: int = 0
    tasks_from_db: int = 0
    tasks_skipped_budget: int = 0
    seconds: float = 0.0
    db: str | None = None
    runner: str = "local"
    best_ms: dict = dataclasses.field(default_factory=dict)     # task name -> best latency (ms)
    previous_trials: int = 0       # budget already spent on this model and target in this DB
    default_ms: dict = dataclasses.field(default_factory=dict)  # task -> untuned latency (ms)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def open_database(db: str | os.PathLike | None):
    from tvm.s_tir import meta_schedule as ms

    if db is None:
        return None
    path = Path(db)
    path.mkdir(parents=True, exist_ok=True)
    try:
        return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")
    except Exception as exc:
        raise BackendError(f"cannot open the tuning database in {path}: {_first_line(exc)}") from None


LEDGER = "onnxpress_budget.json"


def _ledger_key(mod, target) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}:{target}"


def _ledger_path(db_dir) -> Path | None:
    return Path(db_dir) / LEDGER if db_dir else None


def _ledger(db_dir) -> dict:
    path = _ledger_path(db_dir)
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _ledger_add(db_dir, key: str, trials: int) -> None:
    """Record the budget spent on one model+target, so a repeat compile does not tune again."""
    path = _ledger_path(db_dir)
    if path is None:
        return
    data = _ledger(db_dir)
    data[key] = max(int(data.get(key, 0)), int(trials))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _records(database, mod, target) -> int:
    if not database.has_workload(mod):
        return 0
    workload = database.commit_workload(mod)
    return len(database.get_top_k(workload, 1 << 20))


def _flops(mod) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod))
    except Exception:
        return 0.0


def cross_export(fcompile, workdir: str | None = None):
    """A MetaSchedule export function writing a shared library with `fcompile` (e.g. aarch64 gcc)
    into `workdir` (removed with the tuning run)."""

    def export(rt_mod) -> str:
        path = os.path.join(tempfile.mkdtemp(prefix="candidate-", dir=workdir), "candidate.so")
        rt_mod.export_library(path, fcompile=fcompile)
        return path

    return export


def make_in_process_builder(fcompile=None, workdir: str | None = None):
    """Build candidates in this process: LocalBuilder's workers spend ~17 s each importing
    tensor intrinsics before the first build, longer than a whole small tuning run."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    export = cross_export(fcompile, workdir)

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            from tvm.driver import build as tvm_build
            from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

            results = []
            for inp in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(inp.mod)
                    results.append(BuilderResult(export(tvm_build(mod, target=inp.target)), None))
                except Exception as exc:  # a bad candidate is a failed trial, not a failed tune
                    results.append(BuilderResult(None, _first_line(exc)))
            return results

    del ms
    return InProcessBuilder()


def measure_default_schedules(tasks, target, database, builder, runner, summary: TuneSummary) -> list:
    """Measure each task's default (untuned) schedule; committed to the database after the
    search, so the database's best for a task is never slower than the untuned build. (Seeding
    the search with them before it starts crashed MetaSchedule's mutators in 0.27.)"""
    records = []
    from tvm.s_tir import meta_schedule as ms

    from .schedules import default_schedule, vector_tile

    lanes = vector_tile(target)
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    for task in tasks:
        mod = task.dispatched[0]
        try:
            sch = default_schedule(mod["main"], target, lanes=lanes)
            if sch is None:
                continue
            built = builder.build([ms.builder.BuilderInput(sch.mod, target)])[0]
            if built.error_msg:
                continue
            args_info = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
            result = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args_info)])[0].result()
            if result.error_msg or not result.run_secs:
                continue
            secs = [float(x) for x in result.run_secs]
            records.append((mod, sch.trace, secs))
            summary.default_ms[task.task_name] = 1e3 * sum(secs) / len(secs)
        except Exception:  # the default is a fallback, never a reason to fail tuning
            continue
    return records


def commit_default_records(records, target, database) -> None:
    from tvm.s_tir import meta_schedule as ms

    for mod, trace, secs in records:
        try:
            database.commit_tuning_record(ms.database.TuningRecord(
                trace, database.commit_workload(mod), secs, target,
                ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        except Exception:
            continue


def make_progress_callback(bar, names: list[str], summary: TuneSummary):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            name = names[task_id]
            best_ms = summary.best_ms
            summary.trials_measured += len(runner_results)
            for res in runner_results:
                if res.run_secs is None or res.error_msg:
                    continue
                secs = [float(s) for s in res.run_secs]
                ms_ = 1e3 * sum(secs) / max(1, len(secs))
                if ms_ < best_ms.get(name, float("inf")):
                    best_ms[name] = ms_
            if bar is not None:
                bar.update(len(runner_results))
                bar.set_postfix_str(f"{name[:28]} best {best_ms.get(name, float('nan')):.3f} ms")

    return ProgressCallback()


def tune(mod, resolved: ResolvedTarget, target, *, trials: int, database, runner: Any = "local",
         runner_label: str = "local", fcompile=None, progress: bool = True,
         work_dir: str | None = None, seed: int = 0, db_dir: str | None = None) -> TuneSummary:
    """Tune the hottest tasks of a fused Relax module into `database` with at most `trials` trials."""
    from tvm.s_tir import meta_schedule as ms

    summary = TuneSummary(trials_requested=int(trials), runner=runner_label)
    start = time.perf_counter()
    ledger_key = _ledger_key(mod, target)
    spent = _ledger(db_dir).get(ledger_key, 0)
    if spent >= trials:
        # this model was already tuned for this target with at least this budget: nothing to do
        summary.tasks_from_db = -1
        summary.seconds = time.perf_counter() - start
        summary.previous_trials = spent
        return summary
    tasks = ms.relax_integration.extract_tasks(mod, target)
    summary.tasks_total = len(tasks)
    pending = []
    for task in tasks:
        func_mod = task.dispatched[0]
        if func_mod.attrs is not None and func_mod.attrs.get("tirx.is_scheduled", False):
            continue
        flops = _flops(func_mod) * max(1, int(task.weight))
        pending.append((flops, task))
    pending.sort(key=lambda x: -x[0])                       # hottest first
    # a workload already tuned (by this model or any other) is not tuned again
    per_task_budget = max(MIN_TRIALS_PER_TASK, trials // max(1, len(pending)))
    todo = []
    for _flops_of_task, task in pending:
        if _records(database, task.dispatched[0], target) >= min(per_task_budget, MIN_TRIALS_PER_TASK):
            summary.tasks_from_db += 1
        else:
            todo.append(task)
    n_fit = max(1, trials // MIN_TRIALS_PER_TASK) if trials > 0 else 0
    selected = todo[:n_fit]
    summary.tasks_skipped_budget = len(todo) - len(selected)
    if not selected or trials <= 0:
        _ledger_add(db_dir, ledger_key, trials)
        summary.seconds = time.perf_counter() - start
        return summary
    per_task = max(MIN_TRIALS_PER_TASK, trials // len(selected))
    own_dir = work_dir is None
    work = work_dir or tempfile.mkdtemp(prefix="onnxpress-tune-")
    from .int8_kernels import has_int8_conv
    from .schedules import cpu_space_generator, tune_context

    contexts, weights = [], []
    for i, task in enumerate(selected):
        space = cpu_space_generator() if resolved.family == "cpu" else ms.space_generator.PostOrderApply()
        # small budgets need no 512-strong population: the search itself would dominate
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=256 if per_task < 128 else 512, init_measured_ratio=0.2,
            init_min_unmeasured=32, genetic_num_iters=2 if per_task < 128 else 4)
        if resolved.family == "cpu" and has_int8_conv(task.dispatched[0]):
            # the int8 rule's spaces are whole schedules, one per register block, with no
            # random decisions: evolution cannot sample 32 distinct ones and gives up; replaying
            # the spaces measures each register block
            strategy = ms.search_strategy.ReplayTrace()
        contexts.append(tune_context(task.dispatched[0], task.target, space, task_name=task.task_name,
                                     search_strategy=strategy, rand_state=seed + i,
                                     num_threads=physical_cores()))
        weights.append(float(task.weight))
    names = [t.task_name for t in selected]
    builder = make_in_process_builder(fcompile, work)
    defaults = []
    if resolved.family == "cpu":
        defaults = measure_default_schedules(selected, target, database, builder, runner, summary)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=min(trials, per_task * len(selected)), desc="tuning", unit="trial",
                   dynamic_ncols=True, leave=True)
    callbacks = [ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact(),
                 ms.measure_callback.UpdateCostModel(),
                 make_progress_callback(bar, names, summary)]
    try:
        ms.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=work,
            max_trials_global=min(trials, per_task * len(selected)), max_trials_per_task=per_task,
            num_trials_per_iter=min(64, per_task), builder=builder,
            runner=runner, database=database, cost_model="xgb", measure_callbacks=callbacks,
            task_scheduler="gradient" if len(selected) > 1 else "round-robin")
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"tuning failed: {_first_line(exc)}") from None
    finally:
        if bar is not None:
            bar.close()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    commit_default_records(defaults, target, database)
    summary.tasks_tuned = len(selected)
    _ledger_add(db_dir, ledger_key, trials)
    summary.seconds = time.perf_counter() - start
    return summary
