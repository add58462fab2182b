"""Run a compiled onnxpress artifact with the TVM runtime alone (numpy + apache-tvm).

Copied into every artifact as run.py, so a board (or qemu-aarch64) needs no onnxpress:

    python run.py ARTIFACT_DIR --inputs in.npz --outputs out.npz [--bench RUNS]
"""

import argparse
import json
import os
import sys


def load(artifact_dir, device=None):
    with open(os.path.join(artifact_dir, "manifest.json")) as f:
        manifest = json.load(f)
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        # TVM's default is half the logical CPUs (it assumes hyper-threading): use them all,
        # capped by the cores the artifact was compiled for
        cores = manifest["target"].get("spec", {}).get("num-cores") or os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(max(1, min(int(cores), os.cpu_count() or 1)))
    import tvm
    from tvm.runtime.vm import VirtualMachine

    lib = tvm.runtime.load_module(os.path.join(artifact_dir, manifest["library"]))
    dev = device or (tvm.cuda(0) if manifest["target"]["family"] == "gpu" else tvm.cpu(0))
    return manifest, VirtualMachine(lib, dev), dev


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", nargs="?", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--outputs")
    ap.add_argument("--bench", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)

    import numpy as np
    import tvm

    manifest, vm, dev = load(args.artifact)
    feeds = np.load(args.inputs)
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(feeds[i["name"]]), dev) for i in manifest["inputs"]]
    result = vm["main"](*tensors)
    outs = [result] if hasattr(result, "numpy") else list(result)
    if args.outputs:
        np.savez(args.outputs, **{o["name"]: t.numpy() for o, t in zip(manifest["outputs"], outs)})
    if args.bench:
        vm.set_input("main", *tensors)
        timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=args.bench,
                                  min_repeat_ms=0)
        for _ in range(args.warmup):
            vm.invoke_stateful("main")
        res = timer("main")
        print(json.dumps({"times_ms": [r * 1e3 for r in res.results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
