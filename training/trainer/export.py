"""Export a trained forecaster as ONE recurrent step in ONNX, checked against torch.

The graph is written op by op with ``onnx.helper`` (MatMul/Add/Sigmoid/Tanh/Mul,
weights pre-transposed, biases fused where torch's equations allow), normalises raw
``x`` itself, and follows :mod:`detector.artifact`. :func:`check_parity` runs it with
onnxruntime over a sequence against the torch model and raises above the tolerance.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from detector import __version__
from detector.artifact import (
    INPUT_NAME,
    LEVEL_STATE,
    METADATA_KEY,
    ModelMeta,
    Normalisation,
    expected_io,
    graph_sha256,
    read_artifact,
    state_names,
    state_shape,
)
from detector.errors import RnnsentryError
from training.trainer.model import (
    LOG_VAR_HALF_RANGE,
    LOG_VAR_MID,
    RecurrentForecaster,
    level_gain,
)

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # the IR of opset 17: readable by every onnxruntime rnnsentry supports
PARITY_TOLERANCE = 1e-4
# Where the network itself amplifies rounding (a model fitted to spikes, steep in places), two
# float32 evaluations of the same equations part by more than PARITY_TOLERANCE: the graph may
# differ from torch by this many times torch's own float32 error (against a float64 copy of
# the model), beyond the tolerance. onnxruntime's kernels round differently from torch's, so
# its error may be several times torch's (docs/quality-notes.md has what was measured); a
# wrong equation errs by orders of magnitude more than either.
FLOAT32_ROOM = 100.0
PARITY_MIN_STEPS = 1000
PARITY_MAX_STEPS = 4000
PARITY_CHECKPOINT = 250  # compare the states every this many steps


class ParityError(RnnsentryError):
    """The exported graph does not reproduce the torch model."""


class _Graph:
    """A tiny builder: initializers and nodes with generated, readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        array = np.array(value, dtype=dtype, order="C")  # keeps 0-d (ascontiguousarray would not)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs: Any) -> str:
        """Add a one-output node; its output is ``name`` or a generated one."""
        return self.split_op(op_type, *inputs, outputs=[name] if name else 1, **attrs)[0]

    def split_op(
        self, op_type: str, *inputs: str, outputs: int | list[str], **attrs: Any
    ) -> list[str]:
        """Add a node with several outputs (named, or that many generated names)."""
        self._count += 1
        names = (
            outputs
            if isinstance(outputs, list)
            else [f"{op_type.lower()}_{self._count}_{i}" for i in range(outputs)]
        )
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names


def _rnn_weights(model: RecurrentForecaster, layer: int) -> tuple[np.ndarray, ...]:
    """(W_ih, W_hh, b_ih, b_hh) of one layer as float32 numpy, torch's gate order."""
    rnn = model.rnn
    return tuple(
        getattr(rnn, f"{kind}_l{layer}").detach().cpu().numpy().astype(np.float32)
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    )


def _gru_layer(g: _Graph, xin: str, h: str, model: RecurrentForecaster, layer: int) -> str:
    """torch's GRU: r, z = σ(W_i x + b_i + W_h h + b_h); n = tanh(W_in x + b_in + r ⊙ (W_hn h
    + b_hn)); h' = (1 - z) n + z h. The r/z biases fuse; b_hn stays inside r's product."""
    w_ih, w_hh, b_ih, b_hh = _rnn_weights(model, layer)
    hs = model.hidden_size
    b_in = b_ih.copy()
    b_in[: 2 * hs] += b_hh[: 2 * hs]
    b_hid = np.concatenate([np.zeros(2 * hs, np.float32), b_hh[2 * hs :]])
    p = f"l{layer}."
    gi = g.op("Add", g.op("MatMul", xin, g.const(p + "W_i", w_ih.T)), g.const(p + "b_i", b_in))
    gh = g.op("Add", g.op("MatMul", h, g.const(p + "W_h", w_hh.T)), g.const(p + "b_h", b_hid))
    sizes = g.const(p + "split_rz_n", [2 * hs, hs], np.int64)
    gi_rz, gi_n = g.split_op("Split", gi, sizes, outputs=2, axis=1)  # (B, 2H), (B, H)
    gh_rz, gh_n = g.split_op("Split", gh, sizes, outputs=2, axis=1)
    rz = g.op("Sigmoid", g.op("Add", gi_rz, gh_rz))  # (B, 2H)
    r, z = g.split_op("Split", rz, g.const(p + "split_r_z", [hs, hs], np.int64), outputs=2, axis=1)
    n = g.op("Tanh", g.op("Add", gi_n, g.op("Mul", r, gh_n)))  # (B, H)
    return g.op("Add", n, g.op("Mul", z, g.op("Sub", h, n)))  # n + z (h - n)


def _lstm_layer(
    g: _Graph, xin: str, h: str, c: str, model: RecurrentForecaster, layer: int
) -> tuple[str, str]:
    """torch's LSTM (gates i, f, g, o): c' = f c + i g; h' = o tanh(c'). The columns are
    reordered to i, f, o | g so one Sigmoid and one Tanh cover all gates."""
    w_ih, w_hh, b_ih, b_hh = _rnn_weights(model, layer)
    hs = model.hidden_size
    order = np.concatenate(
        [np.arange(0, 2 * hs), np.arange(3 * hs, 4 * hs), np.arange(2 * hs, 3 * hs)]
    )
    p = f"l{layer}."
    xw = g.op("MatMul", xin, g.const(p + "W_i", w_ih[order].T))
    hw = g.op("MatMul", h, g.const(p + "W_h", w_hh[order].T))
    gates = g.op("Add", g.op("Add", xw, hw), g.const(p + "b", (b_ih + b_hh)[order]))  # (B, 4H)
    sig, cand = g.split_op(
        "Split", gates, g.const(p + "split_ifo_g", [3 * hs, hs], np.int64), outputs=2, axis=1
    )
    i, f, o = g.split_op(
        "Split",
        g.op("Sigmoid", sig),
        g.const(p + "split_i_f_o", [hs] * 3, np.int64),
        outputs=3,
        axis=1,
    )
    c_new = g.op("Add", g.op("Mul", f, c), g.op("Mul", i, g.op("Tanh", cand)))  # (B, H)
    return g.op("Mul", o, g.op("Tanh", c_new)), c_new


def _rnn_layer(g: _Graph, xin: str, h: str, model: RecurrentForecaster, layer: int) -> str:
    """torch's tanh RNN: h' = tanh(W_i x + W_h h + (b_i + b_h))."""
    w_ih, w_hh, b_ih, b_hh = _rnn_weights(model, layer)
    p = f"l{layer}."
    xw = g.op("MatMul", xin, g.const(p + "W_i", w_ih.T))
    hw = g.op("MatMul", h, g.const(p + "W_h", w_hh.T))
    return g.op("Tanh", g.op("Add", g.op("Add", xw, hw), g.const(p + "b", b_ih + b_hh)))


def build_step_graph(
    model: RecurrentForecaster, norm: Normalisation, name: str = "rnnsentry"
) -> onnx.ModelProto:
    """The one-step graph: x (B, F) raw, states (L, B, H) and the level (1, B, F) if the model
    has one -> mean, log_var, new states."""
    f, layers, hs, cell = model.n_features, model.layers, model.hidden_size, model.cell
    names = state_names(cell)
    g = _Graph()
    centre = g.const("norm.centre", norm.centre)
    scale = g.const("norm.scale", norm.scale)
    normalised = g.op("Div", g.op("Sub", INPUT_NAME, centre), scale)  # (B, F)
    xin = normalised
    new_states: dict[str, list[str]] = {s: [] for s in names}
    for layer in range(layers):
        index = g.const(f"l{layer}.index", layer, np.int64)  # a scalar: Gather drops axis 0
        prev = {s: g.op("Gather", s, index, axis=0) for s in names}  # (B, H) each
        if cell == "gru":
            out = _gru_layer(g, xin, prev["h"], model, layer)
        elif cell == "lstm":
            out, c_new = _lstm_layer(g, xin, prev["h"], prev["c"], model, layer)
            new_states["c"].append(c_new)
        else:
            out = _rnn_layer(g, xin, prev["h"], model, layer)
        new_states["h"].append(out)
        xin = out
    axes = g.const("axes0", [0], np.int64)
    for s in names:
        parts = new_states[s]
        if len(parts) == 1:
            g.op("Unsqueeze", parts[0], axes, name=s + "_out")
        else:
            stacked = [g.op("Unsqueeze", part, axes) for part in parts]
            g.op("Concat", *stacked, name=s + "_out", axis=0)  # (L, B, H)
    weight = model.head.proj.weight.detach().cpu().numpy().astype(np.float32)  # (2F, H)
    bias = model.head.proj.bias.detach().cpu().numpy().astype(np.float32)
    out = g.op("Add", g.op("MatMul", xin, g.const("head.W", weight.T)), g.const("head.b", bias))
    change, raw_log_var = g.split_op(
        "Split", out, g.const("head.split", [f, f], np.int64), outputs=2, axis=1
    )
    skipped = normalised
    if model.head.level_logit is not None:  # l' = l + gain (x - l), the level's own state
        gain = level_gain(model.head.level_logit).detach().cpu().numpy().astype(np.float32)
        level = g.op("Gather", LEVEL_STATE, g.const("level.index", 0, np.int64), axis=0)
        moved = g.op("Mul", g.const("level.gain", gain), g.op("Sub", normalised, level))
        skipped = g.op("Add", level, moved)  # (B, F)
        g.op("Unsqueeze", skipped, axes, name=LEVEL_STATE + "_out")  # (1, B, F)
    skip = model.head.skip.weight.detach().cpu().numpy().astype(np.float32)  # (F, F)
    g.op("Add", g.op("MatMul", skipped, g.const("head.skip", skip.T)), change, name="mean")
    mid, half = g.const("log_var.mid", LOG_VAR_MID), g.const("log_var.half", LOG_VAR_HALF_RANGE)
    squashed = g.op("Tanh", g.op("Div", g.op("Sub", raw_log_var, mid), half))
    g.op("Add", mid, g.op("Mul", half, squashed), name="log_var")

    shapes: dict[str, list[Any]] = {}
    for s in state_names(cell, model.skip):
        first, last = state_shape(s, layers, hs, f)
        shapes[s] = [first, "B", last]
    graph = helper.make_graph(
        g.nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["B", f])]
        + [helper.make_tensor_value_info(s, TensorProto.FLOAT, sh) for s, sh in shapes.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["B", f]) for o in ("mean", "log_var")]
        + [
            helper.make_tensor_value_info(s + "_out", TensorProto.FLOAT, sh)
            for s, sh in shapes.items()
        ],
        initializer=g.initializers,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="rnnsentry",
        producer_version=__version__,
    )
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto


def make_session(proto: onnx.ModelProto | bytes) -> ort.InferenceSession:
    data = proto if isinstance(proto, bytes) else proto.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_rollout(
    session: ort.InferenceSession, x: np.ndarray, keep_states_every: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[int, list[np.ndarray]]]:
    """Step x (B, T, F) raw through the graph from zero states, feeding the states back (the
    graph's state inputs, in its order and its shapes); (mean, log_var) (B, T, F) and, every
    ``keep_states_every`` steps, the states after that many steps."""
    batch, steps, _ = x.shape
    inputs = [a for a in session.get_inputs() if a.name != INPUT_NAME]
    names = [a.name for a in inputs]
    states = [np.zeros((a.shape[0], batch, a.shape[2]), np.float32) for a in inputs]
    outputs = ["mean", "log_var", *(s + "_out" for s in names)]
    means = np.empty(x.shape, np.float32)
    log_vars = np.empty(x.shape, np.float32)
    kept: dict[int, list[np.ndarray]] = {}
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    for t in range(steps):
        feeds = {INPUT_NAME: x32[:, t], **dict(zip(names, states, strict=True))}
        mean, log_var, *states = session.run(outputs, feeds)
        means[:, t], log_vars[:, t] = mean, log_var
        if keep_states_every and ((t + 1) % keep_states_every == 0 or t + 1 == steps):
            kept[t + 1] = [s.copy() for s in states]
    return means, log_vars, kept


def parity_sequence(
    streams: list[np.ndarray], min_steps: int = PARITY_MIN_STEPS, max_steps: int = PARITY_MAX_STEPS
) -> np.ndarray:
    """Held-out streams end to end, repeated up to ``min_steps``, at most ``max_steps``."""
    joined = np.concatenate([np.asarray(s, np.float64) for s in streams if len(s)], axis=0)
    repeats = -(-min_steps // len(joined))
    return np.tile(joined, (repeats, 1))[: max(min_steps, min(len(joined), max_steps))]


@torch.no_grad()
def check_parity(
    proto: onnx.ModelProto | bytes,
    model: RecurrentForecaster,
    norm: Normalisation,
    sequence: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Largest difference between onnxruntime and torch over ``sequence`` (raw, [T, F]).

    Runs a batch of two rows (the sequence and its time reversal), comparing mean and
    log_var at every step and the states every PARITY_CHECKPOINT steps. Differences are
    absolute, except that a value beyond 1 in magnitude is compared relative to its size:
    |a - b| / max(1, |b|). An LSTM cell state can settle at |c| ~ 100, and a prediction for
    data far outside the training range can reach hundreds of normalised units, where one
    float32 step is ~1e-5. Raises ParityError above ``tolerance`` plus FLOAT32_ROOM times
    torch's own float32 error on the sequence (the same comparison against a float64 copy of
    the model): how far rounding alone carries this network on these inputs.
    """
    x = np.stack([sequence, sequence[::-1]]).astype(np.float32)  # (2, T, F) raw
    session = make_session(proto)
    o_mean, o_log_var, o_states = onnx_rollout(session, x, PARITY_CHECKPOINT)
    model.eval()
    exact = copy.deepcopy(model).double()
    centre = torch.tensor(norm.centre, dtype=torch.float32)
    scale = torch.tensor(norm.scale, dtype=torch.float32)
    z = (torch.from_numpy(x) - centre) / scale  # (2, T, F): the graph's float32 arithmetic
    z64 = (torch.from_numpy(x).double() - centre.double()) / scale.double()
    worst, rounding, state, state64, start = 0.0, 0.0, None, None, 0
    for stop in sorted(o_states):
        mean, log_var, state = model(z[:, start:stop], state)  # (2, stop-start, F)
        worst = max(
            worst,
            _scaled_diff(mean.numpy(), o_mean[:, start:stop]),
            _scaled_diff(log_var.numpy(), o_log_var[:, start:stop]),
            *(_scaled_diff(s.numpy(), o) for s, o in zip(state, o_states[stop], strict=True)),
        )
        mean64, log_var64, state64 = exact(z64[:, start:stop], state64)
        rounding = max(
            rounding,
            _scaled_diff(mean64.numpy(), mean.numpy()),
            _scaled_diff(log_var64.numpy(), log_var.numpy()),
            *(_scaled_diff(a.numpy(), b.numpy()) for a, b in zip(state64, state, strict=True)),
        )
        start = stop
    allowed = tolerance + FLOAT32_ROOM * rounding
    if not worst <= allowed:
        raise ParityError(
            f"the exported ONNX step differs from the torch model by {worst:.3g} over"
            f" {x.shape[1]} steps (tolerance {allowed:.3g}: {tolerance:g}, and"
            f" {FLOAT32_ROOM:g} times torch's own float32 error, {rounding:.3g})"
        )
    log.debug("parity over %d steps: max abs diff %.2e (torch's own float32 error %.2e)",
              x.shape[1], worst, rounding)  # fmt: skip
    return worst


def _scaled_diff(reference: np.ndarray, exported: np.ndarray) -> float:
    """max |a - b| / max(1, |b|): absolute below 1, relative above (see check_parity).

    Used for the predictions as well as the states.

    >>> round(_scaled_diff(np.array([0.5, 200.0]), np.array([0.50001, 200.01])), 9)
    5e-05
    """
    diff = np.abs(exported - reference) / np.maximum(1.0, np.abs(reference))
    return float(diff.max())


def finish_meta(proto: onnx.ModelProto, meta: ModelMeta) -> ModelMeta:
    """The metadata with the graph's fingerprint filled in."""
    return replace(meta, graph_sha256=graph_sha256(proto.graph.SerializeToString()))


def write_artifact(proto: onnx.ModelProto, meta: ModelMeta, path: str | Path) -> ModelMeta:
    """Attach the metadata, write the file atomically and read it back with the daemon's check."""
    meta = finish_meta(proto, meta)
    del proto.metadata_props[:]
    helper.set_model_props(proto, {METADATA_KEY: meta.to_json()})
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(proto.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise RnnsentryError(f"cannot write the model to {target}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    data, checked = read_artifact(target)
    check_io(make_session(data), checked)
    return checked


def check_io(session: ort.InferenceSession, meta: ModelMeta) -> None:
    """The session's inputs and outputs are exactly those the metadata implies."""
    want_in, want_out = expected_io(meta)
    for kind, want, have in (
        ("input", want_in, session.get_inputs()),
        ("output", want_out, session.get_outputs()),
    ):
        got = {a.name: [d if isinstance(d, int) else "B" for d in a.shape] for a in have}
        if got != want:
            raise ParityError(
                f"the exported graph's {kind}s {got} differ from the metadata's {want}"
            )
