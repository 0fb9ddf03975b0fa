"""OpenVINO backend (CPU): IR conversion and on-disk cache, :class:`OpenVINOEncoder`,
:class:`OpenVINOMaskDecoder`, :class:`OpenVINOAISDecoder`.

The IR is kept under ``<cache>/openvino/<kind>-<key>/`` (``key`` from the weights' SHA-256, the
image size, the OpenVINO version and our export recipe); the precision is applied when compiling,
so every precision shares one IR.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import file_sha256, state_dict_digest
from .decoder import _DecoderCore, _dense_tokens, _TokenArrayCache
from .torch import _part_precisions, fold_batchnorm, split_encoder

__all__ = [
    "openvino_ir",
    "OpenVINOEncoder",
    "OpenVINOMaskDecoder",
    "OpenVINOAISDecoder",
    "AIS_PRECISIONS",
    "ir_ready",
    "convert_irs",
]

log = logging.getLogger(__name__)

# Bumped whenever the way we export changes, so old IR in users' caches is not reused.
_IR_RECIPE = "4"
# Written beside model.xml/model.bin at conversion: their sizes and SHA-256, checked on reuse.
_MANIFEST = "manifest.json"
_IR_FILES = ("model.xml", "model.bin")


def _openvino_has_bf16(core) -> bool:
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - an odd plugin: just don't use bf16
        return False


def _ir_dir(kind: str, digest: str, img_size: int) -> Path:
    import openvino

    from ..weights import cache_dir

    key = hashlib.sha256(
        f"{kind}|{digest}|{img_size}|{openvino.__version__}|{_IR_RECIPE}".encode()
    ).hexdigest()[:24]
    return cache_dir() / "openvino" / f"{kind}-{key}"


def _write_manifest(folder: Path) -> None:
    info = {n: {"size": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)}
            for n in _IR_FILES}
    (folder / _MANIFEST).write_text(json.dumps(info), encoding="utf-8")


def ir_damage(folder: Path) -> str | None:
    """Why the cached IR in ``folder`` cannot be used (a missing, truncated or altered file, no
    readable manifest), or None when it is intact."""
    try:
        info = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{_MANIFEST} is missing or unreadable"
    for name in _IR_FILES:
        path, want = folder / name, info.get(name) if isinstance(info, dict) else None
        if not isinstance(want, dict):
            return f"{_MANIFEST} does not describe {name}"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{name} has {size} bytes, {want.get('size')} were written"
        if file_sha256(path) != want.get("sha256"):
            return f"{name} was altered (SHA-256 differs from the one written)"
    return None


def openvino_ir(module: nn.Module, kind: str, example, *, img_size: int, input_shapes=None):
    """Path of the OpenVINO IR (``model.xml``) of ``module``, converting it on first use.

    The folder name is a hash of ``kind``, the module's weights digest, ``img_size``, the OpenVINO
    version and our export recipe; it is written to a temporary folder and renamed, so concurrent
    or interrupted conversions never leave a half-written IR. A cached IR whose files no longer
    match the sizes and SHA-256 written beside them (truncated ``model.bin``, a file deleted or
    edited) is reported with a warning naming the folder, removed and converted again. Returns
    ``(xml_path, converted)``.
    """
    target = _ir_dir(kind, state_dict_digest(module), img_size)
    xml = target / "model.xml"
    if target.exists():
        reason = ir_damage(target)
        if reason is None:
            return xml, False
        log.warning("the cached OpenVINO model in %s is damaged (%s); rebuilding it", target, reason)
        shutil.rmtree(target, ignore_errors=True)
    _convert(module, kind, example, target, input_shapes)
    return xml, True


def _convert(module: nn.Module, kind: str, example, target: Path, input_shapes) -> None:
    import openvino as ov

    target.parent.mkdir(parents=True, exist_ok=True)
    # the process id in the name lets whoever stops a conversion process remove what it left
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    try:
        t0 = time.perf_counter()
        kwargs = {} if input_shapes is None else {"input": input_shapes}
        with torch.no_grad(), warnings.catch_warnings():
            # tracing fixes the shapes we export for; its warnings say exactly that
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            ov_model = ov.convert_model(_traced(module, example), **kwargs)
        ov.save_model(ov_model, tmp / "model.xml", compress_to_fp16=False)
        _write_manifest(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: use theirs
            if not (target / "model.xml").exists():
                raise
        log.info("converted %s to OpenVINO in %.1f s: %s", kind, time.perf_counter() - t0, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _traced(module: nn.Module, example):
    """OpenVINO's TorchScript decoder of ``module`` traced once on ``example``.

    ``ov.convert_model(module, example_input=...)`` traces with torch's ``check_trace``, which runs
    the module twice more and compares the graphs: three forward passes instead of one (for the
    AIS decoder at 1024², 65 of the 84 s its conversion took here, profiled). The IR is the same
    without the check; parity with the torch module is what our tests check."""
    try:
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder
    except ImportError:  # an OpenVINO without it: its own tracing, with the check
        return module
    inputs = example if isinstance(example, tuple) else (example,)
    return TorchScriptPythonDecoder(module, example_input=inputs, trace_kwargs={"check_trace": False})


def _encoder_parts(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder's parts as exported: ``[(kind, folded float32 CPU module), ...]``."""
    src = fold_batchnorm(copy.deepcopy(encoder).cpu().float())
    return [(f"encoder-{name}", part) for name, part in split_encoder(src)]


def _decoder_core(decoder: nn.Module, embed_shape) -> nn.Module:
    _, h, w = embed_shape
    core = _DecoderCore(copy.deepcopy(decoder).cpu().float().eval(), h, w)
    core.weights_digest = state_dict_digest(decoder)
    return core


def _decoder_io(embed_shape):
    """(example inputs, dynamic input shapes) of the decoder IR for ``(C, h, w)`` embeddings."""
    import openvino as ov

    c, h, w = embed_shape
    example = (
        torch.zeros(1, h * w, c),
        torch.zeros(1, h * w, c),
        torch.zeros(2, 3, c),
        torch.zeros(2, h * w, c),
    )
    shapes = [
        ov.PartialShape([1, h * w, c]),
        ov.PartialShape([1, h * w, c]),
        ov.PartialShape([-1, -1, c]),
        ov.PartialShape([-1, -1, c]),
    ]
    return example, shapes


def ir_ready(encoder: nn.Module, decoder: nn.Module | None = None, embed_shape=(256, 64, 64)) -> bool:
    """Whether the IR of ``encoder`` (and of the mask ``decoder``) is cached and intact, so that
    :class:`OpenVINOEncoder` (and :class:`OpenVINOMaskDecoder`) only read and compile it. Cheap
    (hashes the weights and the cached files); converts nothing."""
    s = encoder.img_size
    for kind, part in _encoder_parts(encoder):
        if ir_damage(_ir_dir(kind, state_dict_digest(part), s)) is not None:
            return False
    if decoder is None:
        return True
    core = _decoder_core(decoder, embed_shape)
    return ir_damage(_ir_dir("decoder", state_dict_digest(core), embed_shape[1])) is None


def convert_irs(encoder: nn.Module, decoder: nn.Module | None = None, embed_shape=(256, 64, 64)) -> bool:
    """Convert ``encoder`` (and the mask ``decoder``) to cached IR without compiling anything;
    parts already cached are kept. Returns whether anything was converted. Slow (the conversion
    itself): :mod:`~napari_mobilesam.models.backends.background` runs it in another process."""
    s = encoder.img_size
    example, converted = torch.zeros(1, 3, s, s), False
    for kind, part in _encoder_parts(encoder):
        _, done = openvino_ir(part, kind, example, img_size=s)
        converted |= done
        with torch.no_grad():
            example = part(example)
    if decoder is not None:
        example, shapes = _decoder_io(embed_shape)
        core = _decoder_core(decoder, embed_shape)
        _, done = openvino_ir(core, "decoder", example, img_size=embed_shape[1], input_shapes=shapes)
        converted |= done
    return converted


def _compile(xml: Path, precision: str, shape=None, edit=None):
    """The IR at ``xml`` compiled for the CPU in ``precision`` (``"bf16"`` or float32).

    ``edit(model)``: called on the read (and reshaped) ``openvino.Model`` before compiling, to
    change it in place (e.g. :func:`_bf16_convolutions`).

    ``shape``: the one input shape it will run, fixed before compiling (the IR from tracing has
    dynamic sizes), so the kernels are chosen once, here, and never at run time from the shapes
    seen before. Every setting that decides the arithmetic is given explicitly (none is left to
    the process's state or a plugin default that another caller could change): the precision,
    the execution mode, and the denormal handling (the plugin's threads clear flush-to-zero
    themselves instead of keeping whatever the calling thread set). With this a compiled model
    returns the same bits for the same input in any process, whatever ran there before (see
    docs/reliability.md, "Same input, same embedding").
    """
    import openvino as ov

    core = ov.Core()
    model = core.read_model(xml)
    if shape is not None:
        model.reshape({model.inputs[0]: ov.PartialShape([int(d) for d in shape])})
    if edit is not None:
        edit(model)
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "EXECUTION_MODE_HINT": "PERFORMANCE",
        "CPU_DENORMALS_OPTIMIZATION": False,
    }
    threads = omp_threads()
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return core.compile_model(model, "CPU", config)


def omp_threads() -> int | None:
    """The thread count that ``OMP_NUM_THREADS`` asks for (a positive integer), else None.

    torch reads that variable at start-up for its own thread pool; OpenVINO's CPU plugin ignores
    it, so :func:`_compile` passes it on as ``INFERENCE_NUM_THREADS``: one variable caps both (a
    process sharing the cores with others, e.g. one of several test or dask workers, otherwise
    runs as many threads as the machine has cores, and they wait for each other). Unset, empty
    or not a positive integer: OpenVINO's default (every core), as torch does then.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


class OpenVINOEncoder(nn.Module):
    """Image encoder running through OpenVINO on the CPU.

    ``precision``: ``"fp32"`` (exact to about 1e-5), ``"bf16"`` or ``"mixed"`` (bf16 front, fp32
    back, see :func:`split_encoder`). The encoder is converted as its parts, each kept as IR in
    the cache; the precision is applied when compiling, so all precisions share one IR.
    ``forward(x)``: ``(B, 3, S, S)`` float32 tensor → ``(B, 256, S/16, S/16)`` float32 CPU tensor
    (images run one at a time). ``torch_encoder`` is the source module (not registered, so it adds
    nothing to ``state_dict``). ``converted`` tells whether this construction converted anything
    (first use) or only read cached IR.
    """

    backend_name = "openvino"

    def __init__(self, encoder: nn.Module, precision: str = "fp32") -> None:
        super().__init__()
        import openvino as ov

        if precision not in ("fp32", "bf16", "mixed"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'mixed', not {precision!r}")
        if precision != "fp32" and not _openvino_has_bf16(ov.Core()):
            log.warning("this CPU has no bf16 support in OpenVINO; using float32")
            precision = "fp32"
        self.precision = precision
        self.img_size = encoder.img_size
        self.device = torch.device("cpu")
        self.weights_digest = state_dict_digest(encoder)
        object.__setattr__(self, "torch_encoder", encoder)
        s = encoder.img_size
        parts = _encoder_parts(encoder)
        self._lock = threading.Lock()
        self.ir_paths, self._requests, self.converted = [], [], False
        example = torch.zeros(1, 3, s, s)
        precisions = _part_precisions(precision, len(parts))
        shape = (1, 3, s, s)  # each part is compiled for the one shape it runs
        for i, ((kind, part), prec) in enumerate(zip(parts, precisions)):
            xml, converted = openvino_ir(part, kind, example, img_size=s)
            self.converted |= converted
            self.ir_paths.append(xml)
            compiled = _compile(xml, prec, shape)
            shape = tuple(compiled.outputs[0].get_shape())
            self._requests.append(compiled.create_infer_request())
            later_missing = any(
                ir_damage(_ir_dir(k, state_dict_digest(p), s)) is not None for k, p in parts[i + 1 :]
            )
            if later_missing:  # the next part's example input (only needed to convert it)
                with torch.no_grad():
                    example = part(example)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.img_size, self.img_size):
            raise ValueError(
                f"expected a (B, 3, {self.img_size}, {self.img_size}) tensor, got {tuple(x.shape)}"
            )
        x = x.detach().to("cpu", torch.float32)
        outs = []
        with self._lock:  # an infer request serves one call at a time
            for i in range(x.shape[0]):
                h = x[i : i + 1].contiguous().numpy()
                for request in self._requests:
                    request.infer({0: h})
                    h = request.get_output_tensor(0).data
                outs.append(torch.from_numpy(h.copy()))
        return torch.cat(outs).float()


class OpenVINOMaskDecoder(nn.Module):
    """``segment_anything`` ``MaskDecoder`` running through OpenVINO on the CPU (fp32 or bf16).

    Same call as ``MaskDecoder.forward``: ``image_embeddings (1, 256, 64, 64)``, ``image_pe (1, 256,
    64, 64)``, ``sparse_prompt_embeddings (B, N, 256)``, ``dense_prompt_embeddings (B, 256, 64, 64)``,
    ``multimask_output`` → ``masks (B, 3 or 1, 256, 256)``, ``iou_pred (B, 3 or 1)`` float32. ``B``
    and ``N`` are dynamic. Inputs it was not exported for (batched image embeddings, other sizes,
    gradients) go to the torch decoder (``torch_decoder``).

    The IR computes :func:`fast_predict_masks` on token layouts; the token layout of the image
    embedding and of the positional encoding is kept between calls while they do not change, and
    a dense prompt embedding that is one vector broadcast over the pixels (no mask prompt) is
    passed as that vector.
    """

    backend_name = "openvino"

    def __init__(
        self, decoder: nn.Module, precision: str = "fp32", embed_shape=(256, 64, 64)
    ) -> None:
        super().__init__()
        import openvino as ov

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
        if precision == "bf16" and not _openvino_has_bf16(ov.Core()):
            precision = "fp32"
        self.precision = precision
        self.weights_digest = state_dict_digest(decoder)
        object.__setattr__(self, "torch_decoder", decoder)
        self.embed_shape = tuple(embed_shape)
        core = _decoder_core(decoder, self.embed_shape)
        example, shapes = _decoder_io(self.embed_shape)
        self.ir_path, self.converted = openvino_ir(
            core, "decoder", example, img_size=self.embed_shape[1], input_shapes=shapes
        )
        self._compiled = _compile(self.ir_path, precision)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()
        self._image_tokens = _TokenArrayCache()
        self._pe_tokens = _TokenArrayCache()

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ):
        usable = (
            image_embeddings.shape[0] == 1
            and tuple(image_embeddings.shape[1:]) == self.embed_shape
            and tuple(image_pe.shape) == (1, *self.embed_shape)
            and image_embeddings.device.type == "cpu"
            and not (torch.is_grad_enabled() and sparse_prompt_embeddings.requires_grad)
            and sparse_prompt_embeddings.shape[1] > 0
        )
        if not usable:
            return self.torch_decoder(
                image_embeddings,
                image_pe,
                sparse_prompt_embeddings,
                dense_prompt_embeddings,
                multimask_output,
            )

        def arr(t):
            return t.detach().to(torch.float32).contiguous().numpy()

        # One infer request under a lock: separate requests per thread (tried, so that a click on
        # the GUI thread need not wait for a worker's decoding) crashed the process in the
        # widget benchmark, so a click may wait for one worker decoding call.
        with self._lock:  # an infer request (and the token caches) serve one call at a time
            inputs = {
                0: self._image_tokens.get(image_embeddings),
                1: self._pe_tokens.get(image_pe),
                2: arr(sparse_prompt_embeddings),
                3: arr(_dense_tokens(dense_prompt_embeddings)),
            }
            self._request.infer(inputs)
            masks = torch.from_numpy(self._request.get_output_tensor(0).data.copy())
            iou = torch.from_numpy(self._request.get_output_tensor(1).data.copy())
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou[:, sel]


# The AIS decoder's stages at 512² and 1024² (of SAM's 1024² frame): 10 of its 23 convolutions and
# 60 % of its 411 GMAC. ``"mixed"`` runs exactly these convolutions in bf16 (see OpenVINOAISDecoder).
_AIS_HIGH_RES = ("deconv3.", "deconv4.", "decoder.samplers.2.", "decoder.blocks.2.", "deconv_out.",
                 "decoder_head.")
_AIS_HIGH_RES_CONVS = 10
#: what an AIS decoder precision may be (``"auto"``: the encoder's, see ``apply_decoder_backend``)
AIS_PRECISIONS = ("auto", "fp32", "mixed", "bf16")


def _module_path(friendly_name: str) -> str:
    """``"deconv4.block.1.block."`` from the IR name ``"__module.deconv4.block.1.block/aten::..."``
    (the PyTorch frontend names every op after the module that made it)."""
    head = friendly_name.split("/", 1)[0]
    return head[len("__module."):] + "." if head.startswith("__module.") else ""


def _bf16_convolutions(model, prefixes) -> int:
    """Run the convolutions of ``model`` made by modules under ``prefixes`` in bf16, in place.

    Each chosen convolution gets its input and weights converted to bf16 and its output converted
    back to float32, so it runs bf16 kernels while everything around it (the norms, their
    statistics, the activations) stays float32 in a float32-compiled model. Returns how many
    convolutions were changed.
    """
    import openvino.opset13 as ops

    changed = 0
    for op in list(model.get_ordered_ops()):
        if op.get_type_name() not in ("Convolution", "ConvolutionBackpropData"):
            continue
        if not _module_path(op.get_friendly_name()).startswith(tuple(prefixes)):
            continue
        consumers = list(op.output(0).get_target_inputs())
        for i in (0, 1):  # data and weights (a constant: folded to bf16 when compiling)
            op.input(i).replace_source_output(ops.convert(op.input_value(i), "bf16").output(0))
        op.validate_and_infer_types()
        back = ops.convert(op.output(0), "f32")
        for target in consumers:
            target.replace_source_output(back.output(0))
        changed += 1
    model.validate_nodes_and_infer_types()
    return changed


class _UnexpectedIR(RuntimeError):
    pass


def _mixed_ais(model) -> None:
    """The AIS decoder's IR made ``"mixed"``: its high-resolution convolutions in bf16."""
    changed = _bf16_convolutions(model, _AIS_HIGH_RES)
    if changed != _AIS_HIGH_RES_CONVS:  # the IR's op names are not the ones we export
        raise _UnexpectedIR(
            f"expected {_AIS_HIGH_RES_CONVS} high-resolution convolutions in the AIS decoder's IR, "
            f"found {changed}"
        )


class OpenVINOAISDecoder(nn.Module):
    """micro-sam's AIS decoder (:class:`~napari_mobilesam.models.ais_decoder.AISDecoder`) through
    OpenVINO on the CPU.

    ``forward(embedding)``: ``(1, 256, 64, 64)`` float32 → ``(1, 3, 1024, 1024)`` float32 CPU
    tensor, the same function as the torch module (BatchNorm mode included: it is part of the IR
    key); other shapes and batches go to the torch module (``torch_decoder``, not registered).

    ``precision`` (applied when compiling; every precision shares one IR):

    * ``"fp32"`` (default): micro-sam's maps within about 3e-5, its labels exactly.
    * ``"mixed"``: the convolutions of the 512² and 1024² stages (``deconv3``, ``deconv4``,
      ``decoder.samplers.2``, ``decoder.blocks.2``, ``deconv_out``, ``decoder_head``: 60 % of
      the work) in bf16, everything else (the lower stages, every norm and its statistics, the
      output layer) in float32.
    * ``"bf16"``: the whole decoder in bf16 (OpenVINO's bf16 inference precision).

    On a CPU without bf16 support ``"mixed"`` and ``"bf16"`` fall back to ``"fp32"`` with a
    warning (``precision`` then says ``"fp32"``). Label agreement and speed of each:
    docs/benchmarks.md (micro-sam AIS section).
    """

    backend_name = "openvino"

    def __init__(self, decoder: nn.Module, embed_shape=(256, 64, 64), precision: str = "fp32") -> None:
        super().__init__()
        import openvino as ov

        if precision not in AIS_PRECISIONS[1:]:
            raise ValueError(
                f"AIS decoder precision must be one of {', '.join(AIS_PRECISIONS[1:])}, not {precision!r}"
            )
        if precision != "fp32" and not _openvino_has_bf16(ov.Core()):
            log.warning("this CPU has no bf16 support in OpenVINO; the AIS decoder runs in float32")
            precision = "fp32"
        self.precision = precision
        self.weights_digest = state_dict_digest(decoder)
        object.__setattr__(self, "torch_decoder", decoder)
        self.embed_shape = tuple(embed_shape)
        self.batchnorm = decoder.batchnorm
        src = copy.deepcopy(decoder).cpu().float().eval()
        src.weights_digest = self.weights_digest
        # traced on a small embedding: the graph has no fixed sizes (it is compiled for
        # embed_shape below), and tracing at 64² ran the whole decoder at 1024² once (seconds)
        example = torch.zeros(1, self.embed_shape[0], 8, 8)
        self.ir_path, self.converted = openvino_ir(
            src, f"ais-decoder-{self.batchnorm}", example, img_size=self.embed_shape[-1]
        )
        shape = (1, *self.embed_shape)
        compiled = None
        if precision == "mixed":
            try:
                compiled = _compile(self.ir_path, "fp32", shape, edit=_mixed_ais)
            except _UnexpectedIR as exc:
                log.warning("%s; the AIS decoder runs in float32", exc)
                self.precision = precision = "fp32"
        if compiled is None:
            compiled = _compile(self.ir_path, precision, shape)
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if tuple(embedding.shape) != (1, *self.embed_shape) or embedding.requires_grad:
            return self.torch_decoder(embedding)
        x = embedding.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            self._request.infer({0: x})
            return torch.from_numpy(self._request.get_output_tensor(0).data.copy())
