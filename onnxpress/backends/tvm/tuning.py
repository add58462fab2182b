"""MetaSchedule tuning with an on-disk database shared by every compile.

    fused Relax module --extract--> tasks --skip those the DB already holds--> hottest first
      --tune (in-process builder, local or RPC runner, progress bar)--> DB (JSON, appended as it goes)

A workload seen before, by any model, is never tuned again: the database is keyed by the
PrimFunc's structure. Records are committed after every measured batch, so an interrupted run
resumes where it stopped (a task with fewer records than its budget is tuned further).

      --confirm (default schedule vs the search's best few, interleaved rounds)--> DB/confirmed

The search measures each candidate once, at whatever moment its batch ran, and keeps the
lowest figure: on a shared machine that is a draw of the noise as much as of the schedule.
resnet18 on a 2-core Zen 3 (461 trials): the default schedule of its 512-channel conv measured
2.42 ms at the start of the search, a candidate 2.10 ms later on, and the database picked the
candidate; timed side by side they were 1.61 and 2.07 ms. Every model the bench tuned came
out slower end to end than its defaults (resnet18 28.5 against 24.3 ms). So after the search
each task's default and its best candidates are timed again side by side, in rounds of the same
runner, and the winner by median goes to a second database (`confirmed/`) that compiles
consult first; a candidate must beat the default by CONFIRM_MARGIN to replace it.
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
CONFIRMED = "confirmed"    # sub-directory of a tuning DB: one side-by-side winner per workload
CONFIRM_TOP_K = 3          # the search's best candidates timed against the default
CONFIRM_ROUNDS = 4         # interleaved rounds; each candidate's figure is its median
CONFIRM_MARGIN = 0.02      # a candidate replaces the default only when this much faster


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
    cost_model: str = "xgb"        # "random" where xgboost is not installed (see cost_model())
    # task name -> the search's lowest single measurement (ms): its pick, before confirmation
    best_ms: dict = dataclasses.field(default_factory=dict)
    previous_trials: int = 0       # budget already spent on this model and target in this DB
    default_ms: dict = dataclasses.field(default_factory=dict)  # task -> untuned latency (ms)
    # task -> {"default_ms", "tuned_ms" (the best candidate's), "kept": "tuned" | "default"},
    # timed side by side after the search (see confirm_winners)
    confirmed: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cost_model() -> str:
    """MetaSchedule's cost model: its XGBoost model ranks the candidates it measures next. Where
    xgboost (or the scipy it imports) is missing, e.g. a GPU host that carries TVM without the
    `tvm` extra, tuning still runs on a random model (every candidate measured is as likely as
    any other), which needs more trials to find the same kernels; the summary and a warning
    say so."""
    try:
        import xgboost  # noqa: F401
    except ImportError as exc:
        import logging

        logging.getLogger("onnxpress.tvm").warning(
            "xgboost is not importable (%s): tuning picks candidates without a cost model, so it "
            "needs more trials for the same result; pip install 'onnxpress[tvm]' to install it",
            _first_line(exc))
        return "random"
    return "xgb"


def open_database(db: str | os.PathLike | None):
    from tvm.s_tir import meta_schedule as ms

    if db is None:
        return None
    path = Path(db)
    path.mkdir(parents=True, exist_ok=True)
    try:
        from . import amx
        from .int8_kernels import register_all_intrinsics

        register_all_intrinsics()     # before the records that tensorize with them are read
        for records in path.glob("*.json"):
            amx.register_named(records.read_text(errors="replace"))
        return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")
    except Exception as exc:
        raise BackendError(f"cannot open the tuning database in {path}: {_first_line(exc)}") from None


LEDGER = "onnxpress_budget.json"


def open_confirmed(db_dir):
    """The database of side-by-side winners inside tuning DB `db_dir` (None without a DB)."""
    return None if db_dir is None else open_database(Path(db_dir) / CONFIRMED)


def database_for_compile(database, confirmed):
    """What a compile applies: the confirmed winner of a workload where there is one, else the
    search database's best (records from before confirmation existed, or a task it skipped)."""
    if database is None or confirmed is None:
        return database
    from tvm.s_tir import meta_schedule as ms

    return ms.database.OrderedUnionDatabase(confirmed, database)


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

    device = "cuda" if target.kind.name == "cuda" else "cpu"
    if device == "cuda":
        from .int8_cuda import gpu_default_schedule as default_of
    else:
        from .schedules import default_schedule, vector_tile

        lanes = vector_tile(target)

        def default_of(func, target):
            return default_schedule(func, target, lanes=lanes)
    for task in tasks:
        mod = task.dispatched[0]
        try:
            sch = default_of(mod["main"], target)
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
            records.append((task.task_name, mod, sch.trace, secs))
            summary.default_ms[task.task_name] = 1e3 * sum(secs) / len(secs)
        except Exception:  # the default is a fallback, never a reason to fail tuning
            continue
    return records


def commit_default_records(records, target, database) -> None:
    from tvm.s_tir import meta_schedule as ms

    for _name, mod, trace, secs in records:
        try:
            database.commit_tuning_record(ms.database.TuningRecord(
                trace, database.commit_workload(mod), secs, target,
                ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        except Exception:
            continue


def _trace_key(trace) -> str:
    return json.dumps(trace.as_json(), sort_keys=True, default=str)


def _candidates(task, default_trace, database, confirmed) -> list:
    """[(label, trace)]: the default schedule, the confirmed winner of an earlier run and the
    search's best few, each trace once."""
    mod = task.dispatched[0]
    found = [("default", default_trace)] if default_trace is not None else []
    for label, db, k in (("confirmed", confirmed, 1), ("tuned", database, CONFIRM_TOP_K)):
        if db is not None and db.has_workload(mod):
            found += [(label, r.trace) for r in db.get_top_k(db.commit_workload(mod), k)]
    seen, out = set(), []
    for label, trace in found:
        key = _trace_key(trace)
        if key not in seen:
            seen.add(key)
            out.append((label, trace))
    return out


def _time_side_by_side(mod, candidates, target, builder, runner, device: str) -> list:
    """Median seconds of each candidate over CONFIRM_ROUNDS interleaved rounds (None: failed)."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    inputs = []
    for _label, trace in candidates:
        sch = s_tir.Schedule(mod)
        trace.apply_to_schedule(sch, remove_postproc=False)
        inputs.append((sch.mod, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
    built = builder.build([ms.builder.BuilderInput(m, target) for m, _ in inputs])
    runs = [(i, ms.runner.RunnerInput(b.artifact_path, device, args))
            for i, (b, (_, args)) in enumerate(zip(built, inputs)) if not b.error_msg]
    secs: list[list[float]] = [[] for _ in candidates]
    for r in range(CONFIRM_ROUNDS):
        order = runs[r % len(runs):] + runs[:r % len(runs)] if runs else []
        futures = runner.run([inp for _, inp in order])
        for (i, _), fut in zip(order, futures):
            res = fut.result()
            if not res.error_msg and res.run_secs:
                secs[i].append(sum(float(x) for x in res.run_secs) / len(res.run_secs))
    for b in built:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    return [sorted(s)[len(s) // 2] if len(s) == CONFIRM_ROUNDS else None for s in secs]


def confirm_winners(tasks, defaults, target, database, confirmed, builder, runner,
                    summary: TuneSummary, bar=None) -> None:
    """Time each task's default schedule and the search's best candidates side by side and
    commit the winner to `confirmed` (see the module docstring). A task whose default never
    built keeps the search's own pick; a failure here never fails tuning."""
    from tvm.s_tir import meta_schedule as ms

    default_records = {name: (trace, secs) for name, _mod, trace, secs in defaults}
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    for task in tasks:
        if bar is not None:
            bar.set_postfix_str(task.task_name[:28])
        mod = task.dispatched[0]
        try:
            default_trace, default_secs = default_records.get(task.task_name, (None, None))
            cands = _candidates(task, default_trace, database, confirmed)
            if not cands or cands[0][0] != "default":
                continue
            if len(cands) == 1:      # the search found nothing else: its measurement stands
                chosen, secs = 0, [sorted(default_secs)[len(default_secs) // 2]]
            else:
                secs = _time_side_by_side(mod, cands, target, builder, runner, device)
                if secs[0] is None:
                    continue
                rivals = [i for i in range(1, len(cands)) if secs[i] is not None]
                best = min(rivals, key=lambda i: secs[i], default=None)
                chosen = best if best is not None and secs[best] < secs[0] * (1 - CONFIRM_MARGIN) else 0
                summary.confirmed[task.task_name] = {
                    "default_ms": round(secs[0] * 1e3, 4),
                    "tuned_ms": None if best is None else round(secs[best] * 1e3, 4),
                    "kept": "default" if chosen == 0 else "tuned"}
            confirmed.commit_tuning_record(ms.database.TuningRecord(
                cands[chosen][1], confirmed.commit_workload(mod), [secs[chosen]], target,
                ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        except Exception:   # noqa: BLE001 -- the search's own pick stands for this task
            continue
        finally:
            if bar is not None:
                bar.update(1)


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
         work_dir: str | None = None, seed: int = 0, db_dir: str | None = None,
         confirmed=None) -> TuneSummary:
    """Tune the hottest tasks of a fused Relax module into `database` with at most `trials` trials,
    then confirm each task's winner side by side into `confirmed` (CPU targets, where given)."""
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
    from .int8_cuda import gpu_space_generator
    from .int8_kernels import has_int8_conv
    from .schedules import cpu_space_generator, tune_context

    contexts, weights = [], []
    for i, task in enumerate(selected):
        space = cpu_space_generator() if resolved.family == "cpu" else gpu_space_generator()
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
    # CPU: onnxpress's default schedules; GPU: dlight's (the dp4a kernels are never tasks)
    defaults = measure_default_schedules(selected, target, database, builder, runner, summary)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=min(trials, per_task * len(selected)), desc="tuning", unit="trial",
                   dynamic_ncols=True, leave=True)
    callbacks = [ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact(),
                 ms.measure_callback.UpdateCostModel(),
                 make_progress_callback(bar, names, summary)]
    summary.cost_model = cost_model()
    try:
        ms.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=work,
            max_trials_global=min(trials, per_task * len(selected)), max_trials_per_task=per_task,
            num_trials_per_iter=min(64, per_task), builder=builder,
            runner=runner, database=database, cost_model=summary.cost_model, measure_callbacks=callbacks,
            task_scheduler="gradient" if len(selected) > 1 else "round-robin")
        commit_default_records(defaults, target, database)
        if defaults and confirmed is not None:
            if bar is not None:
                bar.close()
                bar = tqdm(total=len(selected), desc="confirming", unit="task",
                           dynamic_ncols=True, leave=True)
            confirm_winners(selected, defaults, target, database, confirmed, builder, runner,
                            summary, bar)
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"tuning failed: {_first_line(exc)}") from None
    finally:
        if bar is not None:
            bar.close()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    summary.tasks_tuned = len(selected)
    _ledger_add(db_dir, ledger_key, trials)
    summary.seconds = time.perf_counter() - start
    return summary
