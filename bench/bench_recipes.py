"""The built-in recipes on the models of docs/data.md: size, nodes, accuracy and latency reached.

    digits CNN (always): every available recipe; accuracy on the held-out digits
    MiniLM (full mode): lossless, int8-cpu, memory-lean; accuracy of the Debian descriptions task
        (logistic regression on the embeddings) and the minimum cosine to the fp32 embeddings

Latency: onnxruntime, 2 threads, before and after timed interleaved in the same run (median ms).
These are the figures docs/recipes.md quotes.
"""

from __future__ import annotations

import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _kib(n: int) -> float:
    return round(n / 1024, 1)


def _latency(before, after, feeds) -> tuple[float, float]:
    from onnxpress.backends import ort

    a, b = ort.benchmark_pair(before, after, feeds, runs=60, rounds=3, threads=2)
    return round(a.p50_ms, 4), round(b.p50_ms, 4)


def _digits_rows() -> list[dict]:
    from onnxpress import recipes, zoo

    path = zoo.digits_cnn()
    X, y = zoo.digits_data().test
    base_acc = zoo.accuracy(str(path), X, y)
    rows = []
    for r in recipes.builtins(available_only=True):
        t0 = time.perf_counter()
        res = recipes.run(r, str(path), calib=zoo.digits_calib())
        secs = time.perf_counter() - t0
        first, last = res.reports[0], res.reports[-1]
        lat_b, lat_a = _latency(str(path), res.model, {"input": X[:1]})
        plan = next((p.figures for p in res.reports if p.name == "reuse"), {})
        rows.append({
            "model": "digits CNN", "recipe": r.name,
            "KiB": f"{_kib(first.bytes_before)} -> {_kib(last.bytes_after)}",
            "size x": round(last.bytes_after / first.bytes_before, 3),
            "nodes": f"{first.nodes_before} -> {last.nodes_after}",
            "accuracy": f"{base_acc:.4f} -> {zoo.accuracy(res.model, X, y):.4f}",
            "ms batch 1": f"{lat_b} -> {lat_a}",
            "arena KiB": _kib(plan["arena_bytes"]) if "arena_bytes" in plan else "",
            "seconds": round(secs, 1)})
    return rows


def _minilm_rows() -> list[dict]:
    from onnxpress import recipes, zoo

    path = zoo.minilm()
    task = zoo.debian_task()
    tok = zoo.minilm_tokenizer()
    calib = [zoo.minilm_feeds(task.train_texts[i:i + 16], tokenizer=tok) for i in range(0, 128, 16)]
    tr_fp = zoo.embed(str(path), task.train_texts, tokenizer=tok)
    te_fp = zoo.embed(str(path), task.test_texts, tokenizer=tok)
    base_acc = zoo.text_task_accuracy(tr_fp, te_fp, task)
    feeds = zoo.minilm_feeds(task.test_texts[:1], max_length=64, pad_to_max=True, tokenizer=tok)
    rows = []
    for name in ("lossless", "int8-cpu", "memory-lean"):
        r = recipes.load(name, validate=False)
        if not r.available:
            continue
        t0 = time.perf_counter()
        res = recipes.run(r, str(path), calib=calib, shapes={"batch": 1, "seq": 64})
        secs = time.perf_counter() - t0
        tr = zoo.embed(res.model, task.train_texts, tokenizer=tok)
        te = zoo.embed(res.model, task.test_texts, tokenizer=tok)
        cos = np.sum(te * te_fp, axis=1) / (np.linalg.norm(te, axis=1) * np.linalg.norm(te_fp, axis=1))
        first, last = res.reports[0], res.reports[-1]
        lat_b, lat_a = _latency(str(path), res.model, feeds)
        plan = next((p.figures for p in res.reports if p.name == "reuse"), {})
        rows.append({
            "model": "MiniLM", "recipe": name,
            "KiB": f"{_kib(first.bytes_before)} -> {_kib(last.bytes_after)}",
            "size x": round(last.bytes_after / first.bytes_before, 3),
            "nodes": f"{first.nodes_before} -> {last.nodes_after}",
            "accuracy": f"{base_acc:.4f} -> {zoo.text_task_accuracy(tr, te, task):.4f} "
                        f"(min cos {float(cos.min()):.3f})",
            "ms batch 1": f"{lat_b} -> {lat_a}",
            "arena KiB": _kib(plan["arena_bytes"]) if "arena_bytes" in plan else "",
            "seconds": round(secs, 1)})
    return rows


def run(quick: bool) -> dict:
    rows = _digits_rows()
    if not quick:
        rows += _minilm_rows()
    return {
        "title": "Built-in recipes on real models",
        "rows": rows,
        "notes": "size is the serialized model; accuracy on held-out data (digits test split; Debian "
                 "descriptions test split through a logistic regression on the embeddings); latency "
                 "onnxruntime 2 threads, before and after interleaved in the same run, median ms. "
                 "The memory arena is planned for batch 1 (MiniLM: sequence 64). quick mode: digits only.",
    }
