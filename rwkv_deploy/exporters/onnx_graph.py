"""Tracing the reference model into ONNX graphs with the state as explicit inputs and outputs."""
from __future__ import annotations

import hashlib
import logging
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.model import RWKV

log = logging.getLogger(__name__)

EXTERNAL_THRESHOLD = 1_800_000_000  # weights above this go to external data automatically
TOKENS, LOGITS = "tokens", "logits"
WEIGHTS_FILE = "weights.onnx.data"


def state_io_names(model: RWKV) -> tuple[list[str], list[str]]:
    """Graph input and output names for each state tensor, in state-table order."""
    return [s.name for s in model.states], [s.name.replace("state.", "state_out.", 1) for s in model.states]


class StepGraph(nn.Module):
    """forward(tokens [B], *state) -> (logits [B, V], *state'): one decoding step."""

    def __init__(self, model: RWKV):
        super().__init__()
        self.model = model

    def forward(self, tokens, *state):
        logits, new = self.model.step(tokens, list(state))
        return (logits, *new)


class PrefillGraph(nn.Module):
    """forward(tokens [B, T], *state) -> (logits, *state'): a whole prompt at once.

    logits are those of the last position [B, V], or with all_positions of every position [B, T, V].
    """

    def __init__(self, model: RWKV, all_positions: bool = False):
        super().__init__()
        self.model, self.all_positions = model, all_positions

    def forward(self, tokens, *state):
        logits, new = self.model(tokens, list(state), last_only=not self.all_positions)
        return (logits if self.all_positions else logits[:, 0], *new)


def skeleton(model: RWKV) -> RWKV:
    """`model` with every weight replaced by a placeholder that takes no memory: a tensor of the right shape and
    dtype that views one scalar (stride 0). Tracing needs shapes, not values: a graph traced from the skeleton is
    the graph of the real weights, which are then written one layer at a time (WeightWriter). Each placeholder has
    its own value so that the exporter never merges two weights as duplicates."""
    bits = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
    for k, (name, b) in enumerate(list(model.named_buffers())):
        owner, _, attr = name.rpartition(".")
        scalar = torch.tensor(k + 1, dtype=bits[b.dtype]).view(b.dtype)  # distinct bit patterns, all finite
        setattr(model.get_submodule(owner) if owner else model, attr, scalar.expand(b.shape))
    return model


def trace_graph(module: nn.Module, model: RWKV, tokens: torch.Tensor, path: Path, opset: int):
    """Trace `module` (holding a skeleton model) with dynamic batch (and dynamic seq for 2-D tokens); returns the
    ONNX ModelProto whose weights are graph inputs named after the model's buffers ("model.blocks.0.att.key.weight"),
    for WeightWriter.bind to turn into initializers."""
    import onnx

    ins, outs = state_io_names(model)
    all_positions = getattr(module, "all_positions", False)
    axes = {TOKENS: {0: "batch", 1: "seq"} if tokens.dim() == 2 else {0: "batch"},
            LOGITS: {0: "batch", 1: "seq"} if all_positions else {0: "batch"}}
    axes.update({n: {0: "batch"} for n in ins + outs})
    example = (tokens, *model.init_state(tokens.shape[0]))
    custom = {}
    if model.wkv == "fused":
        from ..custom_ops.torch_ops import DOMAIN, OPSET, register_for_export

        register_for_export()
        custom = {DOMAIN: OPSET}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter (and helpers it calls) is deprecated, but it is the one that keeps the scripted
        # WKV loops as ONNX Loop nodes with a dynamic trip count.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # no TracerWarning is silenced: one means a wrong graph (tests turn it into an error).
        # export_params=False: the weights stay graph inputs under their own names (folding them here would
        # fold placeholders); WeightWriter folds what depends on one weight alone, with the real values.
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset, input_names=[TOKENS, *ins],
                          output_names=[LOGITS, *outs], dynamic_axes=axes, do_constant_folding=False,
                          export_params=False, custom_opsets=custom)
    proto = onnx.load(str(path))
    path.unlink()
    proto.producer_name = "rwkv-deploy"
    static_shapes(proto)
    return proto


def static_shapes(proto) -> None:
    """Give each Reshape and Expand whose target shape the tracer computes at run time (Shape, Gather, Concat on
    the batch and time sizes) a constant target instead, where ONNX shape inference proves one: a size that is a
    number, 0 for "the input's size here" (Reshape), 1 for "keep the input's size" (Expand), at most one -1. The
    shape arithmetic left unused is removed. A decode step runs ~100 fewer nodes per 12 layers."""
    from onnx import helper, numpy_helper

    g = proto.graph
    dims = _inferred_dims(proto)
    shapes = []
    for n in g.node:
        x, y = dims.get(n.input[0]) if n.input else None, dims.get(n.output[0])
        if n.op_type not in ("Reshape", "Expand") or x is None or y is None or None in y or 0 in y:
            continue  # (a size 0 in a target would mean "copy the input's size" to Reshape)
        if n.op_type == "Reshape":
            if any(a.name == "allowzero" and a.i for a in n.attribute):
                continue
            target = [d if isinstance(d, int) else 0 if k < len(x) and x[k] == d else -1 for k, d in enumerate(y)]
            if target.count(-1) > 1:
                continue
        else:
            x = [1] * (len(y) - len(x)) + x  # Expand broadcasts from the right
            target = [d if isinstance(d, int) else 1 if x[k] == d else None for k, d in enumerate(y)]
            if None in target:
                continue
        name = f"{n.output[0]}/static_shape"  # a Constant node: initializers are the checkpoint's weights alone
        shapes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.array(target, dtype=np.int64))))  # unnamed: a fold's signature hashes its constants
        n.input[1] = name
    kept = _used(list(g.node), g.output)
    del g.node[:]
    g.node.extend(shapes + kept)


def _used(nodes: list, outputs) -> list:
    """The nodes (in topological order) that the graph's outputs depend on."""
    import onnx

    live = {o.name for o in outputs}
    kept = []
    for n in reversed(nodes):  # a node's users come after it
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(n.input)
            for a in n.attribute:  # a Loop's body reads outer values too
                if a.type == onnx.AttributeProto.GRAPH:
                    live.update(_outer_inputs(a.g))
    return kept[::-1]


def _inferred_dims(proto) -> dict[str, list]:
    """{value: its dims} as ONNX shape inference (with data propagation) finds them: an int, a symbol's name, or
    None where unknown; {} when inference fails."""
    import onnx

    try:
        g = onnx.shape_inference.infer_shapes(proto, data_prop=True).graph
    except onnx.shape_inference.InferenceError:
        return {}
    return {vi.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in vi.type.tensor_type.shape.dim]
            for vi in [*g.value_info, *g.input, *g.output] if vi.type.tensor_type.HasField("shape")}


def _outer_inputs(body) -> set[str]:
    """Every value name a subgraph's nodes read (a superset of what it takes from the outer graph)."""
    names = set()
    for n in body.node:
        names.update(n.input)
        for a in n.attribute:
            if a.type == a.GRAPH:
                names |= _outer_inputs(a.g)
    return names


# Ops that WeightWriter evaluates at export time when their only non-constant input is one weight (what the
# tracer leaves around a weight: F.linear's Transpose, mix's 1 - mu, unsqueezes). Anything else runs in the graph.
FOLDABLE = {"Transpose", "Sub", "Add", "Mul", "Div", "Neg", "Exp", "Cast", "Unsqueeze", "Squeeze", "Reshape"}


def _is_transpose(fold) -> bool:
    nodes = fold.graph.node
    return len(nodes) == 1 and nodes[0].op_type == "Transpose" and len(nodes[0].attribute) == 1


def release_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim). Tensors of a few MB come from the heap,
    which otherwise keeps what a layer used after it is freed: streaming one layer at a time would still grow
    to many layers' worth. A no-op where the C library has no malloc_trim."""
    try:
        _malloc_trim(0)
    except (NameError, OSError, AttributeError):
        pass


try:
    import ctypes

    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc
    pass


def _signature(chain) -> str:
    """Names a folded weight by what was done to it (op types, attributes, constants), not by the graph's value
    names, so that the same fold in the step and the prefill graph is one initializer."""
    h = hashlib.sha256()
    for n in chain:
        h.update(n.op_type.encode())
        for a in n.attribute:
            h.update(a.SerializeToString())
    return h.hexdigest()[:12]


class WeightWriter:
    """Writes the graph files of an export and their weights, each weight read once and written straight to disk.

    bind(proto, weight_names, path) turns a traced graph's weight inputs into initializers and folds the nodes that
    depend on one weight alone into initializers of their own (named after the weight and the folded nodes, so the
    step and prefill graphs share them). write(named_tensors) then writes each graph file and streams the real
    tensors into it, one at a time: into the external-data file (page-aligned, shared by all graphs) or inside the
    graph file, without ever holding more than one tensor.

    A graph file is written as its graph without initializers, followed by one `graph { initializer { ... } }`
    record per tensor: protobuf merges repeated occurrences of a message field (its encoding spec), so every reader
    sees one graph holding all the initializers, and the writer needs no copy of the weights in memory.
    """

    ALIGN = 4096  # page-aligned offsets let a runtime map each tensor instead of copying it
    MIN_BYTES = 1024  # smaller tensors stay inside each graph (a page of padding apiece would outweigh them)

    def __init__(self, path: Path | None, external: bool, quant=None, quantizable=None, kernels: bool = False):
        """path: the external-data file to write; None computes digests instead of writing anything (`digests`:
        initializer name -> sha256 of the bytes it would have), which is how verify checks an export's weights.
        kernels (`export --matmul cpu`): products of float16 weights become rwkv::MatMulF16 nodes on W stored in
        tiles of 64 columns (`half_tiled`) and quantized ones rwkv::MatMulQ8/MatMulQ4 on q and scale stored in tiles
        too (`tiled`; the custom-op library's CPU kernels), instead of MatMul and DequantizeLinear + MatMul."""
        self.path, self.external = path, external
        self.digests: dict[str, str] | None = {} if path is None else None
        # (ModelProto without weights, initializer names it uses, file to write)
        self.graphs = []
        self.uses: dict[str, list[tuple[str, object]]] = {}  # weight -> [(initializer name, fold model or None)]
        self.bytes_written = 0
        # int8/int4 exports: quant (models.quant.Quant) and quantizable(weight name, shape, transposed) -> its
        # Quant or None pick the weights that a MatMul takes as B, transposed (projections) or as they are (LoRA
        # factors); they are stored as q and scale behind a DequantizeLinear
        self.quant, self.quantizable = quant, quantizable
        self.quantized: dict[str, object] = {}  # initializer name -> the Quant it is stored with
        self.tiled: set[str] = set()  # of those, the weights only rwkv::MatMulQ8/MatMulQ4 read (stored in tiles)
        self.direct: set[str] = set()  # of those, the weights a MatMul reads as they are ([in, out])
        self.kernels = kernels
        self.halved: set[str] = set()  # tables that only Gather reads (the embedding): stored float16 beside them

    def bind(self, proto, weight_names: set[str], path: Path, half_kernels: bool = True) -> None:
        """Take a traced graph's weights out of it (folding what depends on one weight alone) and remember what
        to write. half_kernels=False keeps this graph's float16 products as MatMul (prefill: at 256 rows ONNX
        Runtime's GEMM on its widened copy beats rwkv::MatMulF16); quantized products take the kernels in every
        graph (at 256 rows rwkv::MatMulQ* is 2-2.5x faster than MatMulNBits here)."""
        import onnx
        from onnx import helper

        g = proto.graph
        weights = {i.name: i for i in g.input if i.name in weight_names}
        const = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        source: dict[str, tuple[str, list]] = {w: (w, []) for w in weights}  # value -> (weight, folded nodes)
        sizes = {v: int(np.prod(d, dtype=np.int64)) for v, d in _inferred_dims(proto).items()  # element counts
                 if all(isinstance(x, int) for x in d)}
        rename, keep = {}, []
        for node in g.node:
            ins = [x for x in node.input if x]
            roots = {source[x][0] for x in ins if x in source}
            if (node.op_type in FOLDABLE and len(roots) == 1 and len(node.output) == 1
                    and all(x in source or x in const for x in ins)
                    # a fold that broadcasts a weight (v4's chunk table, [16, 16, A] from w [A]) would store more
                    # bytes than it saves work: it runs in the graph
                    and sizes.get(node.output[0], 0) <= sizes.get(next(iter(roots)), 0)):
                (w,) = roots
                chain = [n for x in ins if x in source for n in source[x][1]]
                chain += [const[x] for x in ins if x in const] + [node]
                source[node.output[0]] = (w, list({id(n): n for n in chain}.values()))
                continue
            keep.append(node)
        used = {x for n in keep for x in n.input} | {o.name for o in g.output}
        for value, (w, chain) in source.items():
            if value not in used:
                continue
            if not chain:  # the weight itself
                self._use(w, w, None)
                continue
            out = helper.make_tensor_value_info(value, onnx.TensorProto.UNDEFINED, None)
            fold = helper.make_model(helper.make_graph(chain, "fold", [weights[w]], [out]),
                                     opset_imports=proto.opset_import)
            name = f"{w}~{_signature(chain)}"
            rename[value] = name
            self._use(w, name, fold)
        del g.node[:]
        for node in keep:
            node.input[:] = [rename.get(x, x) for x in node.input]
        if self.quant is not None:
            keep = self._dequantize(keep, weights, source, rename)
            for o in proto.opset_import:  # blocked DequantizeLinear and INT4 came with opset 21
                if o.domain in ("", "ai.onnx"):
                    o.version = max(o.version, 21)
        tiles: set[str] = set()
        if self.quant is None and self.kernels:
            keep, tiles = _half_products(keep, weights, source, rename, half_kernels)
        from ..custom_ops import CPU_PRODUCTS
        from ..custom_ops.torch_ops import DOMAIN, OPSET, register_for_export

        if any(n.domain == DOMAIN and n.op_type in CPU_PRODUCTS for n in keep):
            register_for_export()  # the products' schemas
            if all(o.domain != DOMAIN for o in proto.opset_import):
                proto.opset_import.append(helper.make_opsetid(DOMAIN, OPSET))
        g.node.extend(_used(keep, g.output))  # a constant only a fold read is now in the fold
        inputs = [i for i in g.input if i.name not in weights]
        del g.input[:]
        g.input.extend(inputs)
        names = {rename.get(v, v) for v in used if v in source}
        names = {x for n in names for x in ((f"{n}~q", f"{n}~s") if n in self.quantized else
                                            (f"{n}~t",) if n in tiles else (n,))}
        self.graphs.append((proto, names, path))

    def _dequantize(self, nodes, weights, source, rename) -> list:
        """nodes with each quantizable weight's MatMul (a projection read transposed, a LoRA factor read as it is)
        fed by DequantizeLinear(q, scale) (opset 21, blocks along the MatMul's K axis) instead of its float weight,
        or with self.kernels, an rwkv::MatMulQ8/MatMulQ4 node on q and scale in its place (stored in tiles: every
        graph of an export makes the same choice for a weight, so no other node reads them). Only weights that every
        consumer takes as a MatMul's B input; anything else keeps its float copy."""
        import onnx
        from onnx import helper

        from ..custom_ops.torch_ops import DOMAIN

        products, consumers = _products(weights, source, rename), _consumers(nodes)
        dims = {w: [d.dim_value for d in v.type.tensor_type.shape.dim] for w, v in weights.items()}
        picked = {name: self.quantizable(w, dims[w], transposed) for name, (w, transposed) in products.items()
                  if _read_as_b(consumers, name)}
        picked = {name: q for name, q in picked.items() if q is not None}
        self.quantized |= picked
        self.direct |= {name for name in picked if not products[name][1]}
        # a table only Gather reads costs a row per token, not its bytes: float16 halves the folder at no speed
        tables = {w for w in weights if consumers.get(w) and all(c == ("Gather", 0) for c in consumers[w])}
        self.halved |= tables
        out, dequantized = [], set()
        for n in nodes:
            name = n.input[1] if n.op_type == "MatMul" else None
            if self.kernels and name in picked and picked[name].block == TILE_BLOCK:
                weight, transposed = products[name]
                self.tiled.add(name)
                out.append(helper.make_node(f"MatMulQ{picked[name].bits}", [n.input[0], f"{name}~q", f"{name}~s"],
                                            list(n.output), name=n.name, domain=DOMAIN,
                                            n=dims[weight][0 if transposed else 1]))  # y's columns
                continue
            if name in picked:
                if name not in dequantized:  # once per weight, however many products read it
                    dequantized.add(name)
                    out.append(helper.make_node("DequantizeLinear", [f"{name}~q", f"{name}~s"], [f"{name}~dq"],
                                                axis=0, block_size=self.quant.block))
                n.input[1] = f"{name}~dq"
            out.append(n)
            if n.op_type == "Gather" and n.input[0] in tables:  # float16 rows -> float32 activations
                rows = n.output[0]
                n.output[0] = f"{rows}~h"
                out.append(helper.make_node("Cast", [f"{rows}~h"], [rows], to=onnx.TensorProto.FLOAT))
        return out

    def _use(self, weight: str, name: str, fold) -> None:
        entries = self.uses.setdefault(weight, [])
        if all(n != name for n, _ in entries):
            entries.append((name, fold))

    def write(self, named_tensors, progress=None) -> None:
        """Write every bound graph's file, streaming (weight name, tensor) pairs into its initializers."""
        from onnx.reference import ReferenceEvaluator

        done, total, written = 0, len(self.uses), set()
        needed = {x for _, names, _ in self.graphs for x in names}
        with ExitStack() as stack:
            data = stack.enter_context(open(self.path, "wb")) if self.external and self.path else None
            files = []
            for proto, names, path in self.graphs if self.digests is None else []:
                f = stack.enter_context(open(path, "wb"))
                f.write(proto.SerializeToString())
                files.append((f, names))
            for weight, t in named_tensors:
                for name, fold in self.uses.get(weight, []):
                    if name in self.quantized:  # W [out, in] -> q [in, out] and scale [in/block, out]
                        quant, w = self.quantized[name], t.detach().cpu()
                        q, scale = quant.quantize(w.T if name in self.direct else w)  # a LoRA factor is [in, out]
                        q, scale = q.T.contiguous().numpy(), scale.T.contiguous().numpy()  # [in, out], [in / 32, out]
                        if name in self.tiled:
                            q, scale = tiled(q, scale, quant.bits)
                        self._emit(f"{name}~q", q, data, files, written, None if name in self.tiled else quant.bits)
                        self._emit(f"{name}~s", scale, data, files, written)
                        continue
                    arr = t.detach().cpu().numpy()
                    if name in self.halved:
                        arr = arr.astype(np.float16)  # exact: the model rounded it so (models.quant.Quant.table)
                    if fold is not None and _is_transpose(fold):  # F.linear's: one copy, not the evaluator's three
                        arr = arr.transpose(list(fold.graph.node[0].attribute[0].ints))
                    elif fold is not None:
                        arr = ReferenceEvaluator(fold).run(None, {fold.graph.input[0].name: arr})[0]
                    if f"{name}~t" in needed:  # rwkv::MatMulF16's (and the prefill graph's, put back by its nodes)
                        self._emit(f"{name}~t", half_tiled(arr), data, files, written)
                    if name in needed or f"{name}~t" not in needed:
                        self._emit(name, arr, data, files, written)
                    del arr
                del t
                release_freed_memory()
                done += 1
                if progress:
                    progress(done, total)
                elif self.digests is None and done % max(1, total // 10) == 0:  # logs: every tenth of the way
                    log.info("wrote %d/%d weights (%.2f GB)", done, total, self.bytes_written / 1e9)
        missing = [n for _, names, _ in self.graphs for n in names if n not in written]
        if missing:  # a weight the graph uses that the model did not stream: a bug, not bad input
            raise RuntimeError(f"weights not written: {missing[:5]}")

    def _emit(self, name: str, arr: np.ndarray, data, files, written: set, bits: int | None = None) -> None:
        """One initializer: into the external-data file (page-aligned) or inside each graph file that uses it.
        bits=4: `arr` holds int8 values in [-7, 7], stored as ONNX INT4; bits=8: as INT8."""
        import onnx
        from onnx import helper

        arr = np.ascontiguousarray(arr)
        dtype = helper.np_dtype_to_tensor_dtype(arr.dtype) if bits is None else \
            {8: onnx.TensorProto.INT8, 4: onnx.TensorProto.INT4}[bits]
        stored = _packed_int4(arr) if bits == 4 else arr
        tp = onnx.TensorProto(name=name, dims=arr.shape, data_type=dtype)
        raw = memoryview(stored).cast("B")
        if self.digests is not None:
            self.digests[name] = hashlib.sha256(raw).hexdigest()
            written.add(name)
            return
        if data is not None and stored.nbytes >= self.MIN_BYTES:
            data.write(b"\0" * (-data.tell() % self.ALIGN))
            tp.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", self.path.name), ("offset", data.tell()), ("length", stored.nbytes)):
                tp.external_data.add(key=k, value=str(v))
            data.write(raw)
            raw = None
        for f, names in files:
            if name in names:
                _append_initializer(f, tp, raw)
        self.bytes_written += stored.nbytes
        written.add(name)


def _half_products(nodes, weights, source, rename, in_kernel: bool) -> tuple[list, set[str]]:
    """(nodes, the initializers they now read as tiles): every float16 weight of rank 2 (read as it is or transposed
    by a fold) that only MatMuls read, as B, is stored in rwkv::MatMulF16's tiles (`half_tiled`), once for every
    graph. in_kernel: its MatMuls become rwkv::MatMulF16 on the tiles, which reads the stored float16 where ONNX
    Runtime's CPU provider widens such weights to float32 at load; otherwise (prefill: at 256 rows ONNX Runtime's
    GEMM on its widened copy is the faster) the MatMul takes W put back from the tiles by Transpose, Reshape and
    Slice, nodes on initializers alone that ONNX Runtime folds at load."""
    import onnx
    from onnx import helper

    from ..custom_ops.torch_ops import DOMAIN

    consumers = _consumers(nodes)
    half = {}  # initializer name -> [K, N] of the product's B
    for name, (w, transposed) in _products(weights, source, rename).items():
        t = weights[w].type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        if t.elem_type == onnx.TensorProto.FLOAT16 and len(dims) == 2 and _read_as_b(consumers, name):
            half[name] = dims[::-1] if transposed else dims
    out, untiled = [], set()
    for n in nodes:
        name = n.input[1] if n.op_type == "MatMul" else None
        if name not in half:
            out.append(n)
            continue
        K, N = half[name]
        if in_kernel:
            out.append(helper.make_node("MatMulF16", [n.input[0], f"{name}~t"], list(n.output), name=n.name,
                                        domain=DOMAIN, n=N))
            continue
        if name not in untiled:  # once per weight, however many products read it
            untiled.add(name)
            out += _untiled(f"{name}~t", f"{name}~w", K, N)
        n.input[1] = f"{name}~w"
        out.append(n)
    return out, set(half)


def _products(weights, source, rename) -> dict[str, tuple[str, bool]]:
    """Initializer name -> (weight, whether the graph reads it transposed): every weight as it is, and those a
    one-node Transpose fold reads."""
    products = {rename[v]: (w, True) for v, (w, chain) in source.items() if v in rename and len(chain) == 1
                and chain[0].op_type == "Transpose"}
    return products | {w: (w, False) for w in weights}


def _consumers(nodes) -> dict[str, list[tuple[str, int]]]:
    """Value -> (op type, input index) of every node that reads it."""
    consumers: dict[str, list] = {}
    for n in nodes:
        for i, x in enumerate(n.input):
            consumers.setdefault(x, []).append((n.op_type, i))
    return consumers


def _read_as_b(consumers, name: str) -> bool:
    """Whether `name` is read, and only as a MatMul's B input."""
    return all(c == ("MatMul", 1) for c in consumers.get(name, [("none", 0)]))


def half_tiled(w: np.ndarray) -> np.ndarray:
    """W [K, N] -> rwkv::MatMulF16's tiles [T, K, 64], T = ceil(N / 64): tile t holds columns 64t..64t+63 of every
    row, the last tile padded with zeros (custom_ops/cpu/wkv_ops.cc)."""
    K, N = w.shape
    T = -(-N // TILE_COLUMNS)
    padded = np.zeros((K, T * TILE_COLUMNS), w.dtype)
    padded[:, :N] = w
    return np.ascontiguousarray(padded.reshape(K, T, TILE_COLUMNS).transpose(1, 0, 2))  # [T, K, 64]


def _untiled(tiles: str, out: str, K: int, N: int) -> list:
    """Nodes that put W [K, N] back from `half_tiled`'s tiles [T, K, 64]."""
    from onnx import helper, numpy_helper

    T = -(-N // TILE_COLUMNS)
    const = lambda name, v: helper.make_node("Constant", [], [name],  # noqa: E731
                                             value=numpy_helper.from_array(np.array(v, np.int64)))
    nodes = [helper.make_node("Transpose", [tiles], [f"{out}/kt"], perm=[1, 0, 2]),  # [K, T, 64]
             const(f"{out}/shape", [K, T * TILE_COLUMNS]),
             helper.make_node("Reshape", [f"{out}/kt", f"{out}/shape"], [f"{out}/padded" if N % TILE_COLUMNS else out])]
    if N % TILE_COLUMNS:  # the last tile's padding
        nodes += [const(f"{out}/starts", [0]), const(f"{out}/ends", [N]), const(f"{out}/axes", [1]),
                  helper.make_node("Slice", [f"{out}/padded", f"{out}/starts", f"{out}/ends", f"{out}/axes"], [out])]
    return nodes


TILE_BLOCK, TILE_COLUMNS = 32, 64  # rwkv::MatMulQ8/MatMulQ4's block of K and tile of columns


def tiled(q: np.ndarray, scale: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """q [K, N] (int values) and scale [K / 32, N], DequantizeLinear's layout, -> rwkv::MatMulQ8/MatMulQ4's tiles of
    64 columns (custom_ops/cpu/wkv_ops.cc): q int8 [T, K / 32, 2048] or, two a byte, uint8 [T, K / 32, 1024], and
    scale [T, K / 32, 64], T = ceil(N / 64), the last tile padded with zeros. Within a block (k = 32b + 4g + i, a
    tile's column c) int8 byte 4 (64g + c) + i; int4 byte 4 (32g + c % 32) + i, column c < 32 in the low nibble."""
    K, N = q.shape
    T, nbk = -(-N // TILE_COLUMNS), K // TILE_BLOCK
    qp = np.zeros((K, T * TILE_COLUMNS), np.int8)
    qp[:, :N] = q
    sp = np.zeros((nbk, T * TILE_COLUMNS), np.float32)
    sp[:, :N] = scale
    blocks = qp.reshape(nbk, TILE_BLOCK // 4, 4, T, TILE_COLUMNS).transpose(3, 0, 1, 4, 2)  # [T, nbk, g, c, i]
    scales = np.ascontiguousarray(sp.reshape(nbk, T, TILE_COLUMNS).transpose(1, 0, 2))  # [T, nbk, c]
    if bits == 8:
        return np.ascontiguousarray(blocks).reshape(T, nbk, -1), scales
    nibbles = blocks.astype(np.uint8) & 0x0F
    half = TILE_COLUMNS // 2
    return np.ascontiguousarray(nibbles[:, :, :, :half] | (nibbles[:, :, :, half:] << 4)).reshape(T, nbk, -1), scales


def _packed_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] -> ONNX INT4 storage: two a byte, the first in the low nibble."""
    flat = (q.reshape(-1).astype(np.uint8) & 0x0F)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


def _append_initializer(f, tensor, raw) -> None:
    """Append `graph { initializer { tensor, raw_data: raw } }` to a serialized ModelProto in file f (see
    WeightWriter); `raw` (bytes-like or None) is written from where it lies, never copied into the message."""
    import onnx

    body = tensor.SerializeToString()
    if raw is not None:
        raw_field = _key(onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number) + _varint(raw.nbytes)
        body_len = len(body) + len(raw_field) + raw.nbytes
    else:
        raw_field, body_len = b"", len(body)
    init = _key(onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number) + _varint(body_len)
    f.write(_key(onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number) + _varint(len(init) + body_len))
    f.write(init + body + raw_field)
    if raw is not None:
        f.write(raw)


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)
